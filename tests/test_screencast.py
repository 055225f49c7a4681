"""The GNOME on Wayland source (sources/screencast): a real PipeWire daemon and WirePlumber in a private
runtime directory, real video nodes in it, read by the source's own pipewiresrc pipeline; the one stand-in
is gnome-shell's D-Bus side (tests/support/fake_mutter.py) on a real private session bus. And the worker
itself with --source screencast, on a pty host peer."""

from __future__ import annotations

import io
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time

import pytest

from spice_stream_common import protocol as p
from spice_stream_common.exitcodes import (
    DisplayLost,
    DisplayUnavailable,
    ExitCode,
    StoppedByUser,
)
from spice_stream_worker.damage import compare_frames as compare
from spice_stream_worker.geometry import Rect
from spice_stream_worker.sources.mutter import CURSOR_EMBEDDED
from spice_stream_worker.sources.screencast import ScreenCast, Timing
from tests.support import pipewire
from tests.support.waiting import wait_until

GRAY, RED, GREEN = (40, 40, 40), (230, 20, 20), (20, 210, 40)
W, H = 320, 240

needs_pipewire = pytest.mark.skipif(
    pipewire.available() is not None, reason=f"no real PipeWire here: {pipewire.available()}")


# --- the compare, alone -----------------------------------------------------------------------------

def frame(w: int, h: int, rgb=GRAY) -> bytearray:
    return bytearray(pipewire.bgrx(rgb) * (w * h))


def paint(buf: bytearray, w: int, rect: Rect, rgb) -> None:
    for y in range(rect.y, rect.y + rect.height):
        at = (y * w + rect.x) * 4
        buf[at:at + rect.width * 4] = pipewire.bgrx(rgb) * rect.width


def test_compare_the_same_picture_is_no_damage():
    fb, new = frame(300, 200), bytes(frame(300, 200))
    assert compare(fb, new, 300, 200) == []
    assert fb == new


def test_compare_a_small_change_is_its_tile_only_and_fb_follows():
    fb = frame(300, 200)
    new = frame(300, 200)
    paint(new, 300, Rect(140, 70, 3, 2), RED)  # tile column 1 (128-256), band 4 (64-80)
    assert compare(fb, bytes(new), 300, 200) == [Rect(128, 64, 128, 16)]
    assert fb == new


def test_compare_two_touching_tiles_merge_and_the_last_partial_tile_is_clipped():
    fb = frame(300, 200)
    new = frame(300, 200)
    paint(new, 300, Rect(250, 195, 10, 5), RED)  # columns 1 and 2 of the last band (192-200)
    assert compare(fb, bytes(new), 300, 200) == [Rect(128, 192, 172, 8)]
    assert fb == new


def test_compare_a_large_change_goes_as_whole_bands():
    fb = frame(300, 200)
    new = frame(300, 200, RED)
    rects = compare(fb, bytes(new), 300, 200)
    assert rects == [Rect(0, 0, 300, 200)]
    assert fb == new


@pytest.fixture
def bare():
    """poll() and grab() alone, fed by hand as the streaming thread would (no bus, no thread)."""
    src = ScreenCast.__new__(ScreenCast)
    src.size, src.frames_received, src._fb, src._live, src._closed = (0, 0), 0, None, False, False
    src._lock = threading.Lock()
    src._slot, src._accept, src._up, src._fatal = None, 1, True, None
    src._settled = threading.Event()
    src._held, src._held_frame = False, None
    src._wake_r, src._wake_w = os.pipe2(os.O_NONBLOCK)
    yield src
    os.close(src._wake_r)
    os.close(src._wake_w)


def test_off_the_screen_no_picture_is_current_and_the_one_painted_on_return_is(bare):
    src = bare
    assert src._publish(1, 64, 32, bytes(frame(64, 32)))
    assert src.poll().resized and src.live
    src._hold("the session is not on the screen")  # another VT
    assert not src.poll() and not src.live
    with pytest.raises(DisplayLost):
        src.grab(None)
    assert src._publish(1, 64, 32, bytes(frame(64, 32, RED)))  # painted on the way back
    assert not src.poll() and not src.live  # not before logind says it is back
    src._release()
    changes = src.poll()
    assert changes.resized and src.live and bytes(src.grab(None).pixels[:4]) == pipewire.bgrx(RED)


