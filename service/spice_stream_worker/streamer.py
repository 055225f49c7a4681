"""What goes on the wire and when: host requests, frame pacing, size changes, cursor, heartbeat."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spice_stream_common import frameparts
from spice_stream_common import protocol as p
from spice_stream_common.codecnames import Codec
from spice_stream_common.outbox import Outbox

from .streamcodec import Encoded, StreamCodec
from .videoencoder import VideoEncoderError

log = logging.getLogger(__name__)

# On the service's socket, while there is nothing new to send (a static screen: UNCHANGED; no
# picture: NO_PICTURE), the service hears that the worker is alive this often, for its watchdog and
# its Streaming property. Written to the port itself, a static screen sends nothing at all: a
# client that connects late makes the host send START_STOP again, which brings a whole frame.
HEARTBEAT_S = 2.0
# An MJPEG frame is sent again this long after the last change, once each: spice-gtk drops an MJPEG
# frame that reaches it later than its multimedia time (channel-display-gst.c, -mjpeg.c: "dropping
# a late MJPEG frame"), and a still screen sends nothing after it, so the client kept the picture
# before it. Under TCG, QEMU's SPICE server fell seconds behind after a VT switch or a mode set:
# the client showed the session 3-5 s after QEMU's own display did, and with the frame sent again
# at 0.5 and 2 s, 2.5 s after it (VM, Debian 12, scenario 17: the first two dropped). A frame is
# late when it reaches the client more than the server's latency (400 ms to start with) after the
# server read it, so a busy spell of that length drops every frame in it: four more at growing
# intervals, each a frame the service holds already (no capture, no encode in the worker).
# Video codecs' frames are decoded however late (each needs the one before).
REFRESH_AFTER_S = (0.25, 0.5, 1.0, 2.0)
CURSOR_MOVE_MIN_INTERVAL_S = 1 / 60
# One frame being written and one encoded behind it: the next capture and encode overlap the device's
# drain of the previous frame, and a slow host still never has more than two frames of latency queued.
MAX_FRAMES_QUEUED = 2
MAX_DAMAGE_RECTS = 256
VIOLATION_LOG_INTERVAL_S = 10.0


@dataclass
class HostState:
    """What the host told us; handed to the next worker by the service so a switch does not wait."""

    codecs: tuple[int, ...] | None = None  # last START_STOP; None = none seen yet
    caps: bytes | None = None


@dataclass
class Counters:
    frames: int = 0
    false_damage: int = 0  # damage whose pixels had not changed: no frame
    started: float = field(default_factory=time.monotonic)
    recent: list[float] = field(default_factory=list)

    def add_frame(self, now: float) -> None:
        self.frames += 1
        self.recent.append(now)
        if len(self.recent) > 120:
            del self.recent[:60]

    def fps(self, now: float) -> float:
        window = [t for t in self.recent if now - t <= 2.0]
        return round(len(window) / 2.0, 1)


class Streamer:
    """Drives one screen onto one device. The caller owns the loop and calls the on_* methods."""

    def __init__(
        self,
        screen: Any,
        encoder: StreamCodec | None,
        outbox: Outbox,
        *,
        fps: int,
        host: HostState,
        display_address: str | None = None,
        read_cursor: Callable[[], Any] | None = None,
        frame_parts: frameparts.Sender | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.screen = screen
        self.encoder = encoder
        self.outbox = outbox
        self.interval = 1.0 / fps
        self.host = host
        self.display_address = display_address
        self.read_cursor = read_cursor
        # On the service's socket frames go as the parts that changed; on a device, as DATA.
        self.frame_parts = frame_parts
        self.clock = clock
        self.counters = Counters()
        self.streaming = False
        self._damage: list[Any] = []
        self._need_full = True
        self._last_frame_at = -1e9
        self._last_unchanged_at = -1e9  # the last UNCHANGED sent to the service
        self._last_waiting_at = -1e9  # the last NO_PICTURE sent to the service
        self._next_frame_at = -1e9  # frame slots on a fixed grid, so loop latency does not eat the cap
        self._changed_at: float | None = None  # the last frame of a change (MJPEG: refreshed)
        self._refreshes = 0  # of REFRESH_AFTER_S, sent since then
        self._last_parts: tuple[bytes, ...] | None = None  # the last MJPEG frame, for the port
        self._cursor_dirty = True
        self._pointer_dirty = False
        self._last_pointer: tuple[int, int] | None = None
        self._last_pointer_at = -1e9
        self._violations = 0
        self._violation_logged_at = -1e9
        self._format_sent: tuple[int, int, int] | None = None  # width, height, codec

    # --- host side ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Announce ourselves; resume streaming if the previous worker was streaming."""
        self.outbox.send(p.capabilities(b""))
        if self.host.codecs is not None:
            self._apply_start_stop(self.host.codecs, inherited=True)

    def on_host_bytes(self, data: bytes, parser: p.Parser) -> None:
        for item in parser.feed(data):
            if isinstance(item, p.Violation):
                self._note_violation(item.reason, item.discarded)
            else:
                self._on_message(item)

    def _on_message(self, msg: p.Message) -> None:
        try:
            if msg.type == p.MsgType.CAPABILITIES:
                self.host.caps = msg.payload
                log.info("host capabilities: %s", msg.payload.hex() or "none")
            elif msg.type == p.MsgType.START_STOP:
                self._apply_start_stop(p.decode_start_stop(msg.payload).codecs)
            elif msg.type == frameparts.KEYFRAME and self.frame_parts is not None:
                # The service lost a frame of the chain: a keyframe now, even on a still screen
                # (the host's picture misses what the lost frame changed).
                if self.encoder is not None and self.encoder.video:
                    self.encoder.want_keyframe()
                    self._need_full = True
            elif msg.type == p.MsgType.NOTIFY_ERROR:
                err = p.decode_notify_error(msg.payload)
                log.error("host reported error %d: %s", err.code, err.text)
        except p.MessageError as exc:
            self._note_violation(str(exc), len(msg.payload) + p.HEADER_SIZE)

    def _note_violation(self, reason: str, discarded: int) -> None:
        self._violations += 1
        now = self.clock()
        if now - self._violation_logged_at >= VIOLATION_LOG_INTERVAL_S:
            extra = f" ({self._violations - 1} more since the last report)" if self._violations > 1 else ""
            log.warning("invalid data from host: %s; %d bytes discarded%s", reason, discarded, extra)
            self._violation_logged_at = now
            self._violations = 0

    def _apply_start_stop(self, codecs: tuple[int, ...], inherited: bool = False) -> None:
        self.host.codecs = tuple(codecs)
        codec = self._choose(self.host.codecs)
        want = codec is not None
        how = "handed over" if inherited else "from host"
        if want and not self.streaming:
            log.info("start streaming %s (%s, codecs %s)", _label(codec), how, list(codecs))
            self.streaming = True
            self._need_full = True
            self._format_sent = None
            self._cursor_dirty = True
            if self.display_address:
                self.outbox.send(p.device_display_info(0, 0, self.display_address))
            self._send_quality_indicator(codec)
        elif want:
            # Streaming already: libspice-server says START_STOP again when a client connects (a
            # client gets STREAM_CREATE only with a FORMAT), and the service when the port is read
            # again after a block. Start over: FORMAT and a whole frame (a keyframe), the cursor
            # again; in another codec if the clients now decode other ones.
            log.info("start streaming %s again (%s, codecs %s): a whole frame", _label(codec), how,
                     list(codecs))
            self._need_full = True
            self._format_sent = None
            self._cursor_dirty = True
            self._send_quality_indicator(codec)
        elif not want and self.streaming:
            if codecs:
                log.warning("host asked for codecs %s, none this worker can send: stop streaming",
                            list(codecs))
            else:
                log.info("stop streaming (%s)", how)
            self.streaming = False
        elif not want and codecs:
            log.warning("host offers codecs %s, none this worker can send: not streaming",
                        list(codecs))

    def _choose(self, codecs: tuple[int, ...]) -> int | None:
        if self.encoder is None:  # tests of the host side: MJPEG as offered
            return p.CODEC_MJPEG if p.CODEC_MJPEG in codecs else None
        return self.encoder.choose(codecs) if codecs else None

    def _send_quality_indicator(self, codec: int | None) -> None:
        if self.host.caps and p.has_cap(self.host.caps, p.Capability.QUALITY_INDICATOR):
            self.outbox.send(p.quality_indicator(f"{_label(codec)} fps<={round(1 / self.interval)}"))

    # --- screen side --------------------------------------------------------------------------------

    def on_screen_changes(self, changes: Any) -> None:
        if changes.resized:
            self._need_full = True
            self._damage.clear()
        elif changes.damage and self.streaming and not self._need_full:
            # Not streaming: nothing to remember, the next start sends a whole frame anyway.
            self._damage.extend(changes.damage)
            if len(self._damage) > MAX_DAMAGE_RECTS:
                # A host that stopped reading must not make this list grow without bound.
                self._need_full = True
                self._damage.clear()
        if changes.cursor_changed:
            self._cursor_dirty = True
        if changes.pointer_moved:
            self._pointer_dirty = True

    @property
    def pending_damage(self) -> int:
        """Damaged rectangles remembered for the next partial frame."""
        return len(self._damage)

    def next_deadline(self) -> float | None:
        """When the loop should call tick() again, or None to wait for input (or the device) only."""
        if not self.streaming:
            return None
        deadlines = []
        if self._cursor_dirty and self.read_cursor is not None:
            deadlines.append(self.clock())
        if self._pointer_dirty:
            deadlines.append(self._last_pointer_at + CURSOR_MOVE_MIN_INTERVAL_S)
        # No picture (the source's stream is gone): no frame until it is back, which poll()
        # reports as a resize; the source's fileno() wakes the loop then.
        if self._room_for_a_frame() and self.screen.live:
            # (else the device's writability wakes us)
            if self._need_full or self._damage:
                deadlines.append(self._next_frame_at)
            else:
                for due in (self._refresh_due(), self._heartbeat_due()):
                    if due is not None:
                        deadlines.append(due)
        elif not self.screen.live and self.frame_parts is not None:
            deadlines.append(self._last_waiting_at + HEARTBEAT_S)
        return min(deadlines) if deadlines else None

    def _room_for_a_frame(self) -> bool:
        # Room for FORMAT and DATA both: with no resend of the last frame any more, a frame the
        # full queue dropped would leave the host's picture stale on a static screen.
        return self.outbox.frames_queued < MAX_FRAMES_QUEUED and self.outbox.room >= 2

    def _refresh_due(self) -> float | None:
        """When the last MJPEG frame goes again (REFRESH_AFTER_S), None when it does not."""
        if self._changed_at is None or self._refreshes >= len(REFRESH_AFTER_S):
            return None
        return self._changed_at + REFRESH_AFTER_S[self._refreshes]

    def _heartbeat_due(self) -> float | None:
        """When the service should next hear UNCHANGED: only on its socket, and only once the
        picture it holds is this worker's current one (a frame went out since the last start)."""
        if self.frame_parts is None or self._format_sent is None:
            return None
        return max(self._last_frame_at, self._last_unchanged_at) + HEARTBEAT_S

    def tick(self) -> None:
        if not self.streaming:
            return
        now = self.clock()
        if self._cursor_dirty and self.read_cursor is not None:
            self._send_cursor()
        if self._pointer_dirty and now - self._last_pointer_at >= CURSOR_MOVE_MIN_INTERVAL_S:
            self._send_pointer(now)
        if not self.screen.live:
            # Only the service hears it (a type of its socket's own); the port has no such word.
            if self.frame_parts is not None and now - self._last_waiting_at >= HEARTBEAT_S:
                self.outbox.send(frameparts.no_picture())
                self._last_waiting_at = now
            return
        if not self._room_for_a_frame():
            return
        if now < self._next_frame_at:
            return
        if self._need_full or self._damage:
            self._send_frame(now)
            return
        due = self._refresh_due()
        if due is not None and now >= due:
            self._send_refresh(now)
            return
        due = self._heartbeat_due()
        if due is not None and now >= due:
            # A static screen: the service holds this picture already (and the port gets the
            # newest frame it holds), so nothing goes to the port; the service hears only that
            # the worker is alive and its picture current.
            self.outbox.send(frameparts.unchanged())
            self._last_unchanged_at = now

    def _send_frame(self, now: float) -> None:
        """A frame of what changed."""
        assert self.encoder is not None and self.encoder.codec is not None
        codec = int(self.encoder.codec)
        if self._need_full:
            frame = self.screen.grab(None)
            changed = None
        else:
            damage, self._damage = self._damage, []
            frame = self.screen.grab(damage)
            if frame.changed == [] and self._format_sent == (frame.width, frame.height, codec):
                # Drawn but not changed (the same pixels again): nothing to encode or send.
                self.counters.false_damage += 1
                return
            changed = frame.changed
        try:
            encoded = self.encoder.encode(frame, changed)
        except VideoEncoderError:
            # Logged by the encoder, which gives that codec up: start over in the next one the
            # host offers (MJPEG at the latest).
            self._apply_start_stop(self.host.codecs or ())
            return
        # The size comes from the frame itself: a resize can land between poll() and grab() (the encoder
        # then encodes the new size whole).
        if self._format_sent != (frame.width, frame.height, codec):
            self.outbox.send(p.format_msg(frame.width, frame.height, codec))
            self._format_sent = (frame.width, frame.height, codec)
        self._damage.clear()
        self._need_full = False
        self._send_encoded(encoded)
        if not self.encoder.video:
            self._changed_at, self._refreshes = now, 0
            self._last_parts = encoded.parts
        self._last_frame_at = now
        # Keep to the grid when on time; after a pause start a new one (no burst to catch up).
        slot = self._next_frame_at if now - self._next_frame_at < self.interval else now
        self._next_frame_at = slot + self.interval
        self.counters.add_frame(now)

    def _send_refresh(self, now: float) -> None:
        """The last MJPEG frame again: to the service the message of no changed part (it writes
        the frame it holds), to the port the frame itself."""
        self._refreshes += 1
        parts = self._last_parts
        if parts is None or self.encoder is None or self.encoder.video:
            return
        if self.frame_parts is None:
            sent = self.outbox.send(p.data_header(sum(map(len, parts))), *parts, frame=True)
        else:
            sent = self.outbox.send(*self.frame_parts.message(parts), frame=True)
            if sent:
                self.frame_parts.sent(parts)
            else:
                self.frame_parts.forget()
        if sent:
            self._last_frame_at = now
            self.counters.add_frame(now)

    def _send_encoded(self, encoded: Encoded) -> None:
        parts = encoded.parts
        size = sum(map(len, parts))
        if self.encoder is not None and self.encoder.video:
            # A video frame goes whole: a keyframe as DATA, a delta marked as such for the
            # service, which writes it after the frames before it or not at all (and then asks for
            # a keyframe). Parts are the JPEG's (latest wins, replaced in place).
            kind = p.MsgType.DATA if encoded.key or self.frame_parts is None else frameparts.DELTA
            if not self.outbox.send(p.header(kind, size), *parts, frame=True):
                self.encoder.want_keyframe()  # the chain is cut here: start a new one
                self._need_full = True
        elif self.frame_parts is None:
            self.outbox.send(p.data_header(size), *parts, frame=True)
        elif self.outbox.send(*self.frame_parts.message(parts), frame=True):
            self.frame_parts.sent(parts)
        else:
            self.frame_parts.forget()

    def _send_cursor(self) -> None:
        self._cursor_dirty = False
        assert self.read_cursor is not None
        cursor = self.read_cursor()
        if cursor is None:
            return
        try:
            self.outbox.send(
                p.cursor_set(cursor.width, cursor.height, cursor.hot_x, cursor.hot_y, cursor.argb)
            )
        except p.MessageError as exc:
            log.warning("cursor not sent: %s", exc)

    def _send_pointer(self, now: float) -> None:
        self._pointer_dirty = False
        self._last_pointer_at = now
        pos = self.screen.pointer_position()
        if pos != self._last_pointer:
            self._last_pointer = pos
            self.outbox.send(p.cursor_move(*pos))

    def state(self) -> dict[str, Any]:
        width, height = self.screen.size
        now = self.clock()
        return {
            "streaming": self.streaming,
            # False while the source has no picture (GNOME's lock screen): no frames, by design.
            "live": bool(self.screen.live),
            "frames": self.counters.frames,
            "bytes": self.outbox.bytes_written,
            "fps": self.counters.fps(now),
            "width": width,
            "height": height,
            "codecs": list(self.host.codecs) if self.host.codecs is not None else None,
            "host_caps": self.host.caps.hex() if self.host.caps is not None else None,
        }


def _label(codec: int | None) -> str:
    try:
        return Codec(codec).label if codec is not None else "nothing"
    except ValueError:
        return f"codec {codec}"
