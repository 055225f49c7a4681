"""Whole messages reach the device even when it takes them a few bytes at a time."""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from spice_stream_common import protocol as p
from spice_stream_common.exitcodes import DeviceLost
from spice_stream_common.outbox import MAX_QUEUED, Outbox
from tests.support.hostpeer import RawPty


def test_large_messages_survive_partial_writes_on_a_pty():
    pty = RawPty()
    os.set_blocking(pty.slave, False)
    out = Outbox(pty.slave)
    frames = [bytes([i]) * (300_000 + i) for i in range(3)]
    for f in frames:
        out.send(p.data_header(len(f)) + f, frame=True)
    out.send(p.cursor_move(5, 6))
    received = bytearray()
    parser = p.Parser(p.GUEST_TO_HOST_LIMITS)
    msgs = []
    deadline = time.monotonic() + 20
    partial_seen = False
    while time.monotonic() < deadline:
        done = out.flush()
        partial_seen |= out.in_message
        try:
            chunk = os.read(pty.master, 4096)  # a slow host: small reads
        except BlockingIOError:
            chunk = b""
        received += chunk
        msgs += parser.feed(chunk)
        if done and len(msgs) == 4:
            break
    pty.close()
    assert partial_seen, "the pty never forced a partial write: the test did not exercise it"
    assert [m.payload for m in msgs[:3]] == frames
    assert msgs[3] == p.Message(p.MsgType.CURSOR_MOVE, p.CURSOR_MOVE.pack(5, 6))


def test_a_message_given_in_pieces_arrives_whole_through_partial_writes():
    # The worker hands a frame over as the encoder's pieces (header, bands, EOI), never joined:
    # partial writes end anywhere in a piece, and a frame can have more pieces than one writev takes.
    pty = RawPty()
    os.set_blocking(pty.slave, False)
    out = Outbox(pty.slave)
    rng = random.Random(7)
    frames = []
    for n in (3, 1500):  # a few pieces; more than IOV_MAX
        pieces = [rng.randbytes(rng.choice((0, 1, 7, 300, 4000))) for _ in range(n)]
        payload = b"".join(pieces)
        frames.append(payload)
        out.send(p.data_header(len(payload)), *pieces, frame=True)
    out.send(p.cursor_move(5, 6))
    parser = p.Parser(p.GUEST_TO_HOST_LIMITS)
    msgs = []
    partial_seen = False
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(msgs) < 3:
        out.flush()
        partial_seen |= out.in_message
        try:
            msgs += parser.feed(os.read(pty.master, 4096))
        except BlockingIOError:
            pass
    pty.close()
    assert partial_seen
    assert [m.payload for m in msgs[:2]] == frames
    assert msgs[2] == p.Message(p.MsgType.CURSOR_MOVE, p.CURSOR_MOVE.pack(5, 6))


def test_finish_current_completes_the_message_in_progress_and_drops_the_rest():
    pty = RawPty()
    os.set_blocking(pty.slave, False)
    out = Outbox(pty.slave)
    frame = b"x" * 200_000
    out.send(p.data_header(len(frame)) + frame, frame=True)
    out.send(p.cursor_move(1, 1))
    out.flush()
    assert out.in_message
    got = bytearray()

    def drain():
        end = time.monotonic() + 10
        while time.monotonic() < end and len(got) < 8 + len(frame):
            try:
                got.extend(os.read(pty.master, 65536))
            except BlockingIOError:
                time.sleep(0.001)

    os.set_blocking(pty.master, False)
    t = threading.Thread(target=drain)
    t.start()
    assert out.finish_current(timeout=10)
    t.join()
    pty.close()
    assert bytes(got) == p.data_header(len(frame)) + frame  # the queued cursor move was not started


def test_finish_current_gives_up_when_the_host_never_reads():
    pty = RawPty()
    os.set_blocking(pty.slave, False)
    out = Outbox(pty.slave)
    out.send(b"y" * 1_000_000, frame=True)
    out.flush()
    t0 = time.monotonic()
    assert out.finish_current(timeout=0.3) is False
    assert time.monotonic() - t0 < 3
    pty.close()


def test_queue_is_bounded_and_drops_are_logged_once(caplog):
    r, w = os.pipe()
    os.set_blocking(w, False)
    out = Outbox(w)
    for _ in range(MAX_QUEUED + 10):
        out.send(p.cursor_move(0, 0))
    assert out.dropped == 10
    assert caplog.text.count("the host is not reading the device") == 1
    os.close(r)
    with pytest.raises(DeviceLost):
        out.flush()
    os.close(w)
