"""The streamer: bounded memory while the host is away or slow; no frame for what changed nothing."""

from __future__ import annotations

import os
import socket

import pytest
from Xlib.ext import xtest

from spice_stream_common import frameparts
from spice_stream_common import protocol as p
from spice_stream_common.outbox import MAX_QUEUED, Outbox
from spice_stream_worker.encoder import JpegEncoder
from spice_stream_worker.sources.x11 import Changes, Rect, Screen
from spice_stream_worker.streamcodec import StreamCodec
from spice_stream_worker.streamer import (
    HEARTBEAT_S,
    MAX_DAMAGE_RECTS,
    REFRESH_AFTER_S,
    HostState,
    Streamer,
)
from tests.support.xserver import Painter, start_xvfb


class StillScreen:
    """The few Screen members the streamer reads before any capture (no X server needed here)."""

    size = (64, 48)
    live = True

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


# --- with a real X server: what reaches the device for drawing that changes nothing ---------------

def sent_types(read_fd: int) -> list[int]:
    """Message types written so far (the pipe holds them whole: a few small ones and frames)."""
    parser = p.Parser(p.GUEST_TO_HOST_LIMITS)
    data = b""
    while True:
        try:
            chunk = os.read(read_fd, 1 << 20)
        except BlockingIOError:
            break
        data += chunk
    return [m.type for m in parser.feed(data) if isinstance(m, p.Message)]


@pytest.fixture
def xscreen(monkeypatch):
    """A real X server, a client drawing on it, and the worker's Screen of it."""
    server = start_xvfb(320, 240)
    monkeypatch.setenv("DISPLAY", server.display)
    monkeypatch.setenv("XAUTHORITY", server.xauthority)
    painter = Painter(server)
    screen = Screen()
    try:
        yield screen, painter
    finally:
        screen.close()
        painter.close()
        server.stop()


@pytest.fixture
def live(xscreen, device):
    screen, painter = xscreen
    r, w = device
    outbox = Outbox(w)
    streamer = Streamer(screen, StreamCodec(JpegEncoder()), outbox, fps=1000,
                        host=HostState(codecs=(p.CODEC_MJPEG,)))
    yield streamer, screen, painter, outbox, r


def step(streamer: Streamer, screen: Screen, painter: Painter, outbox: Outbox) -> None:
    """Deliver what X reported (a round trip orders it first), then let the streamer act."""
    painter.sync()
    screen.pointer_position()
    streamer.on_screen_changes(screen.poll())
    streamer._next_frame_at = 0.0  # no pacing wait: each step may send a frame
    streamer.tick()
    assert outbox.flush()


def test_drawing_the_same_pixels_sends_no_frame(live):
    streamer, screen, painter, outbox, r = live
    painter.fill(0, 0, 320, 240, (0, 0, 0))
    painter.fill(20, 20, 100, 50, (7, 7, 7))
    streamer.start()
    step(streamer, screen, painter, outbox)
    assert p.MsgType.DATA in sent_types(r)  # the first, whole frame
    for _ in range(5):
        painter.fill(20, 20, 100, 50, (7, 7, 7))
        step(streamer, screen, painter, outbox)
    assert p.MsgType.DATA not in sent_types(r)
    assert streamer.counters.false_damage >= 1
    painter.fill(20, 20, 10, 10, (200, 7, 7))  # a real change still goes out
    step(streamer, screen, painter, outbox)
    assert sent_types(r).count(p.MsgType.DATA) == 1


def test_pointer_motion_alone_sends_no_frame(live):
    streamer, screen, painter, outbox, r = live
    painter.fill(0, 0, 320, 240, (30, 60, 90))
    streamer.start()
    step(streamer, screen, painter, outbox)
    assert p.MsgType.DATA in sent_types(r)
    frames = streamer.counters.frames
    moves = 0
    for i in range(20):
        xtest.fake_input(painter.display, 6, x=10 + 7 * i, y=20 + 5 * i)  # 6 = MotionNotify
        step(streamer, screen, painter, outbox)
        streamer._last_pointer_at = -1e9  # no CURSOR_MOVE pacing between steps
        moves += sent_types(r).count(p.MsgType.CURSOR_MOVE)
    assert moves >= 1
    assert streamer.counters.frames == frames


