"""The worker's socket: a whole frame fits in flight; a worker's flood costs what its size does."""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import threading
import time
import tty
from collections.abc import Callable

import pytest

from spice_stream_common import frameparts as fp
from spice_stream_common import protocol as p
from spice_streamd import guestmessages
from spice_streamd.portrelay import PortRelay
from spice_streamd.workerchannel import WorkerChannel, socket_pair
from tests.support.waiting import wait_async


@pytest.mark.skipif(os.geteuid() != 0, reason="the service (root) sets the buffer past wmem_max")
def test_a_whole_frame_goes_in_one_write():
    ours, theirs = socket_pair()
    try:
        theirs.setblocking(False)
        frame = b"\xff" * 600_000  # a 1080p JPEG is about 300 KB; the default buffer takes ~200 KB
        assert theirs.send(frame) == len(frame)
    finally:
        ours.close()
        theirs.close()


# --- what a worker's flood costs the service -----------------------------------------------------

PARTS = 1088  # frameparts.MAX_PARTS: the most parts a frame may have


def noop_parts() -> bytes:
    """A FRAME_PARTS message that changes nothing in a frame of PARTS parts: 12 bytes."""
    return p.header(fp.FRAME_PARTS, fp.COUNT.size) + fp.COUNT.pack(PARTS)


class Relayed:
    """A worker channel relayed to a real PortRelay on a pty whose host side is drained, as the
    supervisor wires them; the worker's end is `theirs`."""

    def __init__(self, on_message: Callable[[p.Message], None] = lambda m: None) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self._stop = threading.Event()
        self._drain = threading.Thread(target=self._drain_host, daemon=True)
        self._drain.start()
        self.relay = PortRelay(os.ttyname(self.slave))
        self.relay.start()
        ours, self.theirs = socket_pair()

        def deliver(msg: p.Message) -> None:
            self.relay.submit(msg)
            on_message(msg)

        self.channel = WorkerChannel(
            ours, label="worker", relayed=True, deliver=deliver,
            check=lambda m: guestmessages.refusal(m, self.relay.host_caps, self.relay.format_sent))
        self.relay.attach(self.channel.send)

    def _drain_host(self) -> None:
        while not self._stop.is_set():
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    os.read(self.master, 1 << 20)
                except OSError:
                    return

    def a_large_frame(self) -> bytes:
        """FORMAT, then a whole frame of PARTS parts, as the worker sends them."""
        parts = [b"\xff\xd8header"] + [bytes(30)] * (PARTS - 2) + [b"\xff\xd9"]
        return p.format_msg(1920, 1080) + b"".join(fp.message(parts, range(PARTS)))

    def close(self) -> None:
        self.channel.close()
        self.theirs.close()
        self.relay.stop("test over")
        self._stop.set()
        self._drain.join(5)
        os.close(self.master)
        os.close(self.slave)


def send_all(sock: socket.socket, data: bytes) -> None:
    """The worker's writes, from a thread: the test may close the socket under it."""
    try:
        sock.sendall(data)
    except OSError:
        pass


def cpu_per_message(message: bytes, count: int) -> float:
    """Seconds of the event loop's CPU per message, for a flood of `count` of them after a large
    frame, through a real socket, channel, check and port relay."""
    async def run() -> float:
        handed = 0
        done = asyncio.Event()

        def on_message(msg: p.Message) -> None:
            nonlocal handed
            handed += 1
            if handed == count + 2:  # FORMAT, the frame, then the flood
                done.set()

        relayed = Relayed(on_message)
        try:
            data = relayed.a_large_frame() + message * count
            sender = threading.Thread(target=send_all, args=(relayed.theirs, data))
            cpu = time.thread_time()
            sender.start()
            await asyncio.wait_for(done.wait(), 120)
            cpu = time.thread_time() - cpu
            sender.join()
            return cpu / count
        finally:
            relayed.close()

    return asyncio.run(run())


def test_a_flood_of_frame_parts_costs_what_a_flood_of_cursor_moves_does():
    # A message that changes nothing in a 1088-part frame used to cost a copy of the frame's
    # parts list (about 30 us against 5 us for a CURSOR_MOVE here): its cost must follow its size.
    # The best of three of each, interleaved: CPU time still varies with what else the machine
    # runs (other test suites, a VM), and the bug this guards against cost six times as much.
    count = 20_000
    cursor = parts = float("inf")
    for _ in range(3):
        cursor = min(cursor, cpu_per_message(p.cursor_move(1, 2), count))
        parts = min(parts, cpu_per_message(noop_parts(), count))
    assert parts < 2.5 * cursor, (f"{parts * 1e6:.1f} us per FRAME_PARTS message, "
                                  f"{cursor * 1e6:.1f} us per CURSOR_MOVE")