def test_a_new_stream_s_first_frame_is_taken_even_if_it_is_the_only_one(bare):
    # mutter sends a static screen's picture once, when its stream starts: the worker's loop is
    # woken by that frame before the screen-cast thread has seen it, and must not drop it.
    src = bare
    src._stream_started(2, 57)
    assert not src.poll() and not src.live
    assert src._publish(2, 64, 32, bytes(frame(64, 32, RED)))
    changes = src.poll()
    assert changes.resized and src.live and src.size == (64, 32)
    assert src._settled.is_set()
    assert bytes(src.grab(None).pixels[:4]) == pipewire.bgrx(RED)


def test_a_new_size_within_a_stream_is_resized_and_the_whole_frame(bare):
    src = bare
    assert src._publish(1, 64, 32, bytes(frame(64, 32)))
    assert src.poll().resized and src.size == (64, 32) and src.live
    assert not src.poll()  # nothing new
    assert not src._publish(2, 64, 32, bytes(frame(64, 32, RED)))  # an old pipeline's frame
    assert src._publish(1, 80, 48, bytes(frame(80, 48, RED)))
    changes = src.poll()
    assert changes.resized and not changes.damage and src.size == (80, 48)
    fr = src.grab(None)
    assert (fr.width, fr.height, fr.stride) == (80, 48, 320)
    assert bytes(fr.pixels[:4]) == pipewire.bgrx(RED)
    src._stream_gone("test")  # the stream ends: nothing held, nothing current
    assert not src.poll() and not src.live and src._fb is None


# --- a real PipeWire, the fake gnome-shell ------------------------------------------------------------

@pytest.fixture(scope="module")
def pw():
    if pipewire.available() is not None:
        pytest.skip(pipewire.available())
    daemon = pipewire.PipeWire()
    yield daemon
    daemon.stop()


@pytest.fixture
def env(pw, monkeypatch):
    """This process's pipewiresrc and the fake find the private daemon and bus."""
    for key, value in pw.env.items():
        if key != "PATH":
            monkeypatch.setenv(key, value)
    return pw


@pytest.fixture
def producers(env):
    made = []

    def make(w=W, h=H):
        prod = env.producer(f"spice-test-{os.getpid()}-{len(made)}-{time.monotonic_ns()}", w, h)
        made.append(prod)
        return prod

    yield make
    for prod in made:
        prod.stop()


@pytest.fixture
def mutter(env):
    from tests.support.fake_mutter import FakeMutter

    fakes = []

    def make(node=0, saver=True):
        fake = FakeMutter(env.bus.address, node, saver=saver)
        fakes.append(fake)
        return fake

    yield make
    for fake in fakes:
        fake.stop()


@pytest.fixture
def opened():
    sources = []

    def make(**timing):
        src = ScreenCast(fps=30, timing=Timing(**timing))
        sources.append(src)
        return src

    yield make
    for src in sources:
        src.close()


