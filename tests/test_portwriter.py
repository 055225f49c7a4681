"""The port writer on a pty: whole messages in order, and a full port is waited on, not hammered."""

from __future__ import annotations

import asyncio
import os
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
