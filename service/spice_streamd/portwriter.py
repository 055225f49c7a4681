"""Writing to the port: a thread that writes one whole message at a time, the latest of each type next."""

from __future__ import annotations

import asyncio
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable

from spice_stream_common import protocol as p
from spice_stream_common.outbox import unwritten

# Latest state wins, written in this order: what describes a frame goes before the frame. At most
# the message being written and one message of each type wait, so a host that stops reading costs
# one stale frame, never a queue of them. A video codec's delta frames are the exception: each
# needs the ones before it, so they wait in turn, up to MAX_WAITING_DELTAS; one more breaks the
# chain (it and the deltas after it are dropped until a keyframe, which the worker is asked for).
ORDER = (p.MsgType.CAPABILITIES, p.MsgType.DEVICE_DISPLAY_INFO, p.MsgType.QUALITY_INDICATOR,
         p.MsgType.FORMAT, p.MsgType.CURSOR_SET, p.MsgType.CURSOR_MOVE, p.MsgType.DATA)
MAX_WAITING_DELTAS = 4
POLL_MS = 100  # how often a waiting writer looks at its stop flag


class PortWriter:
    """Owns the order of bytes on the port (not the fd: the PortRelay opens and closes it).

    A thread, because the port takes a frame a few KiB at a time: one blocking poll() and write()
    per piece costs a few microseconds, a turn of the event loop per piece several times that.
    Everything it reports (a message written, a stall, the queue drained, a failure) runs on the
    event loop through call_soon_threadsafe.
    """

    def __init__(self, fd: int, *, loop: asyncio.AbstractEventLoop, stall_s: float,
                 on_written: Callable[[int, tuple[bytes, ...], int], None],
                 on_stalled: Callable[[float], None],
                 on_drained: Callable[[], None],
                 on_failed: Callable[[str], None],
                 on_chain_broken: Callable[[int], None] | None = None) -> None:
        self._fd = fd
        self._loop = loop
        self._stall_s = stall_s
        self._on_written = on_written
        self._on_stalled = on_stalled
        self._on_drained = on_drained
        self._on_failed = on_failed
        self._on_chain_broken = on_chain_broken
        self._cond = threading.Condition()
        self._pending: dict[int, tuple[tuple[bytes | p.Frame, ...], int]] = {}  # but DATA
        self._frames: deque[tuple[tuple[bytes | p.Frame, ...], int]] = deque()  # DATA, in turn
        self._broken = False  # a delta was dropped (or its chain's start): none until a keyframe
        self._key_asked = False  # on_chain_broken said so since the chain broke
        self._stop = False
        self._stalled = False  # the writer thread's own: told the loop, not yet drained
        self.dropped_frames = 0
        self._thread = threading.Thread(target=self._run, name="stream port writer", daemon=True)
        self._thread.start()

    def submit(self, msg_type: int, message: tuple[bytes | p.Frame, ...], tag: int = 0,
               delta: bool = False) -> None:
        """Queue a whole message, as its pieces (header and payload, written with one writev; a
        frame the channel holds as a worker's parts, a p.Frame after the header, is taken and
        joined when its turn comes); it
        replaces a waiting one of its type (a FORMAT also drops the waiting frames: they have the
        old size or codec, and the worker sends a keyframe of the new). A `delta` frame waits
        behind the frames before it instead, or breaks the chain (see ORDER). `tag` comes back
        with on_written (whose message it was) and on_chain_broken."""
        with self._cond:
            if msg_type == p.MsgType.DATA:
                if not delta:
                    self._drop_frames()
                    self._broken = self._key_asked = False
                elif self._broken or len(self._frames) >= MAX_WAITING_DELTAS:
                    self.dropped_frames += 1
                    self._broken = True
                    if not self._key_asked and self._on_chain_broken is not None:
                        self._key_asked = True
                        self._loop.call_soon_threadsafe(self._on_chain_broken, tag)
                    return
                self._frames.append((message, tag))
            else:
                if msg_type == p.MsgType.FORMAT:
                    self._drop_frames()
                    # What follows a FORMAT starts with a keyframe (asked for if a delta comes).
                    self._broken, self._key_asked = True, False
                self._pending[msg_type] = (message, tag)
            self._cond.notify()

    def _drop_frames(self) -> None:
        self.dropped_frames += len(self._frames)
        self._frames.clear()

    def drop_waiting(self) -> None:
        """Forget what waits; the message being written still ends whole."""
        with self._cond:
            self._pending.clear()
            self._frames.clear()
            # The next worker (or this one again) starts with a keyframe.
            self._broken, self._key_asked = True, False

    def stop(self) -> None:
        """Stop at once, even mid-message (the port is being closed: the host resets)."""
        with self._cond:
            self._stop = True
            self._pending.clear()
            self._frames.clear()
            self._cond.notify()
        self._thread.join()

    def _next(self) -> tuple[int, tuple[tuple[bytes | p.Frame, ...], int]] | None:
        with self._cond:
            while not self._stop:
                nxt = next((t for t in ORDER if t in self._pending
                            or (t == p.MsgType.DATA and self._frames)), None)
                if nxt == p.MsgType.DATA:
                    return nxt, self._frames.popleft()
                if nxt is not None:
                    return nxt, self._pending.pop(nxt)
                if self._stalled:
                    self._stalled = False
                    self._loop.call_soon_threadsafe(self._on_drained)
                self._cond.wait()
            return None

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        while (item := self._next()) is not None:
            if not self._write(poller, *item):
                return
            del item  # the message written is not kept while the next is awaited

    def _write(self, poller: select.poll, msg_type: int,
               queued: tuple[tuple[bytes | p.Frame, ...], int]) -> bool:
        """Write one message whole; False if the writer must stop. A method of its own so that
        nothing of a frame outlives its writing (the thread then waits with no frame held)."""
        message, tag = queued
        if len(message) == 2 and not isinstance(message[1], bytes | bytearray | memoryview):
            # A frame a worker's channel holds in parts: taken now, when the port takes it
            # (never per message received), unless the worker has changed it since; then a
            # newer one is on its way, or none passed the channel's check.
            # Joined at once with its header (a virtio port writes each piece of a writev
            # apart), and nothing else of it kept: the worker's next frame may replace its
            # parts while this one is written.
            joined = message[1].joined(message[0])
            if joined is None:
                with self._cond:
                    self.dropped_frames += 1
                return True
            message = (joined,)
            del joined
        if len(message) > 2:
            # A frame from a worker's parts, joined here, once per frame the port takes: a
            # virtio port has no writev of its own, the kernel writes each piece apart, and
            # 70 parts would be 70 buffers for the host instead of 9.
            message = (b"".join(message),)
        views = [memoryview(piece) for piece in message]
        size = sum(len(v) for v in views)
        offset = 0
        waiting_since: float | None = None
        while offset < size:
            if self._stop:
                return False
            try:
                n = os.writev(self._fd, unwritten(views, offset))
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:
                self._loop.call_soon_threadsafe(self._on_failed,
                                                f"write failed: {e.strerror}")
                return False
            if n:
                offset += n
                waiting_since = None
                if offset < size:
                    # A short write: the port's buffer is full, and writing again at once
                    # would mostly meet EAGAIN (a pty takes a frame 6 KB at a time: half the
                    # writes were that). poll() returns at once where there is room again.
                    poller.poll(POLL_MS)
                continue
            now = time.monotonic()
            if waiting_since is None:
                waiting_since = now
            elif not self._stalled and now - waiting_since >= self._stall_s:
                # Nothing taken for this long: the host has stopped reading.
                self._stalled = True
                self._loop.call_soon_threadsafe(self._on_stalled, now - waiting_since)
            poller.poll(POLL_MS)
        self._loop.call_soon_threadsafe(self._on_written, msg_type, message, tag)
        return True