def test_on_the_service_socket_a_small_change_sends_only_its_parts(xscreen):
    # The worker as the service runs it: a socket, FRAME_PARTS. What the service assembles is the
    # very JPEG of the screen, and a change of a few pixels costs a fraction of the frame.
    screen, painter = xscreen
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    outbox = Outbox(theirs.fileno())
    streamer = Streamer(screen, StreamCodec(JpegEncoder()), outbox, fps=1000,
                        host=HostState(codecs=(p.CODEC_MJPEG,)), frame_parts=frameparts.Sender())
    parser = p.Parser(frameparts.WORKER_CHANNEL_LIMITS)
    assembler = frameparts.Assembler()

    def sent() -> list[tuple[int, bytes]]:
        """(message size, assembled frame) of each frame the streamer sent since the last call."""
        data = b""
        while True:
            try:
                data += ours.recv(1 << 20)
            except BlockingIOError:
                break
        return [(len(m.payload), b"".join(assembler.apply(m.payload))) for m in parser.feed(data)
                if isinstance(m, p.Message) and m.type == frameparts.FRAME_PARTS]

    try:
        for x in range(0, 320, 20):
            painter.fill(x, 0, 20, 240, ((x * 7) % 256, 90, 200 - x % 200))
        streamer.start()
        step(streamer, screen, painter, outbox)
        [(first_size, first)] = sent()
        # The first spliced frame after a whole encode carries every part once (a new layout);
        # from then on a change carries its own.
        for n, (x, colour) in enumerate([(150, (250, 250, 0)), (60, (0, 250, 250))]):
            painter.fill(x, 100, 20, 12, colour)
            step(streamer, screen, painter, outbox)
            [(size, frame)] = sent()
            whole = JpegEncoder().encode(screen.grab(None))
            assert frame == whole != first
            if n:
                assert size < len(whole) / 4, (size, len(whole))
        assert first_size > len(first)  # the first frame carries every part
    finally:
        ours.close()
        theirs.close()


# --- a source whose picture comes and goes (a GNOME screen cast on the lock screen) --------------------

class ComingAndGoing:
    size = (32, 32)
    live = False

    def grab(self, rects=None):
        from spice_stream_worker.source import Frame

        return Frame(32, 32, 128, memoryview(bytearray(32 * 32 * 4)), rects)

    def pointer_position(self):
        return (0, 0)


def test_no_frame_while_the_source_has_no_picture_nor_while_its_picture_is_static(device):
    r, w = device
    now = [0.0]
    source = ComingAndGoing()
    out = Outbox(w)
    s = Streamer(source, StreamCodec(JpegEncoder()), out, fps=30, host=HostState(codecs=(p.CODEC_MJPEG,)),
                 clock=lambda: now[0])
    s.start()
    assert s.streaming
    assert s.next_deadline() is None  # nothing due: the loop sleeps, no busy wait
    for now[0] in (0.0, 1.0, 5.0):
        s.tick()
    assert out.flush() and sent_types(r) == [p.MsgType.CAPABILITIES]
    assert s.state()["live"] is False
    # The picture is back (poll() says resized): a whole frame at once.
    source.live = True
    s.on_screen_changes(Changes(resized=True))
    assert s.next_deadline() is not None
    s.tick()
    assert out.flush() and sent_types(r) == [p.MsgType.FORMAT, p.MsgType.DATA]
    # Sent again REFRESH_AFTER_S after it (a client drops a late MJPEG frame), then never again.
    sent_at = now[0]
    for at in REFRESH_AFTER_S:
        assert s.next_deadline() == sent_at + at
        now[0] = sent_at + at
        s.tick()
        assert out.flush() and sent_types(r) == [p.MsgType.DATA]
    now[0] = 15.0  # a static picture is not sent again (to the port: nothing at all)
    assert s.next_deadline() is None
    s.tick()
    assert out.flush() and sent_types(r) == []
    # A change, and gone before its refresh: the last frame is not sent again as if it were
    # current.
    s.on_screen_changes(Changes(resized=True))
    s.tick()
    assert out.flush() and sent_types(r) == [p.MsgType.DATA]
    source.live = False
    assert s.next_deadline() is None
    for now[0] in (13.0, 20.0):
        s.tick()
    assert out.flush() and sent_types(r) == []