def poll_until(src: ScreenCast, predicate, timeout: float = 10.0, what: str = "condition",
               seen: list | None = None):
    """Poll the source whenever its pipe says so (as the worker's loop does) until predicate(changes)
    holds; every Changes goes into `seen`. Raises what poll() raises."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        ready, _, _ = select.select([src.fileno()], [], [], min(left, 0.2))
        if ready:
            changes = src.poll()
            if seen is not None:
                seen.append(changes)
            if predicate(changes):
                return changes


def poll_for(src: ScreenCast, seconds: float) -> list:
    seen: list = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        ready, _, _ = select.select([src.fileno()], [], [], left)
        if ready:
            seen.append(src.poll())
    return seen


def pixel(src: ScreenCast, x: int, y: int) -> bytes:
    fr = src.grab(None)
    at = y * fr.stride + x * 4
    return bytes(fr.pixels[at:at + 4])


def close_to(a: bytes, rgb, tolerance: int = 3) -> bool:
    return len(a) == 4 and all(abs(x - y) <= tolerance
                               for x, y in zip(a[:3], pipewire.bgrx(rgb)[:3], strict=True))


def start(producers, mutter, opened, **timing):
    prod = producers()
    fake = mutter(prod.node)
    src = opened(**timing)
    poll_until(src, lambda c: c.resized, what="the first picture")
    seen_by_thread(src)
    return prod, fake, src


def seen_by_thread(src: ScreenCast) -> None:
    """The screen-cast thread has seen the stream's first frame too (which poll() may take before
    it): its log line is out, for the tests that count lines."""
    wait_until(lambda: src._ctl.waiting == "frames", 5, "the screen-cast thread to see the frame")


@needs_pipewire
def test_first_picture_is_the_node_s_whole_frame(producers, mutter, opened):
    prod, fake, src = start(producers, mutter, opened)
    assert src.live
    assert src.size == (W, H)
    assert src.describe() == f"GNOME ScreenCast (PipeWire node {prod.node})"
    fr = src.grab(None)
    assert (fr.width, fr.height, fr.stride, fr.changed) == (W, H, W * 4, None)
    assert close_to(pixel(src, 0, 0), GRAY) and close_to(pixel(src, W - 1, H - 1), GRAY)
    # The cursor is embedded in the picture: asked for, and nothing to send apart.
    assert fake.cursor_mode() == CURSOR_EMBEDDED
    assert src.cursor_image() is None
    assert fake.counts()["CreateSession"] == 1


@needs_pipewire
def test_a_static_picture_gives_no_damage_after_the_first(producers, mutter, opened):
    _prod, _fake, src = start(producers, mutter, opened)
    before = src.frames_received
    seen = poll_for(src, 1.0)
    assert src.frames_received - before >= 10, "the node sent the same picture again and again"
    assert not any(seen), [c for c in seen if c]


@needs_pipewire
def test_a_changed_region_gives_damage_for_that_region_only(producers, mutter, opened):
    prod, _fake, src = start(producers, mutter, opened)
    prod.rect(100, 50, 20, 10, RED)
    seen: list = []
    poll_until(src, lambda c: c.damage and close_to(pixel(src, 110, 55), RED), seen=seen,
               what="the red rectangle")
    tile = Rect(0, 48, 128, 16)  # the one tile holding (100, 50, 20, 10)
    damage = [r for c in seen for r in c.damage]
    assert damage and all(r == tile for r in damage), damage
    assert not any(c.resized for c in seen)
    assert close_to(pixel(src, 200, 200), GRAY) and close_to(pixel(src, 99, 55), GRAY)
    fr = src.grab(damage)
    assert fr.changed == damage


@needs_pipewire
def test_a_layout_change_records_again_at_once_with_the_new_size(producers, mutter, opened):
    # A settle much longer than the test's bound: the layout change must not wait for it.
    _prod, fake, src = start(producers, mutter, opened, settle=8.0)
    bigger = producers(256, 192)
    fake.set_node(bigger.node)
    began = time.monotonic()
    fake.change_monitors()
    poll_until(src, lambda c: c.resized and src.size == (256, 192), timeout=6,
               what="the picture of the new size")
    assert time.monotonic() - began < 4
    assert src.describe() == f"GNOME ScreenCast (PipeWire node {bigger.node})"
    assert fake.counts()["CreateSession"] == 2


@needs_pipewire
def test_the_lock_screen_stops_the_stream_and_the_unlock_brings_it_back(producers, mutter, opened,
                                                                         caplog):
    caplog.set_level(logging.INFO, logger="spice_stream_worker.sources")
    _prod, fake, src = start(producers, mutter, opened, backoff=(0.1,) * 5)
    caplog.clear()
    fake.lock()
    poll_until(src, lambda c: not src.live and "locked" in src.describe(),
               what="the stream to stop, for the lock")
    frames = src.frames_received
    seen = poll_for(src, 1.5)  # locked: no retries, no frames, nothing claimed current
    assert not any(seen) and src.frames_received == frames and not src.live
    assert fake.counts()["CreateSession"] == 1
    with pytest.raises(DisplayLost):
        src.grab(None)
    fake.set_node(producers().node)  # mutter makes a new node for each session
    fake.unlock()
    poll_until(src, lambda c: c.resized, timeout=5, what="the picture after the unlock")
    seen_by_thread(src)
    assert src.live and fake.counts()["CreateSession"] == 2
    # One line per event: closed, locked, unlocked, streaming; no warning, nothing repeated.
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and sum("locked" in line for line in lines) == 2, lines
    assert all(r.levelno == logging.INFO for r in caplog.records), lines


@needs_pipewire
def test_the_lock_is_known_from_logind_where_gnome_shell_has_no_screensaver(
        producers, mutter, logind, bus):
    # GNOME 43 on Wayland: no org.gnome.ScreenSaver on the session bus; gnome-shell closes the
    # screen cast, then sets its session's LockedHint (3 s later under TCG). That is a lock, not
    # the user's Stop: the source waits for LockedHint false and records again.
    logind.add_session("c7", os.getuid(), vt=2, type="wayland", active=True)
    prod = producers()
    fake = mutter(prod.node, saver=False)
    src = ScreenCast(fps=30, timing=Timing(backoff=(0.1,) * 5, settle=3.0), session_id="c7",
                     system_bus_address=bus.address)
    try:
        poll_until(src, lambda c: c.resized, what="the first picture")
        fake.lock()  # closes every screen cast; nobody says ActiveChanged
        poll_until(src, lambda c: not src.live, what="the stream to stop")
        logind.set_property("c7", "LockedHint", True)
        poll_until(src, lambda c: "locked" in src.describe(), timeout=5,
                   what="the source to wait for the unlock")
        assert not any(poll_for(src, 3.5))  # past the settle: no StoppedByUser, no retry
        assert fake.counts()["CreateSession"] == 1
        fake.set_node(producers().node)
        fake.unlock()
        logind.set_property("c7", "LockedHint", False)
        poll_until(src, lambda c: c.resized, timeout=10, what="the picture after the unlock")
        assert src.live and fake.counts()["CreateSession"] == 2
    finally:
        src.close()


@needs_pipewire
def test_another_vt_holds_the_picture_and_a_close_meanwhile_is_no_stop_button(
        producers, mutter, logind, bus, caplog):
    # A VT switch to another session: logind's Active goes false. The picture held is not claimed
    # current, frames are not taken while away; mutter closing the cast meanwhile (it does on the
    # way back, with its monitors) is not the user's Stop: the session is created again when
    # Active is true again.
    caplog.set_level(logging.INFO, logger="spice_stream_worker.sources")
    logind.add_session("c9", os.getuid(), vt=2, type="wayland", active=True)
    prod = producers()
    fake = mutter(prod.node, saver=False)
    src = ScreenCast(fps=30, timing=Timing(settle=0.5), session_id="c9",
                     system_bus_address=bus.address)
    try:
        poll_until(src, lambda c: c.resized, what="the first picture")
        logind.set_property("c9", "Active", False)
        poll_until(src, lambda c: not src.live, what="no picture while another VT is in front")
        frames = src.frames_received
        assert not any(poll_for(src, 1.0)) and src.frames_received == frames and not src.live
        fake.stop_button()  # closed, no lock, no layout change: the Stop button if in front
        poll_until(src, lambda c: "not on the screen" in src.describe(), timeout=5,
                   what="the source to wait for the session's return")
        assert not any(poll_for(src, 1.0))  # past the settle: no StoppedByUser, no retry
        assert fake.counts()["CreateSession"] == 1
        fake.set_node(producers().node)
        logind.set_property("c9", "Active", True)
        poll_until(src, lambda c: c.resized, timeout=10, what="the picture after the return")
        assert src.live and fake.counts()["CreateSession"] == 2
        lines = [r.getMessage() for r in caplog.records]
        assert any("left the screen" in line for line in lines), lines
        assert any("on the screen again" in line for line in lines), lines
    finally:
        src.close()


@needs_pipewire
def test_a_cast_still_being_made_is_given_up_when_the_session_leaves_the_screen(
        producers, mutter, logind, bus, caplog):
    # mutter gives a node that sends nothing yet (a first cast at a boot took 13-18 s under TCG);
    # another VT comes in front meanwhile: the cast is stopped, not made on in the background
    # (it took the guest's CPUs from the session in front), and made again once the session is back.
    caplog.set_level(logging.INFO, logger="spice_stream_worker.sources")
    logind.add_session("c6", os.getuid(), vt=2, type="wayland", active=True)
    fake = mutter(4_000_000, saver=False)  # no such node: no frame comes
    src = ScreenCast(fps=30, timing=Timing(start=0.2, settle=0.5), session_id="c6",
                     system_bus_address=bus.address)
    try:
        wait_until(lambda: fake.counts()["Start"] == 1, what="the cast started")
        assert not any(poll_for(src, 0.5)) and not src.live  # its node given, still no frame
        logind.set_property("c6", "Active", False)
        poll_until(src, lambda c: "not on the screen" in src.describe(), timeout=5,
                   what="the cast given up while another VT is in front")
        wait_until(lambda: fake.counts()["Stop"] == 1, what="the cast stopped at mutter")
        assert not any(poll_for(src, 1.0)) and fake.counts()["CreateSession"] == 1
        fake.set_node(producers().node)
        logind.set_property("c6", "Active", True)
        poll_until(src, lambda c: c.resized, timeout=10, what="the picture after the return")
        assert src.live and fake.counts()["CreateSession"] == 2
        # Given up for the switch, not failed: no retry while away.
        assert not [r for r in caplog.records if "trying again" in r.getMessage()]
    finally:
        src.close()


@needs_pipewire
def test_back_from_another_vt_with_no_frame_records_again(producers, mutter, logind, bus, caplog):
    # The session comes back to the screen with its stream still up, and mutter paints nothing
    # (a static desktop: no frame came in 30 s in a Debian 12 guest): after Timing.back_frame a
    # new stream gives the current picture.
    caplog.set_level(logging.INFO, logger="spice_stream_worker.sources")
    logind.add_session("c7", os.getuid(), vt=2, type="wayland", active=True)
    prod = producers()
    fake = mutter(prod.node, saver=False)
    src = ScreenCast(fps=30, timing=Timing(settle=0.5, back_frame=0.3), session_id="c7",
                     system_bus_address=bus.address)
    try:
        poll_until(src, lambda c: c.resized, what="the first picture")
        logind.set_property("c7", "Active", False)
        poll_until(src, lambda c: not src.live, what="no picture while another VT is in front")
        prod.pause()
        fake.set_node(producers().node)
        logind.set_property("c7", "Active", True)
        poll_until(src, lambda c: c.resized, timeout=10, what="the picture after the return")
        assert src.live and fake.counts()["CreateSession"] == 2
        assert any("no picture since the session came back" in r.getMessage()
                   for r in caplog.records)
    finally:
        src.close()


@needs_pipewire
def test_without_a_lock_from_anyone_a_closed_cast_is_the_stop_button(producers, mutter, logind,
                                                                      bus):
    # The same session without LockedHint: after the settle it is the user's Stop.
    logind.add_session("c8", os.getuid(), vt=2, type="wayland", active=True)
    prod = producers()
    fake = mutter(prod.node, saver=False)
    src = ScreenCast(fps=30, timing=Timing(settle=0.5), session_id="c8",
                     system_bus_address=bus.address)
    try:
        poll_until(src, lambda c: c.resized, what="the first picture")
        fake.stop_button()
        with pytest.raises(StoppedByUser):
            poll_until(src, lambda c: False, timeout=5, what="StoppedByUser")
    finally:
        src.close()


@needs_pipewire
def test_locked_at_start_waits_for_the_unlock(producers, mutter, opened):
    prod = producers()
    fake = mutter(prod.node)
    fake.lock()  # CreateSession is refused while locked
    src = opened(backoff=(0.1,) * 5)
    assert not src.live and "locked" in src.describe()
    assert not any(poll_for(src, 1.0))
    assert fake.counts()["CreateSession"] == 1  # refused once, then waiting, not retrying
    fake.set_node(producers().node)
    fake.unlock()
    poll_until(src, lambda c: c.resized, what="the picture after the unlock")
    assert src.live and fake.counts()["CreateSession"] == 2


@needs_pipewire
def test_the_stop_button_ends_the_worker_with_stopped_by_user(producers, mutter, opened):
    _prod, fake, src = start(producers, mutter, opened, settle=0.5)
    began = time.monotonic()
    fake.stop_button()
    with pytest.raises(StoppedByUser):
        poll_until(src, lambda c: False, timeout=5, what="StoppedByUser")
    assert time.monotonic() - began >= 0.5  # a lock or layout change had that long to show
    assert fake.counts()["CreateSession"] == 1
    # Said again on the next poll, the same error: not a loop of new ones.
    with pytest.raises(StoppedByUser):
        src.poll()


@needs_pipewire
def test_mutter_restarting_records_again_on_the_new_one(producers, mutter, opened):
    _prod, fake, src = start(producers, mutter, opened)
    fake.stop()  # its names leave the bus, its sessions with it
    poll_until(src, lambda c: not src.live and "left the session bus" in src.describe(),
               what="the stream to stop, for mutter's leaving")
    again = mutter(producers().node)
    poll_until(src, lambda c: c.resized, what="the picture from the new mutter")
    assert src.live and again.counts()["CreateSession"] == 1


@needs_pipewire
def test_mutter_gone_for_good_is_display_lost(producers, mutter, opened):
    _prod, fake, src = start(producers, mutter, opened, mutter_gone=1.0)
    fake.stop()
    with pytest.raises(DisplayLost, match="did not come on the session bus within 1 s"):
        poll_until(src, lambda c: False, timeout=5, what="DisplayLost")


@needs_pipewire
def test_failures_to_create_are_retried_with_backoff(producers, mutter, opened):
    prod = producers()
    fake = mutter(prod.node)
    fake.fail_create(2)
    began = time.monotonic()
    src = opened(backoff=(0.3, 0.3, 0.3))
    poll_until(src, lambda c: c.resized, what="the picture after two failures")
    assert time.monotonic() - began >= 0.6  # two backoffs, not a busy loop
    assert fake.counts()["CreateSession"] == 3


@needs_pipewire
def test_failures_to_create_past_the_bound_are_display_unavailable(producers, mutter, opened):
    prod = producers()
    fake = mutter(prod.node)
    fake.fail_create(100)
    with pytest.raises(DisplayUnavailable, match="CreateSession failed 3 times in a row"):
        opened(backoff=(0.1, 0.2))
    time.sleep(0.5)  # a window in which a source that kept trying would call again
    assert fake.counts()["CreateSession"] == 3


@needs_pipewire
def test_a_node_that_gives_nothing_is_retried_then_given_up_with_one_line_each(env, mutter, opened,
                                                                               caplog):
    caplog.set_level(logging.INFO, logger="spice_stream_worker.sources")
    fake = mutter(4_000_000)  # no such node: pipewiresrc errors, or never gets a frame
    src = opened(start=0.2, frame=1.0, backoff=(0.2, 0.2))
    with pytest.raises(DisplayUnavailable, match="reading PipeWire node 4000000 failed 3 times"):
        poll_until(src, lambda c: False, timeout=15, what="DisplayUnavailable")
    assert fake.counts()["CreateSession"] == 3
    retries = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(retries) == 2 and all("trying again" in r.getMessage() for r in retries)
    assert not src.live


@needs_pipewire
def test_no_mutter_on_the_bus_at_start(env, opened):
    src = opened(start=0.3, mutter_gone=1.5)  # the loop starts; mutter may be starting too
    assert not src.live and "not on the session bus" in src.describe()
    with pytest.raises(DisplayUnavailable,
                       match="org.gnome.Mutter.ScreenCast did not come on the session bus within 1.5 s"):
        poll_until(src, lambda c: False, timeout=5, what="DisplayUnavailable")


def test_no_session_bus_is_one_clear_error(monkeypatch):
    pytest.importorskip("gi")
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    with pytest.raises(DisplayUnavailable, match="DBUS_SESSION_BUS_ADDRESS is not set"):
        ScreenCast()


@needs_pipewire
def test_close_releases_the_thread_the_pipeline_the_session_and_the_pipe(env, producers, mutter,
                                                                          opened):
    _prod, fake, src = start(producers, mutter, opened)
    fds = (src._wake_r, src._wake_w)
    thread = src._thread
    changes = list(src._ctl.changes)  # the pipeline's state change threads
    assert fake.sessions() == 1
    assert any(o.get("info", {}) and o["info"].get("props", {}).get("media.class") ==
               "Stream/Input/Video" for o in env.dump())
    src.close()
    assert not thread.is_alive()
    assert changes and not any(t.is_alive() for t in src._ctl.changes + changes)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    wait_until(lambda: fake.sessions() == 0, what="mutter's session to end")
    wait_until(lambda: not any(o.get("info", {}) and o["info"].get("props", {}).get("media.class")
                               == "Stream/Input/Video" for o in env.dump()),
               what="the pipewiresrc stream to leave PipeWire")
    src.close()  # twice is fine


# --- the worker with --source screencast -------------------------------------------------------------

def worker_env(pw, **extra) -> dict[str, str]:
    """What the service gives a screencast worker: the user's runtime dir and bus, no DISPLAY."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "XDG_RUNTIME_DIR": pw.dir, "DBUS_SESSION_BUS_ADDRESS": pw.bus.address}
    env.update(extra)
    return env


