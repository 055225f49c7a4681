"""The service's end of one worker's socket: whole, checked messages in; the host's messages out."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

from spice_stream_worker import frameparts
from spice_stream_worker import protocol as p

from .ratelimit import LogLimiter

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
# The worker's send buffer: a 1080p frame is about 300 KB, a 4K one about 1.2 MB. The kernel
# doubles the figure for its bookkeeping.
WORKER_SNDBUF = 1024 * 1024
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)  # Linux: root may pass net.core.wmem_max
READS_PER_WAKE = 8  # bounded per loop turn, so a flooding worker cannot starve the loop
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
    whatever message was half sent.
    """

    def __init__(self, sock: socket.socket, *, label: str,
                 check: Callable[[p.Message], str | None],
                 deliver: Callable[[p.Message], None],
                 on_closed: Callable[[], None] | None = None) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self.label = label
        self._check = check
        self._deliver = deliver
        self._on_closed = on_closed
        self._parser = p.Parser(frameparts.WORKER_CHANNEL_LIMITS)
        self._frame = frameparts.Assembler()
        self._out = bytearray()
        self._writing = False
        self.closed = False
        self.last_frame_at: float | None = None
        self._log = LogLimiter(log, LOG_INTERVAL_S)
        asyncio.get_running_loop().add_reader(self._fd, self._on_readable)

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
        loop = asyncio.get_running_loop()
        if self._out and not self._writing and not self.closed:
            loop.add_writer(self._fd, self._flush)
            self._writing = True
        elif not self._out and self._writing:
            loop.remove_writer(self._fd)
            self._writing = False

    def _on_readable(self) -> None:
        for _ in range(READS_PER_WAKE):
            if self.closed:
                return
            try:
                chunk = self._sock.recv(READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.close()
                return
            for item in self._parser.feed(chunk):
                if isinstance(item, p.Violation):
                    self._log.log(logging.WARNING, "violation",
                                  "%s sent invalid data: %s; %d bytes discarded",
                                  self.label, item.reason, item.discarded)
                    continue
                if item.type == frameparts.FRAME_PARTS:
                    try:
                        item = p.Message(p.MsgType.DATA, b"", self._frame.apply(item.payload))
                    except p.MessageError as e:
                        self._log.log(logging.WARNING, "refused", "%s: message refused: %s",
                                      self.label, e)
                        continue
                reason = self._check(item)
                if reason is not None:
                    self._log.log(logging.WARNING, "refused", "%s: message refused: %s",
                                  self.label, reason)
                    continue
                if item.type == p.MsgType.DATA:
                    self.last_frame_at = time.monotonic()
                self._deliver(item)
                if self.closed:
                    return

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._fd)
        if self._writing:
            loop.remove_writer(self._fd)
            self._writing = False
        self._sock.close()
        if self._on_closed is not None:
            self._on_closed()