def test_without_a_picture_the_service_hears_no_picture_and_the_port_nothing():
    # On the service's socket (frame parts) a worker with no picture says so every
    # HEARTBEAT_S, for the watchdog; written to the port itself it stays silent (the host
    # knows no such type).
    from spice_stream_common import frameparts

    for to_service in (True, False):
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        now = [0.0]
        out = Outbox(w)
        s = Streamer(ComingAndGoing(), StreamCodec(JpegEncoder()), out, fps=30,
                     host=HostState(codecs=(p.CODEC_MJPEG,)), clock=lambda now=now: now[0],
                     frame_parts=frameparts.Sender() if to_service else None)
        try:
            s.start()
            parser = p.Parser(frameparts.WORKER_CHANNEL_LIMITS)
            got = []
            for now[0] in (0.0, 0.5, 1.0, 2.1, 3.0, 4.3):
                s.tick()
                assert out.flush()
                try:
                    got += [m.type for m in parser.feed(os.read(r, 1 << 16))
                            if isinstance(m, p.Message)]
                except BlockingIOError:
                    pass
            if to_service:
                assert got == [p.MsgType.CAPABILITIES] + [frameparts.NO_PICTURE] * 3, got
                assert s.next_deadline() == 4.3 + HEARTBEAT_S
            else:
                assert got == [p.MsgType.CAPABILITIES], got
                assert s.next_deadline() is None
        finally:
            os.close(r)
            os.close(w)


class StaticPicture(ComingAndGoing):
    live = True


def static_streamer(out: Outbox, now: list[float], frame_parts=None) -> Streamer:
    """A streamer of a static, live picture, asked for MJPEG, on the clock `now[0]`."""
    return Streamer(StaticPicture(), StreamCodec(JpegEncoder()), out, fps=30,
                    host=HostState(codecs=(p.CODEC_MJPEG,)), clock=lambda: now[0],
                    frame_parts=frame_parts)


def run_for(s: Streamer, out: Outbox, r: int, until: float, now: list[float]) -> list[tuple[float, int]]:
    """As the worker's loop does: tick whenever next_deadline() has come, in steps of 0.25 s (exact
    in binary) up to `until`; (time, type) of each message written. Once ticked, the deadline must
    never be the present: that would be a busy loop."""
    parser = p.Parser(frameparts.WORKER_CHANNEL_LIMITS)
    got = []
    for i in range(round(now[0] * 4) + 1, round(until * 4) + 1):
        now[0] = i / 4
        deadline = s.next_deadline()
        if deadline is not None and deadline <= now[0]:
            s.tick()
            assert s.next_deadline() is None or s.next_deadline() > now[0], "busy"
        assert out.flush()
        try:
            got += [(now[0], m.type) for m in parser.feed(os.read(r, 1 << 20))
                    if isinstance(m, p.Message)]
        except BlockingIOError:
            pass
    return got