class WorkerRun:
    def __init__(self, env: dict[str, str], extra=()):
        from tests.support.hostpeer import HostPeer, RawPty

        self.pty = RawPty()
        self.peer = HostPeer(self.pty.master)
        self.status_r, status_w = os.pipe()
        os.set_blocking(self.status_r, False)
        self.status: list[dict] = []
        self._status_buf = b""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spice_stream_worker", "--device", self.pty.path, "--fps", "30",
             "--source", "screencast", "--status-fd", str(status_w), *extra],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            pass_fds=(status_w,))
        os.close(status_w)

    def last_status(self) -> dict:
        """The worker's newest status line (--status-fd), read without blocking."""
        try:
            while chunk := os.read(self.status_r, 65536):
                self._status_buf += chunk
        except BlockingIOError:
            pass
        *lines, self._status_buf = self._status_buf.split(b"\n")
        self.status += [json.loads(line) for line in lines if line]
        return self.status[-1] if self.status else {}

    def wait(self, timeout=20):
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return code, self.proc.stderr.read().decode()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stderr.close()
        os.close(self.status_r)
        self.peer.close()
        self.pty.close()


@pytest.fixture
def worker():
    runs = []

    def make(env, extra=()):
        run = WorkerRun(env, extra)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.stop()


def jpeg_pixel(msg: p.Message, x: int, y: int):
    from PIL import Image

    return Image.open(io.BytesIO(msg.payload)).convert("RGB").getpixel((x, y))


