"""The service's end of one worker's socket: whole, checked messages in; the host's messages out."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

from spice_stream_common import frameparts
from spice_stream_common import protocol as p
from spice_stream_common.ratelimit import LogLimiter

from . import guestmessages, heap

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
# The worker's send buffer: a 1080p frame is about 300 KB, a 4K one about 1.2 MB. The kernel
# doubles the figure for its bookkeeping.
WORKER_SNDBUF = 1024 * 1024
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)  # Linux: root may pass net.core.wmem_max
# What one wake-up may do, so that a flooding worker cannot hold the event loop (the port's host
# side, the bus, a VT switch, the other workers): at most this many reads, and no new message once
# this much time has gone; the rest waits for the next turn of the loop. A message's own cost
# follows its size (a 32 MiB frame: about 10 ms), so a turn ends within the budget and one message.
READS_PER_WAKE = 8
WAKE_BUDGET_S = 0.004
# A standby worker is read only for its CAPABILITIES (sent first, at most 1 KiB): past this many
# bytes without them, it is not read again until it is relayed.
STANDBY_READ_MAX = 4 * (p.HEADER_SIZE + p.CAPABILITIES_MAX_BYTES)
# Dropping more than this gives the heap's free pages back to the system.
GIVE_BACK_BYTES = 4 * 1024 * 1024
# Host messages are a few bytes (CAPABILITIES, START_STOP): a worker that lets this much pile up
# is not reading, and what it misses is only the host's latest word, sent again on the next change.
MAX_OUT_BYTES = 64 * 1024
LOG_INTERVAL_S = 10.0


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """(service end, worker end): the worker speaks the stream-device protocol on its end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    # Room for a whole frame in flight (the default, about 200 KiB, is less than a 1080p JPEG):
    # the worker hands it over in one write, and the service takes it in one wake-up.
    try:
        theirs.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, WORKER_SNDBUF)
    except PermissionError:  # not root (tests, the bench as a user): as much as the limit allows
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, WORKER_SNDBUF)
    return ours, theirs