@pytest.mark.parametrize("to_service", [True, False], ids=["service-socket", "port"])
def test_a_static_picture_sends_no_frame_after_the_first(to_service, device):
    # Issue 16: nothing on the wire for a static screen. To the service, only its empty UNCHANGED
    # every HEARTBEAT_S (the watchdog and Streaming); to the port itself, nothing at all.
    r, w = device
    now = [0.0]
    out = Outbox(w)
    s = static_streamer(out, now, frameparts.Sender() if to_service else None)
    s.start()
    first = run_for(s, out, r, 0.25, now)
    frame = frameparts.FRAME_PARTS if to_service else p.MsgType.DATA
    assert [t for _, t in first] == [p.MsgType.CAPABILITIES, p.MsgType.FORMAT, frame]
    later = run_for(s, out, r, 10.25, now)
    # The frame again REFRESH_AFTER_S after it (a client drops a late MJPEG frame), then nothing.
    refreshes = [(0.25 + at, frame) for at in REFRESH_AFTER_S]
    if to_service:
        # (The service is told of no changed part: it writes the frame it holds.)
        assert later == refreshes + [(t, frameparts.UNCHANGED) for t in (4.25, 6.25, 8.25, 10.25)]
        assert s.next_deadline() == 10.25 + HEARTBEAT_S  # it sleeps until then
    else:
        assert later == refreshes, later
        assert s.next_deadline() is None  # nothing due: the loop waits for input only
    # A change (here a resize) is still sent at once, its refreshes after it, and the heartbeat
    # counts from the last of them.
    s.on_screen_changes(Changes(resized=True))
    assert [t for _, t in run_for(s, out, r, 10.5, now)] == [frame]
    assert run_for(s, out, r, 14.25, now) == [(10.5 + at, frame) for at in REFRESH_AFTER_S]
    assert run_for(s, out, r, 14.5, now) == ([(14.5, frameparts.UNCHANGED)] if to_service
                                             else [])


def test_start_stop_again_while_streaming_starts_over_with_format_and_a_whole_frame(device):
    # A client joining: the server's START_STOP again, with the same codecs. It gets STREAM_CREATE
    # only with a FORMAT, and a static screen sends nothing else.
    r, w = device
    now = [0.0]
    out = Outbox(w)
    s = static_streamer(out, now)
    s.start()
    refreshes = [p.MsgType.DATA] * len(REFRESH_AFTER_S)
    assert [t for _, t in run_for(s, out, r, 5.0, now)] == [
        p.MsgType.CAPABILITIES, p.MsgType.FORMAT, p.MsgType.DATA] + refreshes
    s.on_host_bytes(p.start_stop((p.CODEC_MJPEG,)), p.Parser(p.HOST_TO_GUEST_LIMITS))
    assert s.streaming
    # (before the first refresh, REFRESH_AFTER_S[0] after it)
    assert [t for _, t in run_for(s, out, r, 5.0 + REFRESH_AFTER_S[0] * 0.8, now)] == [
        p.MsgType.FORMAT, p.MsgType.DATA]
    assert [t for _, t in run_for(s, out, r, 10.0, now)] == refreshes
    assert run_for(s, out, r, 15.0, now) == []


def test_a_full_queue_delays_the_frame_instead_of_dropping_it(device):
    # A frame the full queue dropped would never be sent again on a static screen (there is no
    # resend of the last frame): it waits, whole, until the queue has room for it and its FORMAT.
    r, w = device
    now = [0.0]
    out = Outbox(w)
    s = static_streamer(out, now)
    s.start()
    for _ in range(MAX_QUEUED - 2):  # the host stopped reading: cursor moves pile up
        out.send(p.cursor_move(1, 1))  # (behind CAPABILITIES: room for one message more)
    assert s.next_deadline() is None  # the device's writability wakes the loop
    s.tick()
    assert out.dropped == 0
    assert out.flush()  # the host reads again
    assert set(sent_types(r)) == {p.MsgType.CAPABILITIES, p.MsgType.CURSOR_MOVE}
    got = run_for(s, out, r, 10.0, now)
    assert [t for _, t in got] == [p.MsgType.FORMAT, p.MsgType.DATA] + [p.MsgType.DATA] * len(
        REFRESH_AFTER_S)  # and its refreshes