@needs_pipewire
def test_worker_streams_the_screencast_and_sends_nothing_while_locked(env, producers, mutter,
                                                                       worker):
    prod = producers()
    fake = mutter(prod.node)
    prod.rect(0, 0, 64, 64, RED)
    w = worker(worker_env(env), ["--start-codecs", "1"])
    data = w.peer.wait_count(p.MsgType.DATA, 1, timeout=20)
    fmt = w.peer.of_type(p.MsgType.FORMAT)
    assert p.decode_format(fmt[0].payload) == p.Format(W, H, p.CODEC_MJPEG)
    w.peer.wait_for(lambda: jpeg_pixel(w.peer.of_type(p.MsgType.DATA)[-1], 30, 30)[0] > 180,
                    what="a frame with the red square")
    assert abs(jpeg_pixel(data[-1], 200, 200)[0] - GRAY[0]) < 10
    assert not w.peer.of_type(p.MsgType.CURSOR_SET) and not w.peer.of_type(p.MsgType.CURSOR_MOVE)
    wait_until(lambda: w.last_status().get("live") is True, what="the worker to report its picture")
    fake.lock()
    wait_until(lambda: w.last_status().get("live") is False, what="the worker to have no picture")
    sent = len(w.peer.of_type(p.MsgType.DATA))
    time.sleep(3.0)  # more than a heartbeat period (2 s): a stale frame must not be sent again
    assert len(w.peer.of_type(p.MsgType.DATA)) == sent
    fake.set_node(producers().node)
    fake.unlock()
    w.peer.wait_count(p.MsgType.DATA, sent + 1, timeout=10)
    assert w.proc.poll() is None


