"""The stream port's one owner: opens it, keeps what the host said, writes whole messages to it."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import termios
import time
import tty
from collections import deque
from collections.abc import Callable

from spice_stream_common import frameparts
from spice_stream_common import protocol as p
from spice_stream_common.ratelimit import LogLimiter

from .portwriter import PortWriter

log = logging.getLogger(__name__)

HOST_READ_CHUNK = 64 * 1024
REOPEN_DELAY_S = 1.0
# A frame normally blocks the port for a few ms while the host hands it to its clients; a host
# that takes longer than this has stopped reading, and the worker is told to stop encoding.
PAUSE_AFTER_S = 0.25
FPS_WINDOW_S = 2.0
HOST_LOG_INTERVAL_S = 10.0

Sink = Callable[[bytes], None]


class PortRelay:
    """Holds the port's fd for the service's life (while the port exists): a worker never does.

    Host-to-guest messages are parsed here once; the host's state (capabilities, last START_STOP)
    lives here and is told to whichever worker is attached. Worker messages, already checked by
    its channel, are written whole, in the order above.
    """

    def __init__(self, path: str, *, on_change: Callable[[], None] | None = None,
                 pause_after_s: float = PAUSE_AFTER_S,
                 reopen_delay_s: float = REOPEN_DELAY_S) -> None:
        self.path = path
        self._on_change = on_change
        self._pause_after_s = pause_after_s
        self._reopen_delay_s = reopen_delay_s
        self._fd: int | None = None
        self._wanted = False
        self._retry: asyncio.TimerHandle | None = None
        self.opens = 0  # each open resets the host's side of the protocol
        self._parser = p.Parser()
        self.host_caps: bytes | None = None
        self.host_codecs: tuple[int, ...] | None = None
        self._sink: Sink | None = None
        self._writer: PortWriter | None = None
        self._dropped_before = 0
        self.paused = False
        self.format_codec: int | None = None
        self._caps_written: bytes | None = None
        self.frames = 0
        self.bytes = 0
        # The attached worker's own: each attach starts a new generation, and a frame of the
        # previous worker that was still being written does not count for the next one.
        self._generation = 0
        self.attached_frames = 0
        self.attached_bytes = 0
        self._frame_times: deque[float] = deque(maxlen=512)
        self._host_log = LogLimiter(log, HOST_LOG_INTERVAL_S)

    # ---- the port -----------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def start(self) -> None:
        """Keep the port open from now on (retrying while it cannot be opened)."""
        self._wanted = True
        if self._fd is None:
            self._try_open()

    def stop(self, why: str) -> None:
        """Close the port and stop trying."""
        self._wanted = False
        self._cancel_retry()
        self._close(why)

    def set_path(self, path: str) -> None:
        if path != self.path:
            log.info("stream port path %s -> %s", self.path, path)
            self._close("the port moved")
            self.path = path
            if self._wanted:
                self._try_open()

    def reopen(self, why: str) -> None:
        """Close and open again: the host resets its parser, its error state and the stream."""
        self._close(why)
        if self._wanted:
            self._try_open()

    def _try_open(self) -> None:
        self._cancel_retry()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            self._host_log.log(logging.WARNING, "open", "cannot open the stream port %s: %s",
                               self.path, e.strerror)
            self._schedule_retry()
            return
        try:
            if not stat.S_ISCHR(os.fstat(fd).st_mode):
                raise OSError(errno.ENODEV, "not a character device")
            if os.isatty(fd):
                tty.setraw(fd, termios.TCSANOW)  # a pty stand-in must pass bytes through as they are
        except (OSError, termios.error) as e:
            os.close(fd)
            self._host_log.log(logging.WARNING, "open", "cannot use the stream port %s: %s",
                               self.path, getattr(e, "strerror", None) or e)
            self._schedule_retry()
            return
        self._fd = fd
        self.opens += 1
        self._parser = p.Parser()
        self.host_caps = None
        self.host_codecs = None
        self._caps_written = None
        loop = asyncio.get_running_loop()
        writer: PortWriter | None = None

        def mine(callback: Callable[..., None]) -> Callable[..., None]:
            # A closed port's writer may still have a report on its way: it is not ours any more.
            return lambda *a: callback(*a) if writer is self._writer else None

        writer = PortWriter(fd, loop=loop, stall_s=self._pause_after_s,
                            on_written=mine(self._written), on_stalled=mine(self._stalled),
                            on_drained=mine(self._drained), on_failed=mine(self._failed),
                            on_chain_broken=mine(self._chain_broken))
        self._writer = writer
        loop.add_reader(fd, self._on_readable)
        log.info("stream port %s opened", self.path)
        self._changed()

    def _schedule_retry(self) -> None:
        if self._wanted and self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(self._reopen_delay_s,
                                                                self._retry_open)

    def _retry_open(self) -> None:
        self._retry = None
        if self._wanted and self._fd is None:
            self._try_open()

    def _cancel_retry(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _close(self, why: str) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        asyncio.get_running_loop().remove_reader(fd)
        writer, self._writer = self._writer, None
        if writer is not None:
            # A message cut here cannot tear anything: the host resets its parser on the reopen.
            writer.stop()
            self._dropped_before += writer.dropped_frames
        os.close(fd)
        self.host_caps = None
        self.host_codecs = None
        self.format_codec = None
        log.info("stream port %s closed (%s)", self.path, why)
        if self._sink is not None:
            # The host forgets the stream: stopping the worker now makes it send FORMAT and a
            # whole frame when the host asks again.
            self.paused = False
            self._sink(p.start_stop(()))
        self._changed()

    def _failed(self, why: str) -> None:
        self._host_log.log(logging.WARNING, "failed", "stream port %s: %s: reopening", self.path,
                           why)
        self._close(why)
        self._schedule_retry()

    # ---- host to guest ------------------------------------------------------------------------

    def _on_readable(self) -> None:
        if self._fd is None:
            return
        try:
            data = os.read(self._fd, HOST_READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._failed(f"read failed: {e.strerror}")
            return
        if not data:
            self._failed("the host side closed")
            return
        for item in self._parser.feed(data):
            if isinstance(item, p.Violation):
                self._host_log.log(logging.WARNING, "violation",
                                   "invalid data from host: %s; %d bytes discarded",
                                   item.reason, item.discarded)
            else:
                self._on_host_message(item)
            if self._fd is None:
                return  # reopened on the host's word: the rest belongs to the old stream

    def _on_host_message(self, msg: p.Message) -> None:
        try:
            if msg.type == p.MsgType.CAPABILITIES:
                self.host_caps = msg.payload
                log.info("host capabilities: %s", msg.payload.hex() or "none")
                self._tell_worker(p.capabilities(msg.payload))
            elif msg.type == p.MsgType.START_STOP:
                codecs = p.decode_start_stop(msg.payload).codecs
                self.host_codecs = codecs
                log.info("host asks for codecs %s", list(codecs) or "none (stop)")
                if not self.paused:
                    self._tell_worker(p.start_stop(codecs))
                self._changed()
            elif msg.type == p.MsgType.NOTIFY_ERROR:
                err = p.decode_notify_error(msg.payload)
                # The host now ignores the port until it is reopened.
                self._host_log.log(logging.ERROR, "notify",
                                   "host rejected the stream (error %d: %r): reopening the port",
                                   err.code, err.text[:200])
                self.reopen("the host reported an error")
        except p.MessageError as exc:
            self._host_log.log(logging.WARNING, "violation", "invalid data from host: %s", exc)

    @property
    def host_wants_frames(self) -> bool:
        return bool(self.host_codecs and p.CODEC_MJPEG in self.host_codecs)

    # ---- the attached worker ------------------------------------------------------------------

    def attach(self, sink: Sink) -> None:
        """From now on host messages go to `sink`; it is told the host's state at once."""
        self._sink = sink
        self._generation += 1
        self.attached_frames = self.attached_bytes = 0
        if self._writer is not None:
            self._writer.drop_waiting()
        self.format_codec = None
        self.paused = False
        self._caps_written = None  # each worker announces itself
        if self.host_caps is not None:
            sink(p.capabilities(self.host_caps))
        if self.host_codecs is not None:
            sink(p.start_stop(self.host_codecs))

    def detach(self) -> None:
        """Forget the worker and what it queued; the message being written still ends whole."""
        self._sink = None
        self._generation += 1
        if self._writer is not None:
            self._writer.drop_waiting()
        self.format_codec = None
        self.paused = False

    def _tell_worker(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink(data)

    def submit(self, msg: p.Message) -> None:
        """Queue a checked worker message for the port (latest of each type wins)."""
        if self._writer is None:
            return
        if msg.type == p.MsgType.CAPABILITIES and msg.payload == self._caps_written:
            return
        if msg.type == p.MsgType.FORMAT:
            self.format_codec = p.decode_format(msg.payload).codec
        # A frame held in parts goes as its handle: its parts are taken when the port takes it.
        body = msg.payload if msg.frame is None else msg.frame
        self._writer.submit(msg.type, (p.header(msg.type, msg.size), body), self._generation,
                            delta=msg.delta)

    @property
    def format_sent(self) -> bool:
        """Whether the attached worker's stream has a FORMAT (its frames may go)."""
        return self.format_codec is not None

    @property
    def dropped_frames(self) -> int:
        """Frames replaced by a newer one before the host took them."""
        return self._dropped_before + (self._writer.dropped_frames if self._writer else 0)

    def _written(self, msg_type: int, message: tuple[bytes, ...], generation: int) -> None:
        if msg_type == p.MsgType.DATA:
            now = time.monotonic()
            first = not self._frame_times or now - self._frame_times[-1] > FPS_WINDOW_S
            self.frames += 1
            size = sum(map(len, message))
            self.bytes += size
            if generation == self._generation:
                self.attached_frames += 1
                self.attached_bytes += size
            self._frame_times.append(now)
            if first:
                self._changed()
        elif msg_type == p.MsgType.CAPABILITIES:
            self._caps_written = b"".join(message)[p.HEADER_SIZE:]

    def _chain_broken(self, generation: int) -> None:
        # A delta frame could not be written in turn: the attached worker's next frame must be a
        # keyframe (one of an earlier worker's is nobody's concern now).
        if generation == self._generation and self._sink is not None:
            self._host_log.log(logging.INFO, "chain", "the port did not take the frames in turn: "
                               "a keyframe asked for")
            self._sink(frameparts.keyframe())

    def _stalled(self, waited_s: float) -> None:
        if not self.paused and self._sink is not None:
            self.paused = True
            log.info("the host has not read the port for %.2f s: worker paused", waited_s)
            self._sink(p.start_stop(()))

    def _drained(self) -> None:
        if self.paused:
            self.paused = False
            if self._sink is not None and self._fd is not None:
                log.info("the host reads the port again: worker resumed")
                self._sink(p.start_stop(self.host_codecs or ()))

    # ---- figures ------------------------------------------------------------------------------

    def fps(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        recent = [t for t in self._frame_times if now - t <= FPS_WINDOW_S]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-3)

    def frame_age(self, now: float | None = None) -> float | None:
        """Seconds since the last frame reached the host, None if none did since it opened."""
        if not self._frame_times:
            return None
        return (time.monotonic() if now is None else now) - self._frame_times[-1]

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                log.exception("port change callback failed")
