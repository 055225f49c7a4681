"""The write side of the device: whole messages, in order, never torn by partial writes or signals."""

from __future__ import annotations

import errno
import logging
import os
import select
import time
from collections import deque

from .errors import DeviceLost

log = logging.getLogger(__name__)

# Cursor and control messages queue behind a frame; frames themselves are never queued (see Streamer), so
# this bound is only reached by a host that stopped reading altogether.
MAX_QUEUED = 64
DROP_LOG_INTERVAL_S = 10.0


class Outbox:
    """Owns nothing but the order of bytes on `fd`: the fd itself belongs to whoever opened it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._queue: deque[tuple[memoryview, bool]] = deque()
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
    def frames_queued(self) -> int:
        return sum(1 for _, is_frame in self._queue if is_frame)

    def send(self, message: bytes, *, frame: bool = False) -> None:
        if len(self._queue) >= MAX_QUEUED:
            # Drop the newest: the head may be in progress and must finish whole.
            self.dropped += 1
            now = time.monotonic()
            if now - self._drop_logged_at >= DROP_LOG_INTERVAL_S:
                log.warning("the host is not reading the device: %d messages dropped so far", self.dropped)
                self._drop_logged_at = now
            return
        self._queue.append((memoryview(message), frame))

    def flush(self) -> bool:
        """Write as much as the device takes now; True when everything queued is out."""
        while self._queue:
            data, _ = self._queue[0]
            try:
                n = os.write(self._fd, data[self._offset :])
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
            if self._offset == len(data):
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
                          len(head[0]) - self._offset)
                return False
            select.select([], [self._fd], [], remaining)
        return True