@needs_pipewire
def test_worker_exits_with_stopped_by_user_on_the_stop_button(env, producers, mutter, worker):
    prod = producers()
    fake = mutter(prod.node)
    w = worker(worker_env(env), ["--start-codecs", "1"])
    w.peer.wait_count(p.MsgType.DATA, 1, timeout=20)
    fake.stop_button()
    code, err = w.wait()
    assert code == ExitCode.STOPPED_BY_USER, err
    assert "Stop" in err and "Traceback" not in err


def test_worker_source_defaults_to_x11_and_takes_screencast():
    from spice_stream_worker.main import parse_args

    assert parse_args(["--device", "/dev/null"]).source == "x11"
    assert parse_args(["--device", "/dev/null", "--source", "screencast"]).source == "screencast"


def test_worker_refuses_an_unknown_source(worker):
    w = worker({"PATH": os.environ.get("PATH", "")}, ["--source", "wayland"])
    code, err = w.wait()
    assert code == ExitCode.USAGE and "--source" in err


def gst_plugins_without(tmp_path, missing: str) -> dict[str, str]:
    """A GStreamer plugin directory holding every system plugin but `missing`, and a fresh registry."""
    system = "/usr/lib/x86_64-linux-gnu/gstreamer-1.0"
    if not os.path.isdir(system):
        pytest.skip(f"no {system}")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    for name in os.listdir(system):
        if name.endswith(".so") and name != missing:
            os.symlink(os.path.join(system, name), plugins / name)
    return {"GST_PLUGIN_SYSTEM_PATH_1_0": str(plugins), "GST_PLUGIN_PATH_1_0": "",
            "GST_REGISTRY_1_0": str(tmp_path / "registry.bin")}


def test_worker_without_pipewiresrc_names_the_package_in_one_line(tmp_path, worker):
    pytest.importorskip("gi")
    if not os.path.exists("/usr/lib/x86_64-linux-gnu/gstreamer-1.0/libgstpipewire.so"):
        pytest.skip("gstreamer1.0-pipewire is not installed: nothing to take away")
    env = {"PATH": os.environ.get("PATH", ""), "DBUS_SESSION_BUS_ADDRESS": "unix:path=/nonexistent",
           **gst_plugins_without(tmp_path, "libgstpipewire.so")}
    w = worker(env)
    code, err = w.wait()
    assert code == ExitCode.DISPLAY_UNAVAILABLE, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "install the Debian package gstreamer1.0-pipewire" in lines[0], err


def test_worker_without_pygobject_names_the_package_in_one_line(tmp_path, worker):
    stub = tmp_path / "nogi" / "gi"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError(\"No module named 'gi'\")\n")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(tmp_path / "nogi")}
    w = worker(env)
    code, err = w.wait()
    assert code == ExitCode.DISPLAY_UNAVAILABLE, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "install the Debian package python3-gi" in lines[0], err
