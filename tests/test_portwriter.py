"""The port writer on a pty: whole messages in order, and a full port is waited on, not hammered."""

from __future__ import annotations

import asyncio
import os
import select
import threading
import tty

from spice_stream_common import protocol as p
from spice_streamd import portwriter
from spice_streamd.portwriter import PortWriter


class CountingWrite:
    """os.writev as the writer thread sees it, counting the calls a full port refused."""

    def __init__(self) -> None:
        self._writev = os.writev
        self.calls = self.refused = self.short = 0
        self.most_pieces = 0

    def __call__(self, fd: int, pieces) -> int:
        self.calls += 1
        self.most_pieces = max(self.most_pieces, len(pieces))
        try:
            n = self._writev(fd, pieces)
        except BlockingIOError:
            self.refused += 1
            raise
        self.short += n < sum(len(piece) for piece in pieces)
        return n


def test_a_frame_larger_than_the_port_goes_whole_and_a_full_port_is_polled(monkeypatch):
    master, slave = os.openpty()
    tty.setraw(slave)
    tty.setraw(master)
    fd = os.open(os.ttyname(slave), os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    counting = CountingWrite()
    monkeypatch.setattr(portwriter.os, "writev", counting)
    # As the relay hands them over: (header, payload), and a frame a worker sent as its parts as
    # (header, *parts), which goes to the port joined (a virtio port would write each piece apart).
    payloads = [b"\xff\xd8" + bytes([i]) * 300_000 for i in range(3)]
    frames = [(p.header(p.MsgType.DATA, len(data)), data) for data in payloads[:2]]
    parts = [payloads[2][i:i + 4000] for i in range(0, len(payloads[2]), 4000)]
    frames.append((p.header(p.MsgType.DATA, len(payloads[2])), *parts))
    expected = b"".join(p.encode(p.MsgType.DATA, data) for data in payloads)
    got = bytearray()

    def drain() -> None:  # the host: reads as fast as the pty gives (4 KB at a time)
        while len(got) < len(expected):
            got.extend(os.read(master, 1 << 16))

    async def run() -> None:
        loop = asyncio.get_running_loop()
        written: list[int] = []
        all_written = asyncio.Event()

        def on_written(msg_type: int, message: tuple[bytes, ...], tag: int) -> None:
            written.append(tag)
            if len(written) == len(frames):
                all_written.set()
            else:
                writer.submit(p.MsgType.DATA, frames[len(written)], len(written))

        writer = PortWriter(fd, loop=loop, stall_s=5.0, on_written=on_written,
                            on_stalled=lambda s: None, on_drained=lambda: None,
                            on_failed=lambda why: None)
        writer.submit(p.MsgType.DATA, frames[0], 0)
        await asyncio.wait_for(all_written.wait(), 20)
        writer.stop()
        assert written == [0, 1, 2]

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        asyncio.run(run())
        reader.join(10)
        assert bytes(got) == expected
        # A pty takes a frame a few KB per write. Writing again right after a short write met
        # EAGAIN about every other call; the writer polls instead.
        assert counting.short >= 9  # a pty takes at most 64 KB a write: each frame took several
        assert counting.refused <= counting.calls // 10, (counting.refused, counting.calls)
        assert counting.most_pieces <= 2  # the 76 parts of the third went as one piece
    finally:
        os.close(fd)
        os.close(master)
        os.close(slave)


def _blocked_port():
    """A pty nobody reads yet: (the writer's fd, the host's end)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    tty.setraw(master)
    fd = os.open(os.ttyname(slave), os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    os.close(slave)
    return fd, master


def _frames_on(master: int, expected_bytes: int) -> list[bytes]:
    """The payloads the host reads, until expected_bytes have come (or 10 s without a byte)."""
    got = bytearray()
    while len(got) < expected_bytes and select.select([master], [], [], 10)[0]:
        got.extend(os.read(master, 1 << 16))
    return [m.payload for m in p.Parser(p.GUEST_TO_HOST_LIMITS).feed(bytes(got))]


def _writing(master: int) -> None:
    """Until the writer has started on the port (it took its first message from the queue)."""
    assert select.select([master], [], [], 10)[0], "nothing written in 10 s"


def _chain(submits, expected: list[bytes]) -> list[int]:
    """A keyframe too large for the port is being written while `submits` ((payload, delta)
    each) come; then the host reads. Asserts the host read `expected` (after the first keyframe)
    and returns the tags the writer reported broken chains for."""
    fd, master = _blocked_port()
    first = b"K" * 200_000
    broken: list[int] = []

    async def run() -> list[bytes]:
        loop = asyncio.get_running_loop()
        writer = PortWriter(fd, loop=loop, stall_s=60.0, on_written=lambda *a: None,
                            on_stalled=lambda s: None, on_drained=lambda: None,
                            on_failed=lambda why: None, on_chain_broken=broken.append)
        writer.submit(p.MsgType.DATA, (p.header(p.MsgType.DATA, len(first)), first), 7)
        _writing(master)
        for payload, delta in submits:
            writer.submit(p.MsgType.DATA, (p.header(p.MsgType.DATA, len(payload)), payload), 7,
                          delta=delta)
        size = sum(p.HEADER_SIZE + len(x) for x in [first, *expected])
        got = await loop.run_in_executor(None, _frames_on, master, size)
        await asyncio.sleep(0)  # the writer's reports, queued on the loop, are taken
        writer.stop()
        return got

    try:
        assert asyncio.run(run()) == [first, *expected]
    finally:
        os.close(fd)
        os.close(master)
    return broken


def test_delta_frames_wait_in_turn_behind_the_frame_being_written():
    deltas = [b"d%d" % i for i in range(portwriter.MAX_WAITING_DELTAS)]
    assert _chain([(d, True) for d in deltas], deltas) == []


def test_one_delta_too_many_breaks_the_chain_until_a_keyframe_and_asks_for_one_once():
    deltas = [b"d%d" % i for i in range(portwriter.MAX_WAITING_DELTAS + 2)]
    # The waiting deltas are dropped by the keyframe (it needs nothing before it); the ones past
    # the bound never wait; the delta after the new keyframe is written.
    broken = _chain([(d, True) for d in deltas] + [(b"key2", False), (b"after", True)],
                    [b"key2", b"after"])
    assert broken == [7]


def test_a_delta_after_a_format_waits_for_a_keyframe():
    fd, master = _blocked_port()
    broken: list[int] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        writer = PortWriter(fd, loop=loop, stall_s=60.0, on_written=lambda *a: None,
                            on_stalled=lambda s: None, on_drained=lambda: None,
                            on_failed=lambda why: None, on_chain_broken=broken.append)
        fmt = p.format_msg(64, 64, p.CODEC_H264)
        writer.submit(p.MsgType.FORMAT, (fmt[:p.HEADER_SIZE], fmt[p.HEADER_SIZE:]), 3)
        writer.submit(p.MsgType.DATA, (p.header(p.MsgType.DATA, 5), b"delta"), 3, delta=True)
        writer.submit(p.MsgType.DATA, (p.header(p.MsgType.DATA, 3), b"key"), 3)
        got = await loop.run_in_executor(None, _frames_on, master, len(fmt) + p.HEADER_SIZE + 3)
        await asyncio.sleep(0)
        writer.stop()
        assert got[-1] == b"key" and b"delta" not in got

    try:
        asyncio.run(run())
    finally:
        os.close(fd)
        os.close(master)
    assert broken == [3]


def test_mjpeg_frames_still_replace_the_one_waiting():
    assert _chain([(b"j1", False), (b"j2", False)], [b"j2"]) == []