def test_a_flood_does_not_hold_the_event_loop():
    # A timer that falls due while a worker floods fires within a bound: each wake-up of the
    # channel has a budget, the rest of the flood waits for the next turn of the loop.
    async def run() -> float:
        loop = asyncio.get_running_loop()
        due = asyncio.get_running_loop().create_future()
        late: list[float] = []

        def on_message(msg: p.Message) -> None:
            if msg.type == p.MsgType.DATA and not late:
                late.append(time.monotonic())  # the flood is being read: a timer falls due now
                loop.call_later(0, lambda: due.done() or due.set_result(time.monotonic() - late[0]))

        relayed = Relayed(on_message)
        try:
            flood = relayed.a_large_frame() + noop_parts() * 400_000  # about 4.6 MiB
            sender = threading.Thread(target=send_all, args=(relayed.theirs, flood), daemon=True)
            sender.start()
            return await asyncio.wait_for(due, 60)
        finally:
            relayed.close()

    lateness = asyncio.run(run())
    assert lateness < 0.25, f"a timer fired {lateness * 1000:.0f} ms late during a flood"


def test_a_standby_channel_reads_only_the_capabilities():
    # The worker of a background session: its CAPABILITIES are taken, its flood is not even read
    # (it stays in the kernel's bounded socket buffer) until the channel is relayed.
    async def run() -> None:
        ours, theirs = socket_pair()
        got: list[p.Message] = []
        channel = WorkerChannel(ours, label="worker", check=lambda m: None, deliver=got.append)
        flood = p.capabilities(b"\x01") + p.format_msg(64, 48) + noop_parts() * 20_000
        theirs.setblocking(False)
        sent = theirs.send(flood)
        await wait_async(lambda: got, what="the capabilities")
        for _ in range(20):  # turns of the loop in which the flood would be read
            await asyncio.sleep(0.005)
        assert [m.type for m in got] == [p.MsgType.CAPABILITIES]
        assert channel.held_bytes == 0
        assert sent > 200_000  # the flood is in the socket, unread
        channel.relay(True)
        await wait_async(lambda: len(got) == 2, what="the FORMAT once relayed")
        assert got[1].type == p.MsgType.FORMAT
        channel.close()
        theirs.close()

    asyncio.run(run())


def test_a_frame_left_from_before_standby_is_dropped_quietly_then_the_stream_goes_on(caplog):
    # A worker's frame that sat in the socket while its channel stood by comes out once relayed,
    # before the worker's new FORMAT: stale, dropped, and said as such (VM: "sent invalid data").
    async def run() -> None:
        ours, theirs = socket_pair()
        got: list[p.Message] = []
        channel = WorkerChannel(ours, label="worker", check=lambda m: None, deliver=got.append)
        theirs.sendall(p.capabilities(b"\x01"))
        await wait_async(lambda: got, what="the capabilities")
        frame = p.encode(p.MsgType.DATA, b"\xff\xd8" + bytes(5000))
        theirs.sendall(frame)  # unread: the channel stands by
        channel.relay(True)
        theirs.sendall(p.format_msg(64, 48) + frame)
        await wait_async(lambda: len(got) == 3, what="the FORMAT and the frame after it")
        assert [m.type for m in got] == [p.MsgType.CAPABILITIES, p.MsgType.FORMAT, p.MsgType.DATA]
        channel.close()
        theirs.close()

    with caplog.at_level(logging.INFO, logger="spice_streamd.workerchannel"):
        asyncio.run(run())
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (logging.INFO, "worker: a frame before its FORMAT (one sent before its stream started "
            "again), dropped (5010 bytes)") in said
    assert not [m for level, m in said if level >= logging.WARNING], said


