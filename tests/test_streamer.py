"""The streamer's memory stays bounded whatever the screen does while the host is away or slow."""

from __future__ import annotations

import os

from spice_stream_worker import protocol as p
from spice_stream_worker.capture import Changes, Rect
from spice_stream_worker.outbox import Outbox
from spice_stream_worker.streamer import MAX_DAMAGE_RECTS, HostState, Streamer


class StillScreen:
    """The few Screen members the streamer reads before any capture (no X server needed here)."""

    size = (64, 48)

    def pointer_position(self):
        return (0, 0)


def busy(n: int) -> Changes:
    return Changes(damage=[Rect(i % 64, 0, 1, 1) for i in range(n)])


def test_damage_is_not_kept_while_not_streaming():
    r, w = os.pipe()
    s = Streamer(StillScreen(), None, Outbox(w), fps=30, host=HostState())
    for _ in range(1000):
        s.on_screen_changes(busy(50))
    assert s.pending_damage == 0
    os.close(r)
    os.close(w)


def test_damage_is_bounded_while_the_host_does_not_read():
    r, w = os.pipe()
    s = Streamer(StillScreen(), None, Outbox(w), fps=30, host=HostState(codecs=(p.CODEC_MJPEG,)))
    s.start()
    assert s.streaming
    s._need_full = False  # as after a first frame
    for _ in range(1000):
        s.on_screen_changes(busy(50))
        assert s.pending_damage <= MAX_DAMAGE_RECTS
    assert s._need_full  # overflow turns into one whole frame
    os.close(r)
    os.close(w)