class WorkerChannel:
    """Reads the worker's messages through the bounded parser and hands on those `check` allows
    (a frame sent as its changed parts is handed on whole, as DATA).

    The worker runs as the session's user, who controls it: a garbled or refused message is
    dropped and logged (rate-limited), never written to the port; closing the channel drops
    whatever message was half sent. A channel starts in standby: it reads only the worker's
    CAPABILITIES until relay(True); its frames are bounded by the last FORMAT relayed (none
    before it), and in standby it holds no frame and no half message.
    """

    def __init__(self, sock: socket.socket, *, label: str,
                 check: Callable[[p.Message], str | None],
                 deliver: Callable[[p.Message], None],
                 on_closed: Callable[[], None] | None = None,
                 on_no_picture: Callable[[], None] | None = None,
                 relayed: bool = False) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self.label = label
        self._check = check
        self._deliver = deliver
        self._on_closed = on_closed
        self._on_no_picture = on_no_picture
        self._parser = p.Parser(frameparts.WORKER_CHANNEL_LIMITS, skip_oversized=True)
        self._frame = frameparts.Assembler()
        self._out = bytearray()
        self._writing = False
        self._reading = False
        self._again: asyncio.Handle | None = None
        self.closed = False
        self.relayed = False
        self.caps_seen = False
        self._standby_left = STANDBY_READ_MAX
        self.last_frame_at: float | None = None
        self.last_waiting_at: float | None = None  # its last NO_PICTURE
        self.last_unchanged_at: float | None = None  # its last UNCHANGED
        self._log = LogLimiter(log, LOG_INTERVAL_S)
        self._loop = asyncio.get_running_loop()
        self.relay(relayed)

    @property
    def held_bytes(self) -> int:
        """What the service holds for this worker: its half-read message and its frame."""
        return self._parser.buffered + self._frame.size

    def relay(self, relayed: bool) -> None:
        """Relayed: read everything. Standby: drop what is held (staying in step with the
        stream), hold no frame and read only until the worker's CAPABILITIES."""
        if self.closed or (relayed and self.relayed):
            return
        self.relayed = relayed
        if not relayed:
            held = self.held_bytes
            self._parser.drop()
            self._frame.clear()
            if held >= GIVE_BACK_BYTES:
                heap.give_back()
            self._standby_left = STANDBY_READ_MAX
            self.last_unchanged_at = None  # its picture is no longer the host's
            for msg_type in frameparts.WORKER_CHANNEL_LIMITS:
                if msg_type != p.MsgType.CAPABILITIES:
                    self._parser.set_limit(msg_type, 0)
        else:
            for msg_type, limit in frameparts.WORKER_CHANNEL_LIMITS.items():
                self._parser.set_limit(msg_type, limit)
        self._set_frame_limit(None)  # no frame before this worker's next FORMAT
        self._update_reader()

    def _set_frame_limit(self, fmt: p.Format | None) -> None:
        limit = 0 if fmt is None or not self.relayed else \
            guestmessages.frame_limit(fmt.width, fmt.height)
        self._frame.max_size = limit
        self._parser.set_limit(p.MsgType.DATA, limit)
        self._parser.set_limit(frameparts.DELTA, limit)
        self._parser.set_limit(frameparts.FRAME_PARTS, frameparts.payload_limit(limit) if limit else 0)

    def _wants_input(self) -> bool:
        return not self.closed and (self.relayed or (not self.caps_seen and self._standby_left > 0))

    def _update_reader(self) -> None:
        want = self._wants_input() and self._again is None
        if want and not self._reading:
            self._loop.add_reader(self._fd, self._on_readable)
        elif not want and self._reading:
            self._loop.remove_reader(self._fd)
        self._reading = want

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if len(self._out) + len(data) > MAX_OUT_BYTES:
            self._log.log(logging.WARNING, "out", "%s does not read its socket: host message dropped",
                          self.label)
            return
        self._out += data
        self._flush()

    def _flush(self) -> None:
        while self._out and not self.closed:
            try:
                n = self._sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()
                return
            del self._out[:n]
        if self._out and not self._writing and not self.closed:
            self._loop.add_writer(self._fd, self._flush)
            self._writing = True
        elif not self._out and self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def _on_readable(self) -> None:
        self._again = None
        deadline = time.monotonic() + WAKE_BUDGET_S
        reads = 0
        while self._wants_input():
            item = self._parser.next()
            if item is None:
                if reads == READS_PER_WAKE:
                    break
                if not self._read():
                    break
                reads += 1
                continue
            self._handle(item)
            if time.monotonic() >= deadline:
                break
        if not self.closed and self._wants_input() and (
                self._parser.pending or reads == READS_PER_WAKE):
            # Out of budget with work left: the next turn of the loop goes on (others go first).
            self._again = self._loop.call_soon(self._on_readable)
        self._update_reader()

    def _read(self) -> bool:
        """Take one read from the socket into the parser; False when there is nothing to read."""
        size = READ_CHUNK
        if not self.relayed:
            # Exactly what completes the message in hand: nothing of the next is taken in.
            size = min(self._parser.needed, self._standby_left)
        try:
            chunk = self._sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            chunk = b""
        if not chunk:
            self.close()
            return False
        if not self.relayed:
            self._standby_left -= len(chunk)
        self._parser.push(chunk)
        return True

    def _handle(self, item: p.Message | p.Violation) -> None:
        if isinstance(item, p.Violation):
            if (self.relayed and self._frame.max_size == 0
                    and item.skipped_type in (p.MsgType.DATA, frameparts.DELTA, frameparts.FRAME_PARTS)):
                # A frame from before this worker's stream started again (it sat in the socket
                # while the channel stood by): stale, and the worker's FORMAT and whole frame are
                # on their way. Not the worker's fault, so not a warning.
                self._log.log(logging.INFO, "stale", "%s: a frame before its FORMAT (one sent "
                              "before its stream started again), dropped (%d bytes)",
                              self.label, item.discarded)
                return
            self._log.log(logging.WARNING, "violation",
                          "%s sent invalid data: %s; %d bytes discarded",
                          self.label, item.reason, item.discarded)
            return
        if item.type == frameparts.NO_PICTURE:
            # The worker's own word that it waits with nothing to show: for the watchdog, and for
            # the supervisor (which may show the display's scanout meanwhile).
            self.last_waiting_at = time.monotonic()
            if self._on_no_picture is not None:
                self._on_no_picture()
            return
        if item.type == frameparts.UNCHANGED:
            # Its word that its last frame is still its picture (a static screen): for the
            # watchdog and the Streaming property, and only while relayed; nothing for the port.
            if self.relayed:
                self.last_unchanged_at = time.monotonic()
            return
        if item.type == frameparts.FRAME_PARTS:
            try:
                item = p.Message(p.MsgType.DATA, b"", self._frame.apply(item.payload))
            except p.MessageError as e:
                self._log.log(logging.WARNING, "refused", "%s: message refused: %s",
                              self.label, e)
                return
        elif item.type == frameparts.DELTA:
            item = p.Message(p.MsgType.DATA, item.payload, delta=True)
        reason = self._check(item)
        if reason is not None:
            self._log.log(logging.WARNING, "refused", "%s: message refused: %s",
                          self.label, reason)
            return
        if item.type == p.MsgType.FORMAT:
            self._set_frame_limit(p.decode_format(item.payload))
        elif item.type == p.MsgType.DATA:
            self.last_frame_at = time.monotonic()
        elif item.type == p.MsgType.CAPABILITIES:
            self.caps_seen = True
        self._deliver(item)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._again is not None:
            self._again.cancel()
            self._again = None
        self._update_reader()
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self._sock.close()
        held = self.held_bytes
        self._parser = p.Parser(frameparts.WORKER_CHANNEL_LIMITS, skip_oversized=True)
        self._frame.clear()
        if held >= GIVE_BACK_BYTES:
            heap.give_back()
        if self._on_closed is not None:
            self._on_closed()