def test_a_frame_before_any_format_from_a_worker_relayed_is_refused_once_per_interval(caplog):
    # The same without standby: a frame the worker sends with no FORMAT is still dropped, and
    # after the first a flood of them costs no more log lines than the limiter allows.
    async def run() -> None:
        ours, theirs = socket_pair()
        got: list[p.Message] = []
        channel = WorkerChannel(ours, label="worker", check=lambda m: None, deliver=got.append,
                                relayed=True)
        theirs.sendall(p.encode(p.MsgType.DATA, bytes(100)) * 50 + p.format_msg(64, 48))
        await wait_async(lambda: got, what="the FORMAT after the frames")
        assert [m.type for m in got] == [p.MsgType.FORMAT]
        channel.close()
        theirs.close()

    with caplog.at_level(logging.INFO, logger="spice_streamd.workerchannel"):
        asyncio.run(run())
    assert 1 <= len(caplog.records) <= 2


def test_no_picture_is_heard_by_the_service_and_never_relayed():
    # A worker on a locked screen says it has no picture: the channel notes when, for the
    # watchdog, and hands nothing on; the same type carrying bytes is a violation, dropped.
    async def run() -> None:
        delivered: list[int] = []
        relayed = Relayed(lambda m: delivered.append(m.type))
        try:
            assert relayed.channel.last_waiting_at is None
            before = time.monotonic()
            relayed.theirs.sendall(p.header(fp.NO_PICTURE, 0) + p.header(fp.NO_PICTURE, 4)
                                   + b"junk" + p.cursor_move(1, 2))
            for _ in range(500):
                if delivered:
                    break
                await asyncio.sleep(0.01)
            assert delivered == [p.MsgType.CURSOR_MOVE]  # the message after them still arrives
            assert relayed.channel.last_waiting_at is not None
            assert relayed.channel.last_waiting_at >= before
            assert relayed.channel.last_frame_at is None
        finally:
            relayed.close()

    asyncio.run(run())


def test_unchanged_is_heard_by_the_service_and_never_relayed():
    # A worker on a static screen says its last frame is still its picture: the channel notes
    # when (the watchdog, Streaming) and hands nothing on; with bytes it is a violation, dropped.
    async def run() -> None:
        delivered: list[int] = []
        relayed = Relayed(lambda m: delivered.append(m.type))
        try:
            assert getattr(relayed.channel, "last_unchanged_at", None) is None
            before = time.monotonic()
            relayed.theirs.sendall(fp.unchanged() + p.header(fp.UNCHANGED, 4) + b"junk"
                                   + p.cursor_move(1, 2))
            await wait_async(lambda: delivered, what="the message after them")
            assert delivered == [p.MsgType.CURSOR_MOVE]
            heard = getattr(relayed.channel, "last_unchanged_at", None)
            assert heard is not None and heard >= before, "UNCHANGED not heard"
            assert relayed.channel.last_frame_at is None and relayed.channel.last_waiting_at is None
            # In standby its word no longer counts: the host's picture is another worker's.
            relayed.channel.relay(False)
            assert relayed.channel.last_unchanged_at is None
        finally:
            relayed.close()

    asyncio.run(run())


def test_a_delta_frame_is_handed_on_as_data_marked_and_bounded_by_the_format():
    # Issue 18: DELTA (a video codec's frame that needs the ones before it) reaches the relay as
    # DATA marked delta; before a FORMAT it is not read (no frame limit yet), as DATA is not.
    async def run() -> None:
        got: list[p.Message] = []
        ours, theirs = socket_pair()
        channel = WorkerChannel(ours, label="worker", relayed=True, deliver=got.append,
                                check=lambda m: None)
        try:
            theirs.sendall(p.header(fp.DELTA, 3) + b"\x00\x00\x01")  # before any FORMAT
            theirs.sendall(p.format_msg(64, 64, p.CODEC_H264))
            theirs.sendall(p.encode(p.MsgType.DATA, b"\x00\x00\x00\x01key"))
            theirs.sendall(p.header(fp.DELTA, 6) + b"\x00\x00\x01\x41ab")
            await wait_async(lambda: len(got) >= 3, 10, "three messages handed on")
            assert [(m.type, bytes(m.payload), m.delta) for m in got] == [
                (p.MsgType.FORMAT, p.format_msg(64, 64, p.CODEC_H264)[p.HEADER_SIZE:], False),
                (p.MsgType.DATA, b"\x00\x00\x00\x01key", False),
                (p.MsgType.DATA, b"\x00\x00\x01\x41ab", True)]
        finally:
            channel.close()
            theirs.close()

    asyncio.run(run())
