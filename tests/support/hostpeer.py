"""A raw pty standing in for the virtio port, and a test peer playing the host on its master side."""

from __future__ import annotations

import os
import select
import threading
import time
import tty
from collections.abc import Callable

from spice_stream_common import protocol as p


class RawPty:
    """Owns both ends of a pty whose slave is raw, like a virtio port: bytes in, bytes out."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)

    def close(self) -> None:
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


class HostPeer:
    """Reads every guest message from the master side in a thread and can answer like libspice-server."""

    def __init__(self, master_fd: int) -> None:
        self.fd = master_fd
        self.parser = p.Parser(p.GUEST_TO_HOST_LIMITS)
        self.messages: list[p.Message] = []
        self.violations: list[p.Violation] = []
        self.raw_bytes = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="host-peer-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            r, _, _ = select.select([self.fd], [], [], 0.1)
            if not r:
                continue
            try:
                data = os.read(self.fd, 1 << 20)
            except OSError:
                return
            if not data:
                return
            items = self.parser.feed(data)
            with self._cond:
                self.raw_bytes += len(data)
                for item in items:
                    (self.messages if isinstance(item, p.Message) else self.violations).append(item)
                self._cond.notify_all()

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def start(self, codecs: tuple[int, ...] = (p.CODEC_MJPEG,)) -> None:
        self.send(p.start_stop(list(codecs)))

    def stop(self) -> None:
        self.send(p.start_stop([]))

    def of_type(self, msg_type: int) -> list[p.Message]:
        with self._cond:
            return [m for m in self.messages if m.type == msg_type]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out after {timeout}s waiting for {what}; got types "
                        f"{[m.type for m in self.messages][-20:]}, violations {self.violations[:3]}"
                    )
                self._cond.wait(min(remaining, 0.1))

    def wait_count(self, msg_type: int, count: int, timeout: float = 10.0) -> list[p.Message]:
        self.wait_for(lambda: sum(m.type == msg_type for m in self.messages) >= count, timeout,
                      f"{count} messages of type {msg_type}")
        return self.of_type(msg_type)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
