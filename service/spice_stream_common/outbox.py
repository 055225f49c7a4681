"""The write side of the device: whole messages, in order, never torn by partial writes or signals."""

from __future__ import annotations

import errno
import logging
import os
import select
import time
from collections import deque

from .exitcodes import DeviceLost

log = logging.getLogger(__name__)

# Cursor and control messages queue behind a frame; frames themselves are never queued (see Streamer), so
# this bound is only reached by a host that stopped reading altogether.
MAX_QUEUED = 64
IOV_MAX = 1024  # Linux's limit on the pieces of one writev
DROP_LOG_INTERVAL_S = 10.0


class Outbox:
    """Owns nothing but the order of bytes on `fd`: the fd itself belongs to whoever opened it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        # Each message as the pieces it was handed in (header, JPEG segments): written with one
        # writev, never joined, so a frame is copied once, by the kernel.
        self._queue: deque[tuple[list[memoryview], int, bool]] = deque()
        self._offset = 0  # bytes of the head message already written
        self.bytes_written = 0
        self.dropped = 0
        self._drop_logged_at = -DROP_LOG_INTERVAL_S

    @property
    def pending(self) -> bool:
        return bool(self._queue)

    @property
    def in_message(self) -> bool:
        """True while a message is partly written: stopping now would tear it."""
        return self._offset > 0

    @property
    def room(self) -> int:
        """How many more messages send() takes now."""
        return MAX_QUEUED - len(self._queue)

    @property
    def frames_queued(self) -> int:
        return sum(1 for _, _, is_frame in self._queue if is_frame)

    def send(self, *parts: bytes, frame: bool = False) -> bool:
        """Queue one message, given whole or as the pieces it is made of, in order; False when it
        was dropped (the queue is full)."""
        if len(self._queue) >= MAX_QUEUED:
            # Drop the newest: the head may be in progress and must finish whole.
            self.dropped += 1
            now = time.monotonic()
            if now - self._drop_logged_at >= DROP_LOG_INTERVAL_S:
                log.warning("the host is not reading the device: %d messages dropped so far", self.dropped)
                self._drop_logged_at = now
            return False
        views = [memoryview(part) for part in parts if len(part)]
        self._queue.append((views, sum(len(v) for v in views), frame))
        return True

    def flush(self) -> bool:
        """Write as much as the device takes now; True when everything queued is out."""
        while self._queue:
            views, size, _ = self._queue[0]
            try:
                n = os.writev(self._fd, unwritten(views, self._offset))
            except InterruptedError:
                continue
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EPIPE, errno.ENXIO, errno.EBADF):
                    raise DeviceLost(f"device write failed: {exc.strerror}") from None
                raise
            self._offset += n
            self.bytes_written += n
            if self._offset == size:
                self._queue.popleft()
                self._offset = 0
        return True

    def finish_current(self, timeout: float) -> bool:
        """Complete the message in progress (and drop the rest) before exiting; True if nothing is torn."""
        if not self.in_message:
            self._queue.clear()
            return True
        head = self._queue.popleft()
        self._queue.clear()
        self._queue.append(head)
        deadline = time.monotonic() + timeout
        while self._queue:
            if self.flush():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.error("device did not take the last %d bytes of a message in time",
                          head[1] - self._offset)
                return False
            select.select([], [self._fd], [], remaining)
        return True


def unwritten(views: list[memoryview], offset: int) -> list[memoryview]:
    """What is left of a message's pieces after `offset` bytes, at most IOV_MAX of them."""
    for i, view in enumerate(views):
        if offset < len(view):
            rest = views[i : i + IOV_MAX]
            if offset:
                rest[0] = view[offset:]
            return rest
        offset -= len(view)
    return []
