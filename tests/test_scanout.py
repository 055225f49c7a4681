"""The scanout capture source (sources/scanout.py) on a fake DRM card with file-backed framebuffers."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import math
import mmap
import os
from collections.abc import Callable

import pytest

from spice_stream_common import kms
from spice_stream_common.exitcodes import DisplayLost, DisplayUnavailable
from spice_stream_common.fbgrant import GrantRefused
from spice_stream_worker import timerfd
from spice_stream_worker.damage import ALIGN
from spice_stream_worker.geometry import Rect
from spice_stream_worker.sources import scanout
from spice_stream_worker.sources.scanout import HOT_S, IDLE_RATE, SAMPLE_PHASES, Scanout

XR24, AR24 = kms.fourcc("XR24"), kms.fourcc("AR24")
CRTC = 31
W, H = 64, 48


def pixel(x: int, y: int, tag: int) -> bytes:
    """A pixel that says where it is and which framebuffer (or version of it) holds it."""
    return bytes((x & 0xFF, y & 0xFF, tag & 0xFF, 0x80 | (x >> 8) | (y >> 8) << 3))


class FakeFb:
    """A framebuffer whose memory is a file: what is written shows through every mapping."""

    def __init__(self, path, fb_id: int, width: int, height: int, pitch: int = 0, offset: int = 0,
                 fmt: int = XR24, modifier: int = 0, tag: int = 0) -> None:
        pitch = pitch or width * 4
        self.meta = kms.Framebuffer(fb_id, width, height, fmt, pitch, offset, modifier, 0)
        self.data = bytearray(b"\xdd" * offset)
        for y in range(height):
            self.data += self.row(y, tag) + b"\xee" * (pitch - width * 4)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.pwrite(self.fd, self.data, 0)

    def row(self, y: int, tag: int) -> bytes:
        return b"".join(pixel(x, y, tag) for x in range(self.meta.width))

    def write(self, x: int, y: int, data: bytes) -> None:
        at = self.meta.offset + y * self.meta.pitch + x * 4
        self.data[at:at + len(data)] = data
        os.pwrite(self.fd, data, at)

    def paint_rows(self, y0: int, y1: int, tag: int) -> None:
        for y in range(y0, y1):
            self.write(0, y, self.row(y, tag))

    def visible(self, x: int, y: int, width: int, height: int) -> bytes:
        fb = self.meta
        return b"".join(self.data[fb.offset + (y + r) * fb.pitch + x * 4:][:width * 4]
                        for r in range(height))


class FakeCard:
    """kms.Card's methods over tables the test changes: CRTCs, planes, framebuffers."""

    def __init__(self, tmp_path) -> None:
        self.dir = tmp_path
        self.path = "/dev/dri/card-fake"
        self.crtc_table: dict[int, kms.Crtc] = {CRTC: kms.Crtc(CRTC, 0, 0, 0, 0, 0, 0)}
        self.plane_table: dict[int, kms.Plane] = {}
        self.plane_reads: list[tuple[int, bool]] = []  # (plane, with its properties)
        self.fbs: dict[int, FakeFb] = {}
        self.maps: list[tuple[int, mmap.mmap]] = []
        self.closed_handles: list[int] = []
        self.fail: dict[str, int] = {}  # method: how many of its next calls fail
        self.made = 0
        self.closed = False

    # -- the test's side ---------------------------------------------------------------------------

    def add_fb(self, fb_id: int, width: int = W, height: int = H, **kw) -> FakeFb:
        self.made += 1  # a file of its own: another buffer, even under a used id
        fb = self.fbs[fb_id] = FakeFb(self.dir / f"fb{self.made}", fb_id, width, height, **kw)
        fb.key = self.made << 20  # its MAP_DUMB offset
        return fb

    def show(self, fb_id: int, width: int = W, height: int = H, x: int = 0, y: int = 0,
             refresh: int = 60, crtc_id: int = CRTC) -> None:
        self.crtc_table[crtc_id] = kms.Crtc(crtc_id, fb_id, x, y, width, height, refresh)

    def open_maps(self, fb_id: int | None = None) -> list[mmap.mmap]:
        return [m for f, m in self.maps if not m.closed and fb_id in (None, f)]

    def _maybe_fail(self, name: str) -> None:
        if self.fail.get(name):
            self.fail[name] -= 1
            raise kms.KmsError(errno.ENOENT, f"{name}: faked failure")

    # -- kms.Card's ----------------------------------------------------------------------------------

    def crtcs(self) -> list[kms.Crtc]:
        self._maybe_fail("crtcs")
        return list(self.crtc_table.values())

    def crtc(self, crtc_id: int) -> kms.Crtc:
        self._maybe_fail("crtc")
        if crtc_id not in self.crtc_table:
            raise kms.KmsError(errno.ENOENT, f"GETCRTC({crtc_id})")
        return self.crtc_table[crtc_id]

    def planes(self) -> list[kms.Plane]:
        self._maybe_fail("planes")
        return list(self.plane_table.values())

    def plane(self, plane_id: int, props: bool = True) -> kms.Plane:
        self._maybe_fail("plane")
        p = self.plane_table[plane_id]
        self.plane_reads.append((plane_id, props))
        if not props:  # GETPLANE alone: no position, hotspot or kind
            return dataclasses.replace(p, kind="", crtc_x=0, crtc_y=0, hot_x=0, hot_y=0)
        return p

    def framebuffer(self, fb_id: int, handle: bool = True) -> kms.Framebuffer:
        self._maybe_fail("framebuffer")
        if fb_id not in self.fbs:
            raise kms.KmsError(errno.ENOENT, f"GETFB2({fb_id})")
        return self.fbs[fb_id].meta  # handle 0: a reader is neither DRM master nor root

    def buffer_offset(self, handle: int, what: str = "") -> int:
        """Where the buffer a handle names is in the device's mmap space: one per buffer made."""
        self._maybe_fail("buffer_offset")
        fb = self.fbs.get(handle - Grant.handle_of(0))
        if fb is None:
            raise kms.KmsError(errno.ENOENT, f"MAP_DUMB({what or handle})")
        return fb.key

    def map(self, fb: kms.Framebuffer, handle: int, offset: int | None = None) -> mmap.mmap:
        self._maybe_fail("map")
        if handle != Grant.handle_of(fb.fb_id):
            raise kms.KmsError(errno.ENOENT, f"handle {handle} is not framebuffer {fb.fb_id}'s")
        assert offset in (None, self.fbs[fb.fb_id].key)
        assert fb.pitch >= fb.width * 4
        view = mmap.mmap(self.fbs[fb.fb_id].fd, fb.offset + fb.pitch * fb.height,
                         flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        self.maps.append((fb.fb_id, view))
        return view

    def close_handle(self, handle: int) -> None:
        self.closed_handles.append(handle)

    def close(self) -> None:
        self.closed = True


class Grant:
    """The service's grant: a handle per framebuffer, or a refusal."""

    def __init__(self) -> None:
        self.asked: list[int] = []
        self.refuse: OSError | None = None
        self.on_ask: Callable[[int], None] | None = None  # runs first: a flip meanwhile

    def __call__(self, fb_id: int) -> int:
        self.asked.append(fb_id)
        if self.on_ask is not None:
            self.on_ask(fb_id)
        if self.refuse is not None:
            raise self.refuse
        return self.handle_of(fb_id)

    @staticmethod
    def handle_of(fb_id: int) -> int:
        return 1000 + fb_id


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Env:
    def __init__(self, tmp_path) -> None:
        self.card = FakeCard(tmp_path)
        self.grant = Grant()
        self.clock = Clock()
        self.grant_closed = 0
        self.sources: list[Scanout] = []

    def close_grant(self) -> None:
        self.grant_closed += 1

    def source(self, fps: int = 30) -> Scanout:
        src = Scanout(self.card, self.grant, fps=fps, clock=self.clock, close_grant=self.close_grant)
        self.sources.append(src)
        return src

    def settle(self, src: Scanout) -> None:
        """Let the screen go static: past HOT_S and a second since the last change (no band
        hot, no change counted), one look that finds nothing."""
        self.clock.advance(max(HOT_S, 1.0) + 0.1)
        assert not src.poll()

    def look(self, src: Scanout, looks: int = SAMPLE_PHASES):
        """Up to `looks` looks IDLE_RATE apart, until one finds a change: its Changes, or the
        last look's (empty) when none did."""
        for _ in range(looks):
            self.clock.advance(1 / IDLE_RATE)
            changes = src.poll()
            if changes:
                break
        return changes


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    for src in e.sources:
        src.close()
    for fb in e.card.fbs.values():
        os.close(fb.fd)


@pytest.fixture
def shown(env):
    """A 64x48 picture on the CRTC, read once."""
    fb = env.card.add_fb(1, tag=1)
    env.card.show(1)
    src = env.source()
    changes = src.poll()
    assert changes.resized
    return src, fb


class RowReads:
    """Counts what a Scanout reads of its mapping through _rows (whole reads and bands)."""

    def __init__(self, src: Scanout, monkeypatch) -> None:
        self.calls: list[tuple[int, int]] = []
        real = src._rows

        def spy(m, crtc, y, rows):
            self.calls.append((y, rows))
            return real(m, crtc, y, rows)

        monkeypatch.setattr(src, "_rows", spy)

    def bands(self) -> set[int]:
        return {y for y, rows in self.calls if rows <= ALIGN}

    def clear(self) -> None:
        self.calls.clear()


def frame_bytes(src: Scanout) -> bytes:
    f = src.grab()
    return bytes(f.pixels[:f.stride * f.height])


def covers(damage: list[Rect], x: int, y: int) -> bool:
    return any(r.x <= x < r.x + r.width and r.y <= y < r.y + r.height for r in damage)


def timer_interval(fd: int) -> float:
    spec = timerfd._Itimerspec()
    assert timerfd._libc.timerfd_gettime(fd, ctypes.byref(spec)) == 0
    return spec.it_interval.tv_sec + spec.it_interval.tv_nsec / 1e9


def timer_first(fd: int) -> float:
    """How long until the timer's next expiry."""
    spec = timerfd._Itimerspec()
    assert timerfd._libc.timerfd_gettime(fd, ctypes.byref(spec)) == 0
    return spec.it_value.tv_sec + spec.it_value.tv_nsec / 1e9


# -- the first look ----------------------------------------------------------------------------------


def test_first_poll_reads_the_picture(env):
    fb = env.card.add_fb(1, tag=1)
    env.card.show(1)
    src = env.source()
    assert not src.live
    changes = src.poll()
    assert changes.resized
    assert src.live
    assert src.size == (W, H)
    frame = src.grab()
    assert (frame.width, frame.height, frame.stride) == (W, H, W * 4)
    assert bytes(frame.pixels) == fb.visible(0, 0, W, H)
    assert env.grant.asked == [1]
    assert env.card.closed_handles == [Grant.handle_of(1)]
    assert src.reads == 1


def test_grab_clips_the_rects_it_is_given(shown):
    src, _ = shown
    frame = src.grab([Rect(60, 40, 10, 10), Rect(100, 100, 5, 5)])
    assert frame.changed == [Rect(60, 40, 4, 8)]
    assert src.grab().changed is None


# -- changes -----------------------------------------------------------------------------------------


def test_a_static_screen_is_not_read_whole(env, shown, monkeypatch):
    src, _ = shown
    rows = RowReads(src, monkeypatch)
    for _ in range(3 * SAMPLE_PHASES):
        env.clock.advance(1 / IDLE_RATE)
        changes = src.poll()
        assert not changes
        assert changes.damage == []
    assert src.reads == 1  # the first look's only
    assert rows.calls == []  # sampled rows only: no band read, no compare_bands
    assert timer_interval(src.fileno()) == pytest.approx(1 / IDLE_RATE, abs=1e-6)


@pytest.mark.parametrize("y", [*range(SAMPLE_PHASES), 21, H - 1])
def test_one_changed_row_is_found_within_the_phases(env, shown, y, monkeypatch):
    src, fb = shown
    fb.write(37, y, pixel(1, 2, 3))
    changes = env.look(src)
    assert changes, f"row {y} changed and {SAMPLE_PHASES} looks did not see it"
    assert covers(changes.damage, 37, y)
    assert not covers(changes.damage, 37, (y // ALIGN + 1) * ALIGN)  # its band only
    assert frame_bytes(src) == fb.visible(0, 0, W, H)
    assert src.reads == 1
    # Its band is hot now: read whole at the next look, another change in it seen at once
    # (whatever rows that look samples).
    rows = RowReads(src, monkeypatch)
    fb.write(50, y, pixel(4, 5, 6))
    env.clock.advance(1 / IDLE_RATE)
    changes = src.poll()
    assert covers(changes.damage, 50, y)
    assert rows.bands() == {y // ALIGN * ALIGN}
    assert frame_bytes(src) == fb.visible(0, 0, W, H)
    assert src.reads == 1


def test_a_band_cools_after_hot_s(env, shown, monkeypatch):
    src, fb = shown
    fb.write(0, 3, pixel(7, 7, 7))
    assert env.look(src).damage
    rows = RowReads(src, monkeypatch)
    env.clock.advance(HOT_S / 2)
    assert not src.poll()
    assert rows.bands() == {0}
    rows.clear()
    env.clock.advance(HOT_S)
    assert not src.poll()
    assert rows.calls == []


def test_the_sampled_phase_turns(env, shown):
    # The same row, changed again and again: found each time within SAMPLE_PHASES looks, and
    # not always at the same look (the rows looked at differ from look to look).
    src, fb = shown
    found_at = []
    for i in range(SAMPLE_PHASES):
        env.settle(src)
        fb.write(0, 13, pixel(9, 9, 100 + i))
        for looks in range(1, SAMPLE_PHASES + 1):
            env.clock.advance(1 / IDLE_RATE)
            if src.poll().damage:
                found_at.append(looks)
                break
        else:
            pytest.fail(f"change {i} not seen")
    assert len(set(found_at)) > 1


def test_a_change_taller_than_the_phases_is_found_at_the_next_look(env, shown):
    src, fb = shown
    for _ in range(3):  # whatever the phase
        env.clock.advance(1 / IDLE_RATE)
        assert not src.poll()
    fb.paint_rows(20, 20 + SAMPLE_PHASES, tag=77)
    env.clock.advance(1 / IDLE_RATE)
    changes = src.poll()
    assert covers(changes.damage, 0, 20) and covers(changes.damage, 0, 20 + SAMPLE_PHASES - 1)
    assert frame_bytes(src) == fb.visible(0, 0, W, H)
    assert src.reads == 1


def test_a_repaint_is_compared_whole_at_once_and_at_the_next_looks(env):
    """Back to GNOME from a text console (VM, Debian 13) mutter repaints the whole screen: what
    changed between the sampled rows (a line of the top bar's text, an icon) must not wait up to
    SAMPLE_PHASES looks. A look whose sampled rows changed in a quarter of the bands compares the
    picture whole, and so do the next WHOLE_LOOKS_AFTER_WIDE; then sampling again."""
    h = 256  # 16 bands: a repaint of 8 is wide, a change in one is not
    fb = env.card.add_fb(1, height=h, tag=1)
    env.card.show(1, height=h)
    src = env.source()
    assert src.poll().resized
    env.settle(src)
    # Rows of the next look's phase are sampled; the lone change lies on another phase, far below.
    phase = (src._phase + 1) % SAMPLE_PHASES
    lone = 12 * ALIGN + (phase + 5) % SAMPLE_PHASES
    fb.paint_rows(0, h // 2, tag=5)
    fb.write(3, lone, pixel(1, 2, 3))
    env.clock.advance(1 / IDLE_RATE)
    reads = src.reads
    changes = src.poll()
    assert covers(changes.damage, 3, lone) and covers(changes.damage, 0, h // 2 - 1)
    assert frame_bytes(src) == fb.visible(0, 0, W, h)
    assert src.reads == reads + 1
    # The next look compares whole too: another change off its sampled rows is found at once.
    other = 14 * ALIGN + (src._phase + 7) % SAMPLE_PHASES
    fb.write(5, other, pixel(4, 5, 6))
    env.clock.advance(1 / IDLE_RATE)
    assert covers(src.poll().damage, 5, other)
    assert src.reads == reads + 2
    # One more whole look, then the still screen is sampled, not read whole.
    for _ in range(4):
        env.clock.advance(1 / IDLE_RATE)
        assert not src.poll()
    assert src.reads == reads + 3
    assert frame_bytes(src) == fb.visible(0, 0, W, h)


def test_a_change_in_a_few_bands_is_not_a_repaint(env):
    """Changes in fewer than a quarter of the bands (typing, a moving window's edge) keep to the
    bands found: no whole read."""
    h = 256
    fb = env.card.add_fb(1, height=h, tag=1)
    env.card.show(1, height=h)
    src = env.source()
    src.poll()
    env.settle(src)
    reads = src.reads
    fb.paint_rows(0, 3 * ALIGN, tag=5)
    changes = env.look(src)
    assert covers(changes.damage, 0, 3 * ALIGN - 1)
    for _ in range(3):
        env.clock.advance(1 / IDLE_RATE)
        src.poll()
    assert src.reads == reads
    assert frame_bytes(src) == fb.visible(0, 0, W, h)


def test_a_blinking_spot_keeps_its_band_hot_and_the_looks_quick(env, shown, monkeypatch):
    # A cursor blinking slower than a still screen's looks (each state is seen): two rows that
    # change every 0.7 s.
    src, fb = shown
    rows = RowReads(src, monkeypatch)
    on, t, seen = False, 0.0, 0
    blink = 0.7
    while t < 30.0:  # a 2-row change is found within SAMPLE_PHASES looks (8 s), then followed
        if int(t / blink) % 2 != on:
            on = not on
            fb.paint_rows(30, 32, tag=200 if on else 1)
        step = timer_interval(src.fileno())
        env.clock.advance(step)
        t += step
        changes = src.poll()
        if changes:
            seen += 1
            assert all(r.y >= 16 and r.y + r.height <= 32 for r in changes.damage)
        if seen:  # once found, its band is read at each look: the picture is kept up
            assert frame_bytes(src) == fb.visible(0, 0, W, H)
    assert seen >= 20  # each blink once the band is hot (30 of the 42 at least)
    # Only the cursor's band is read whole at each look; its neighbours once, when it was found.
    assert rows.bands() <= {0, 16, 32}
    assert sum(1 for y, _ in rows.calls if y != 16) <= 2
    assert src.reads == 1
    assert timer_interval(src.fileno()) < 1 / IDLE_RATE - 1e-6
    # It stops blinking: back to IDLE_RATE, the band cools.
    env.settle(src)
    rows.clear()
    env.clock.advance(1 / IDLE_RATE)
    assert not src.poll()
    assert rows.calls == []


def test_a_flip_is_read_whole_at_once(env, shown):
    src, fb1 = shown
    env.settle(src)
    fb2 = env.card.add_fb(2, tag=2)
    fb2.paint_rows(0, H, tag=1)  # the same picture but rows 30..33
    fb2.paint_rows(30, 34, tag=2)
    env.card.show(2)
    reads, asked = src.reads, len(env.grant.asked)
    env.clock.advance(0.1)
    changes = src.poll()
    assert src.reads == reads + 1
    assert not changes.resized
    assert covers(changes.damage, 5, 30) and not covers(changes.damage, 5, 0)
    assert frame_bytes(src) == fb2.visible(0, 0, W, H)
    assert env.grant.asked[asked:] == [2]
    # And back to the first: its buffer asked for again (it may be another one now), still the
    # same one, so still mapped (not mapped anew), read whole.
    maps = len(env.card.maps)
    env.card.show(1)
    env.clock.advance(0.1)
    changes = src.poll()
    assert covers(changes.damage, 5, 30)
    assert frame_bytes(src) == fb1.visible(0, 0, W, H)
    assert env.grant.asked[asked:] == [2, 1]
    assert len(env.card.maps) == maps
    assert src.reads == reads + 2


def test_a_flip_to_a_new_buffer_under_a_kept_id_reads_the_new_one(env, shown):
    """GNOME 48 on virtio-gpu, animating: between two flips the framebuffer not shown is freed and
    made again under its id, with the next frame. A flip back to it reads that frame at once,
    not the kept mapping's older one (which is let go)."""
    src, fb1 = shown
    fb2 = env.card.add_fb(2, tag=2)
    env.card.show(2)
    env.clock.advance(0.05)
    src.poll()
    assert frame_bytes(src) == fb2.visible(0, 0, W, H)
    os.close(fb1.fd)
    new1 = env.card.add_fb(1, tag=3)  # RMFB and ADDFB while 2 is shown: the same id and layout
    env.card.show(1)
    env.clock.advance(0.05)  # well within IDENTITY_CHECK_S of the last check of 1
    changes = src.poll()
    assert covers(changes.damage, 0, 0) and covers(changes.damage, W - 1, H - 1)
    assert frame_bytes(src) == new1.visible(0, 0, W, H)
    assert len(env.card.open_maps(1)) == 1  # the new buffer's; the old one's went


def test_flips_at_the_frame_rate_stay_within_the_services_grants(env, shown):
    """A compositor flipping between two framebuffers at 30 a second, looked at each frame: the
    flips' checks ask for at most FLIP_CHECKS_PER_S handles in any second, under the service's
    GRANTS_PER_S, and every look still reads the framebuffer shown."""
    from spice_streamd.framebuffers import GRANTS_PER_S

    src, fb1 = shown
    fb2 = env.card.add_fb(2, tag=2)
    asked = len(env.grant.asked)
    times = []
    for i in range(60):
        env.card.show(2 if i % 2 == 0 else 1)
        env.clock.advance(1 / 30)
        before = len(env.grant.asked)
        src.poll()
        times += [env.clock.now] * (len(env.grant.asked) - before)
        assert frame_bytes(src) == (fb2 if i % 2 == 0 else fb1).visible(0, 0, W, H)
    assert len(env.grant.asked) - asked >= 2 * scanout.FLIP_CHECKS_PER_S - 2  # checked, 2 s
    worst = max(sum(1 for u in times if t <= u < t + 1.0) for t in times)
    assert worst <= scanout.FLIP_CHECKS_PER_S < GRANTS_PER_S


def test_flips_keep_few_framebuffers_mapped(env, shown):
    src, _ = shown
    for fb_id in range(2, 2 + 2 * scanout.MAX_MAPPED):
        fb = env.card.add_fb(fb_id, tag=fb_id)
        env.card.show(fb_id)
        env.clock.advance(0.05)
        src.poll()
        assert frame_bytes(src) == fb.visible(0, 0, W, H)
        assert len(env.card.open_maps()) <= scanout.MAX_MAPPED
    assert env.card.open_maps(fb_id)  # the one shown is


def test_a_compositor_making_new_framebuffers_keeps_the_reader_bounded(env, shown):
    """The ids a compositor (a user's process) puts on the CRTC are remembered for the follow
    (NEW_FB_AFTER_S) in a bounded table, however many it makes."""
    src, _ = shown
    for fb_id in range(2, 60):
        env.card.add_fb(fb_id, tag=fb_id)
        env.card.show(fb_id)
        env.clock.advance(0.05)
        src.poll()
        assert len(src._seen_fbs) <= 2 * scanout.MAX_MAPPED


def test_a_mode_change(env, shown):
    src, _ = shown
    fb2 = env.card.add_fb(2, 80, 40, tag=2)
    env.card.show(2, 80, 40)
    env.clock.advance(0.05)
    changes = src.poll()
    assert changes.resized
    assert src.size == (80, 40)
    frame = src.grab()
    assert (frame.width, frame.height, frame.stride) == (80, 40, 320)
    assert frame_bytes(src) == fb2.visible(0, 0, 80, 40)
    assert not env.card.open_maps(1)  # the old size's framebuffer is let go


@pytest.mark.parametrize(("fb_size", "pitch", "offset", "at"), [
    ((W, H), W * 4 + 64, 0, (0, 0)),
    ((W, H + 20), W * 4, 0, (0, 7)),  # rows packed: one slice
    ((100, 70), 100 * 4 + 48, 4096, (13, 9)),
    ((100, 70), 100 * 4, 256, (36, 22)),  # the bottom-right corner exactly
], ids=["pitch", "y-offset", "pitch-offset-xy", "corner"])
def test_the_visible_part_of_a_bigger_framebuffer(env, fb_size, pitch, offset, at):
    fb = env.card.add_fb(1, *fb_size, pitch=pitch, offset=offset, tag=1)
    env.card.show(1, W, H, x=at[0], y=at[1])
    src = env.source()
    assert src.poll().resized
    assert src.size == (W, H)
    assert frame_bytes(src) == fb.visible(at[0], at[1], W, H)
    # A change under the CRTC's window is seen where it shows.
    fb.write(at[0] + 5, at[1] + 17, pixel(200, 200, 200))
    changes = env.look(src)
    assert covers(changes.damage, 5, 17)
    assert frame_bytes(src) == fb.visible(at[0], at[1], W, H)
    # One outside it is not.
    if at[1]:
        fb.write(at[0], at[1] - 1, pixel(201, 201, 201))
        assert not env.look(src)
    if at[0] + W < fb.meta.width:
        fb.write(at[0] + W, at[1] + 17, pixel(202, 202, 202))  # right of the window, band hot
        assert not env.look(src)
    assert frame_bytes(src) == fb.visible(at[0], at[1], W, H)


def test_a_crtc_window_past_its_framebuffer_is_no_picture(env):
    env.card.add_fb(1, tag=1)
    env.card.show(1, W, H, x=1)
    src = env.source()
    assert not src.poll()
    assert not src.live


# -- no picture, errors --------------------------------------------------------------------------------


def test_crtcs_failing_at_the_start_is_unavailable_and_closes_what_it_owns(env, monkeypatch):
    timers = []

    def timer():
        timers.append(timerfd.PeriodicTimer())
        return timers[-1]

    monkeypatch.setattr(scanout, "PeriodicTimer", timer)
    env.card.fail["crtcs"] = 1
    with pytest.raises(DisplayUnavailable, match="faked failure"):
        env.source()
    assert env.card.closed
    assert env.grant_closed == 1
    assert timers[0].fd == -1


def test_no_framebuffer_on_the_crtc(env):
    src = env.source()
    assert not src.poll()
    assert not src.live
    with pytest.raises(DisplayLost):
        src.grab()
    fb = env.card.add_fb(1, tag=1)
    env.card.show(1)
    env.clock.advance(0.1)
    assert src.poll().resized
    assert src.live
    assert frame_bytes(src) == fb.visible(0, 0, W, H)
    # And gone again (a VT switch to a display server that has not drawn yet).
    env.card.show(0, 0, 0)
    env.clock.advance(0.1)
    src.poll()
    assert not src.live
    with pytest.raises(DisplayLost):
        src.grab()


def test_the_picture_moves_to_the_crtc_that_shows_one(env):
    env.card.crtc_table = {30: kms.Crtc(30, 0, 0, 0, 0, 0, 0), CRTC: kms.Crtc(CRTC, 0, 0, 0, 0, 0, 0)}
    src = env.source()
    fb = env.card.add_fb(1, tag=1)
    env.card.show(1, crtc_id=30)
    assert src.poll().resized
    assert frame_bytes(src) == fb.visible(0, 0, W, H)
    fb2 = env.card.add_fb(2, tag=2)
    env.card.show(0, 0, 0, crtc_id=30)
    env.card.show(2, crtc_id=CRTC)
    env.clock.advance(0.1)
    src.poll()
    assert src.live
    assert frame_bytes(src) == fb2.visible(0, 0, W, H)


@pytest.mark.parametrize("fail", [("crtc", "crtcs"), ("framebuffer",), ("map",), ("plane",)])
def test_a_kms_error_mid_way_loses_the_picture_until_the_next_look(env, fail):
    env.card.plane_table[40] = kms.Plane(40, CRTC, 0, 1, "cursor", 0, 0)
    env.card.add_fb(1, tag=1)
    env.card.show(1)
    src = env.source()
    src.poll()
    assert env.card.open_maps(1)
    fb2 = env.card.add_fb(2, tag=2)
    env.card.show(2)  # a flip: framebuffer() and map() are asked for it
    for name in fail:
        env.card.fail[name] = 1
    env.clock.advance(0.1)
    src.poll()
    assert not src.live
    assert not env.card.open_maps()  # fb 1's mapping let go with the rest
    with pytest.raises(DisplayLost):
        src.grab()
    env.clock.advance(0.1)
    assert src.poll().resized
    assert src.live
    assert frame_bytes(src) == fb2.visible(0, 0, W, H)
    handles = env.card.closed_handles
    assert handles.count(Grant.handle_of(2)) == env.grant.asked.count(2)  # map failing too


@pytest.mark.parametrize(("fmt", "modifier"), [
    (kms.fourcc("NV12"), 0),
    (kms.fourcc("RG16"), 0),
    (XR24, (1 << 56) | 1),  # I915_FORMAT_MOD_X_TILED
])
def test_a_framebuffer_in_another_layout_is_unavailable(env, fmt, modifier):
    env.card.add_fb(1, fmt=fmt, modifier=modifier)
    env.card.show(1)
    src = env.source()
    with pytest.raises(DisplayUnavailable):
        src.poll()
    assert env.grant.asked == []  # refused before any handle is asked for


@pytest.mark.parametrize(("fmt", "modifier"), [(AR24, 0), (XR24, kms.MODIFIER_INVALID)])
def test_the_layouts_read(env, fmt, modifier):
    fb = env.card.add_fb(1, fmt=fmt, modifier=modifier, tag=1)
    env.card.show(1)
    src = env.source()
    assert src.poll().resized
    assert frame_bytes(src) == fb.visible(0, 0, W, H)


@pytest.mark.parametrize("refusal", [
    GrantRefused(errno.ENOENT, "not shown"),
    GrantRefused(errno.ETIMEDOUT, "no answer"),
    BrokenPipeError(errno.EPIPE, "the service is gone"),
])
def test_a_refused_grant_is_no_picture(env, refusal):
    fb = env.card.add_fb(1, tag=1)
    env.card.show(1)
    src = env.source()
    env.grant.refuse = refusal
    src.poll()
    assert not src.live
    env.grant.refuse = None
    env.clock.advance(0.1)
    assert src.poll().resized
    assert frame_bytes(src) == fb.visible(0, 0, W, H)


def test_a_refused_grant_on_a_flip_loses_the_picture_until_the_next_look(env, shown):
    src, _ = shown
    fb2 = env.card.add_fb(2, tag=2)
    env.card.show(2)
    env.grant.refuse = GrantRefused(errno.ETIMEDOUT, "no answer")
    env.clock.advance(0.1)
    assert not src.poll()
    assert not src.live
    assert not env.card.open_maps()
    env.grant.refuse = None
    env.clock.advance(0.1)
    assert src.poll().resized
    assert frame_bytes(src) == fb2.visible(0, 0, W, H)


def test_a_flip_before_the_services_check_is_looked_at_again_at_once(env, shown):
    """The service refuses (EPERM) a framebuffer the display no longer shows: it flipped between
    the look and the check. The same look reads the one shown now; the picture is never lost."""
    src, _ = shown
    fb3 = env.card.add_fb(3, tag=3)
    env.card.add_fb(2, tag=2)
    env.card.show(2)

    def flip(fb_id: int) -> None:
        if fb_id == 2:  # the compositor's next frame, before the service looks
            env.card.show(3)
            env.grant.refuse = GrantRefused(errno.EPERM, "not on the display now")
        else:
            env.grant.refuse = None

    env.grant.on_ask = flip
    env.clock.advance(0.1)
    changes = src.poll()
    assert env.grant.asked[-2:] == [2, 3]
    assert src.live and src.flip_retries == 1
    assert changes.damage
    assert frame_bytes(src) == fb3.visible(0, 0, W, H)


def test_a_lasting_refusal_is_asked_a_bounded_number_of_times(env, shown):
    src, _ = shown
    env.card.add_fb(2, tag=2)
    env.card.show(2)
    before = len(env.grant.asked)
    env.grant.refuse = GrantRefused(errno.EPERM, "not on the display now")
    env.clock.advance(0.1)
    src.poll()
    assert len(env.grant.asked) - before == scanout.FLIP_RETRIES + 1
    assert not src.live


# -- the cursor plane ------------------------------------------------------------------------------


def cursor_plane(fb_id: int, x: int, y: int, hot: tuple[int, int] = (0, 0),
                 crtc_id: int = CRTC, possible: int = 1) -> kms.Plane:
    return kms.Plane(40, crtc_id if fb_id else 0, fb_id, possible, "cursor", x, y, *hot)


@pytest.fixture
def with_cursor(env):
    env.card.add_fb(1, tag=1)
    env.card.show(1)
    cursor = env.card.add_fb(9, 64, 64, pitch=64 * 4 + 32, fmt=AR24, tag=9)
    env.card.plane_table = {39: kms.Plane(39, CRTC, 1, 1, "primary", 0, 0),
                            40: cursor_plane(9, 10, 20, hot=(3, 4))}
    return env.source(), cursor


def test_the_cursor_plane(env, with_cursor):
    src, cursor = with_cursor
    changes = src.poll()
    assert changes.cursor_changed and changes.pointer_moved
    assert src.pointer_position() == (13, 24)
    image = src.cursor_image()
    assert (image.width, image.height, image.hot_x, image.hot_y) == (64, 64, 3, 4)
    assert image.argb == cursor.visible(0, 0, 64, 64)
    assert Grant.handle_of(9) in env.card.closed_handles
    assert not env.card.open_maps(9)  # read once, not kept mapped

    # Moves.
    env.card.plane_table[40] = cursor_plane(9, -2, 30, hot=(3, 4))
    env.clock.advance(0.1)
    changes = src.poll()
    assert changes.pointer_moved and not changes.cursor_changed
    assert src.pointer_position() == (1, 34)

    # Still.
    env.clock.advance(0.1)
    changes = src.poll()
    assert not changes.pointer_moved and not changes.cursor_changed

    # A new image.
    arrow = env.card.add_fb(10, 32, 32, fmt=AR24, tag=10)
    env.card.plane_table[40] = cursor_plane(10, -2, 30, hot=(0, 0))
    env.clock.advance(0.1)
    changes = src.poll()
    assert changes.cursor_changed
    assert src.pointer_position() == (-2, 30)
    image = src.cursor_image()
    assert (image.width, image.height, image.hot_x, image.hot_y) == (32, 32, 0, 0)
    assert image.argb == arrow.visible(0, 0, 32, 32)

    # Hidden.
    env.card.plane_table[40] = cursor_plane(0, 0, 0)
    env.clock.advance(0.1)
    changes = src.poll()
    assert changes.cursor_changed
    assert src.cursor_image() is None


def test_a_moving_pointer_quickens_the_looks_and_a_still_one_does_not(env, with_cursor):
    """The pointer is followed at the pace it moves (up to the frame rate), not at IDLE_RATE;
    once it stops the looks slow down again, and nothing of the picture is re-read for it."""
    src, _ = with_cursor
    src.poll()
    env.settle(src)
    assert timer_interval(src.fileno()) == pytest.approx(1 / IDLE_RATE, abs=1e-6)
    reads = src.reads
    for x in range(12):
        env.card.plane_table[40] = cursor_plane(9, 11 + x, 20, hot=(3, 4))
        env.clock.advance(timer_interval(src.fileno()))
        changes = src.poll()
        assert changes.pointer_moved and not changes.damage
    assert timer_interval(src.fileno()) <= 1 / 8
    assert src.reads == reads
    env.settle(src)
    assert timer_interval(src.fileno()) == pytest.approx(1 / IDLE_RATE, abs=1e-6)


def test_a_cursor_on_another_crtcs_plane_is_not_used(env):
    env.card.crtc_table = {30: kms.Crtc(30, 0, 0, 0, 0, 0, 0), CRTC: kms.Crtc(CRTC, 0, 0, 0, 0, 0, 0)}
    env.card.add_fb(1, tag=1)
    env.card.show(1)
    env.card.add_fb(9, 64, 64, fmt=AR24, tag=9)
    env.card.plane_table = {40: cursor_plane(9, 10, 20, crtc_id=30, possible=0b01),
                            41: dataclasses.replace(cursor_plane(9, 50, 60), plane_id=41,
                                                    possible_crtcs=0b10)}
    src = env.source()
    changes = src.poll()
    assert changes.pointer_moved
    assert src.pointer_position() == (50, 60)  # plane 41's: CRTC 31 is the second


def test_a_cursor_the_grant_refuses_is_no_image_and_no_error(env, with_cursor):
    src, _ = with_cursor
    src.poll()  # the picture mapped
    env.grant.refuse = GrantRefused(errno.ENOENT, "not shown")
    env.card.add_fb(10, 32, 32, fmt=AR24)
    env.card.plane_table[40] = cursor_plane(10, 0, 0)
    env.clock.advance(0.1)
    changes = src.poll()
    assert changes.cursor_changed
    assert src.cursor_image() is None
    assert src.live


def test_a_cursor_in_another_format_is_no_image(env, with_cursor):
    src, _ = with_cursor
    src.poll()
    env.card.add_fb(10, 32, 32, fmt=XR24)
    env.card.plane_table[40] = cursor_plane(10, 0, 0)
    env.clock.advance(0.1)
    assert src.poll().cursor_changed
    assert src.cursor_image() is None


# -- pacing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fps", "refresh", "cap"), [(30, 60, 30), (30, 24, 24), (30, 0, 30),
                                                      (90, 0, 60), (3, 60, 3)])
def test_the_timer_follows_how_often_the_screen_changes(env, fps, refresh, cap):
    fb = env.card.add_fb(1, tag=1)
    env.card.show(1, refresh=refresh)
    src = env.source(fps=fps)
    assert timer_interval(src.fileno()) == pytest.approx(1 / fps, abs=1e-6)
    src.poll()
    idle = min(cap, IDLE_RATE)
    # The first picture is a change: twice one change a second, or IDLE_RATE if more.
    assert timer_interval(src.fileno()) == pytest.approx(1 / min(cap, max(IDLE_RATE, 2.0)),
                                                         abs=1e-6)
    # A screen that changes at every look: the looks quicken up to the frame rate and refresh.
    rates = []
    for i in range(int(3 * cap) + 10):
        fb.paint_rows(0, H, tag=10 + i % 2)
        env.clock.advance(timer_interval(src.fileno()))
        assert src.poll().damage
        rates.append(1 / timer_interval(src.fileno()))
    assert rates == sorted(rates)
    assert rates[-1] == pytest.approx(cap)
    assert src.reads == 1  # the whole picture changes, the sampled rows find each band
    # Still again: back to IDLE_RATE.
    env.settle(src)
    assert timer_interval(src.fileno()) == pytest.approx(1 / idle, abs=1e-6)


def test_the_rate_is_twice_the_changes_of_the_last_second(env, shown):
    src, fb = shown
    env.settle(src)
    start = env.clock.now
    for i in range(4):
        env.clock.advance(0.1)
        fb.paint_rows(0, H, tag=20 + i)
        assert src.poll().damage
    assert timer_interval(src.fileno()) == pytest.approx(1 / 8, abs=1e-6)  # 4 changes
    env.clock.now = start + 1.15  # the first change is more than a second old
    assert not src.poll()
    assert timer_interval(src.fileno()) == pytest.approx(1 / 6, abs=1e-6)
    env.clock.now = start + 1.35
    assert not src.poll()
    assert timer_interval(src.fileno()) == pytest.approx(1 / max(IDLE_RATE, 2.0), abs=1e-6)  # 1
    env.clock.now = start + 1.45
    assert not src.poll()
    assert timer_interval(src.fileno()) == pytest.approx(1 / IDLE_RATE, abs=1e-6)  # none


def test_a_source_not_wanted_rests_and_then_reads_whole(env, shown):
    src, fb = shown
    src.set_wanted(False)
    spec = timerfd._Itimerspec()
    assert timerfd._libc.timerfd_gettime(src.fileno(), ctypes.byref(spec)) == 0
    assert (spec.it_value.tv_sec, spec.it_value.tv_nsec) == (0, 0)  # disarmed
    fb.write(3, 3, pixel(5, 5, 5))
    src.set_wanted(False)  # again: no change
    assert src.live  # resting, it still has the picture (a grab of it is its last look)
    src.set_wanted(True)
    # The picture from before the rest is not offered as current (it is no longer what the
    # display shows): no picture until the next look.
    assert not src.live
    # Relayed again: the next look at once, then at least FOLLOW_RATE a second (the pace it had,
    # the first picture a second ago, was twice a second).
    assert timer_first(src.fileno()) <= scanout.FIRST_LOOK_S + 1e-6
    assert timer_interval(src.fileno()) == pytest.approx(
        1 / max(scanout.FOLLOW_RATE, 2.0), abs=1e-6)
    env.clock.advance(scanout.FIRST_LOOK_S)
    changes = src.poll()
    assert src.reads == 2  # whatever changed meanwhile is read whole, as a new picture
    assert src.live and changes.resized
    assert frame_bytes(src) == fb.visible(0, 0, W, H)


def test_relayed_again_it_follows_for_follow_s_then_idles(env, shown):
    """Back from a rest (relayed again after a VT switch) the display is about to change (Debian
    13: mutter's first commit 5-8 s after chvt under TCG): at least FOLLOW_RATE looks a second
    for FOLLOW_S, and IDLE_RATE after, on a screen that stays still."""
    src, fb = shown
    env.settle(src)
    assert timer_interval(src.fileno()) == pytest.approx(1 / IDLE_RATE, abs=1e-6)
    src.set_wanted(False)
    env.clock.advance(30)
    src.set_wanted(True)
    start = env.clock.now
    env.clock.advance(scanout.FIRST_LOOK_S)
    assert src.poll().resized
    intervals = []
    while env.clock.now < start + scanout.FOLLOW_S + 3:
        env.clock.advance(timer_interval(src.fileno()))
        assert not src.poll()
        intervals.append((env.clock.now - start, timer_interval(src.fileno())))
    following = [i for t, i in intervals if t < scanout.FOLLOW_S - 0.01]
    after = [i for t, i in intervals if t >= scanout.FOLLOW_S]
    assert following and max(following) <= 1 / scanout.FOLLOW_RATE + 1e-6
    assert after and all(i == pytest.approx(1 / IDLE_RATE, abs=1e-6) for i in after)
    # A change in those seconds is seen within a FOLLOW_RATE look, not IDLE_RATE's.
    src.set_wanted(False)
    src.set_wanted(True)
    env.clock.advance(scanout.FIRST_LOOK_S)
    src.poll()
    env.settle(src)
    fb.paint_rows(0, H, tag=9)  # a repaint
    env.clock.advance(timer_interval(src.fileno()))
    assert timer_interval(src.fileno()) <= 1 / scanout.FOLLOW_RATE + 1e-6
    assert src.poll().damage


def test_a_framebuffer_newly_shown_is_followed(env, shown):
    """A framebuffer not shown in the last NEW_FB_AFTER_S (a VT switch: fbcon's, mutter's first
    commit after Xorg's) starts FOLLOW_S of quick looks; so does one shown again after that long."""
    src, fb1 = shown
    env.settle(src)
    assert timer_interval(src.fileno()) == pytest.approx(1 / IDLE_RATE, abs=1e-6)
    env.card.add_fb(2, tag=2)
    env.card.show(2)
    env.clock.advance(1 / IDLE_RATE)
    assert src.poll().damage
    env.settle(src)  # still since: only the follow keeps the looks quick
    assert timer_interval(src.fileno()) == pytest.approx(1 / scanout.FOLLOW_RATE, abs=1e-6)
    shown_at = env.clock.now
    while env.clock.now < shown_at + scanout.FOLLOW_S:
        env.clock.advance(timer_interval(src.fileno()))
        assert not src.poll()
    assert timer_interval(src.fileno()) == pytest.approx(1 / IDLE_RATE, abs=1e-6)
    env.card.show(1)  # last shown more than NEW_FB_AFTER_S ago
    env.clock.advance(1 / IDLE_RATE)
    assert src.poll().damage
    env.settle(src)
    assert timer_interval(src.fileno()) == pytest.approx(1 / scanout.FOLLOW_RATE, abs=1e-6)


def test_flips_between_buffers_shown_lately_are_not_followed(env, shown):
    """A compositor flipping between its buffers (a blinking text cursor, every 1.2 s) starts no
    follow: once the screen is still the looks idle, as on a still screen."""
    src, _ = shown
    env.card.add_fb(2, tag=2)
    start = env.clock.now
    flips = 0
    while env.clock.now < start + scanout.FOLLOW_S + 2:
        env.card.show(2 if flips % 2 == 0 else 1)
        flips += 1
        env.clock.advance(1.2)
        src.poll()
    env.settle(src)
    assert timer_interval(src.fileno()) == pytest.approx(1 / IDLE_RATE, abs=1e-6)


def test_the_timer_idles_with_no_picture(env):
    src = env.source()
    src.poll()
    assert timer_interval(src.fileno()) == pytest.approx(1 / IDLE_RATE, abs=1e-6)


# -- closing -----------------------------------------------------------------------------------------


def test_close(env, shown):
    src, _ = shown
    assert env.card.open_maps()
    src.close()
    assert env.card.closed
    assert env.grant_closed == 1
    assert not env.card.open_maps()
    src.close()
    assert env.grant_closed == 1
    with pytest.raises(DisplayLost):
        src.poll()
    with pytest.raises(DisplayLost):
        src.grab()


def test_close_without_close_grant(tmp_path):
    card = FakeCard(tmp_path)
    src = Scanout(card, Grant())
    timer_fd = src.fileno()
    src.close()
    assert card.closed
    with pytest.raises(OSError):
        os.fstat(timer_fd)
def test_a_framebuffer_id_used_again_after_a_mode_change(env, shown):
    # The kernel gives a removed framebuffer's id to the next one made (idr_alloc, lowest free).
    src, old = shown
    os.close(old.fd)
    new = env.card.add_fb(1, 32, 24, tag=7)  # RMFB then ADDFB: the same id, another buffer
    env.card.show(1, 32, 24)
    env.clock.advance(0.1)
    assert src.poll().resized
    assert frame_bytes(src) == new.visible(0, 0, 32, 24)
    first_mapping = env.card.maps[0]
    assert first_mapping[0] == 1 and first_mapping[1].closed  # the old buffer's is let go


def test_a_framebuffer_id_used_again_with_the_same_layout(env, shown):
    """RMFB and ADDFB between two looks, the same layout under the same id (Debian 13's mutter
    after a mode set): GETFB2 without a handle cannot tell, the buffer's MAP_DUMB offset can. The
    new picture is read within IDENTITY_CHECK_S and a look, its differences as damage."""
    src, old = shown
    env.settle(src)
    replace_buffer_and_look(env, src, old, scanout.IDENTITY_CHECK_S)
    assert [f for f, m in env.card.maps if not m.closed] == [1]  # the old buffer's mapping went


def replace_buffer_and_look(env, src: Scanout, old: FakeFb, within: float) -> None:
    """Framebuffer 1's buffer freed and a new one of the same layout made under its id (RMFB and
    ADDFB between two looks): the looks of `within` seconds (and one more) read the new picture
    whole, its differences as damage."""
    os.close(old.fd)
    new = env.card.add_fb(1, tag=7)
    env.card.show(1)
    changes = env.look(src, looks=int(within * IDLE_RATE) + 1)
    assert covers(changes.damage, 0, 0) and covers(changes.damage, W - 1, H - 1), changes
    assert frame_bytes(src) == new.visible(0, 0, W, H)


def test_a_kept_mapping_costs_a_grant_a_second_and_no_read(env, shown, monkeypatch):
    """The buffer behind the id is asked for once per IDENTITY_CHECK_S while the screen has
    changed in the last ACTIVE_S, then once per IDENTITY_CHECK_STILL_S; the same buffer keeps its
    mapping and nothing is read whole."""
    src, fb = shown
    env.settle(src)
    reads, maps = src.reads, len(env.card.maps)

    def checks_over(seconds: float) -> int:
        asked = len(env.grant.asked)
        for _ in range(int(seconds * IDLE_RATE)):
            env.clock.advance(1 / IDLE_RATE)
            assert not src.poll()
        return len(env.grant.asked) - asked

    # At the first look IDENTITY_CHECK_S after the last check.
    every = math.ceil(scanout.IDENTITY_CHECK_S * IDLE_RATE - 1e-9) / IDLE_RATE
    active = checks_over(10)
    assert 10 / every - 1 <= active <= 10 / every + 1
    checks_over(scanout.ACTIVE_S)
    still = checks_over(20)
    every = math.ceil(scanout.IDENTITY_CHECK_STILL_S * IDLE_RATE - 1e-9) / IDLE_RATE
    # The look at `every` may come a hair early in float seconds: the check then waits a look.
    assert 20 / (every + 1 / IDLE_RATE) - 1 <= still <= 20 / every + 1
    assert src.reads == reads and len(env.card.maps) == maps


def test_pixels_changing_in_place_keep_the_still_pace_of_buffer_checks(env, shown):
    """A cursor blinking in the one framebuffer shown (fbcon; a compositor drawing in place) is
    not a change of buffer: past ACTIVE_S since the framebuffer was new, the buffer is asked for
    every IDENTITY_CHECK_STILL_S however often the pixels change (a grant is a round trip to the
    service: a third of a still console's cost at one a second under TCG)."""
    src, fb = shown
    env.clock.advance(scanout.ACTIVE_S + 1)
    asked = len(env.grant.asked)
    seen = 0
    for i in range(int(20 * IDLE_RATE)):
        fb.paint_rows(30, 32, tag=200 if i % 2 else 1)
        env.clock.advance(1 / IDLE_RATE)
        seen += bool(src.poll().damage)
    every = math.ceil(scanout.IDENTITY_CHECK_STILL_S * IDLE_RATE - 1e-9) / IDLE_RATE
    assert seen >= int(20 * IDLE_RATE) // 2  # the blinks were seen
    assert len(env.grant.asked) - asked <= 20 / every + 1


def test_a_still_screen_s_buffer_replaced_under_its_id_is_read_within_the_still_check(env, shown):
    src, old = shown
    env.clock.advance(scanout.ACTIVE_S + 1)
    assert not src.poll()
    env.settle(src)
    replace_buffer_and_look(env, src, old, scanout.IDENTITY_CHECK_STILL_S)


def test_a_change_back_to_an_older_picture_is_seen(env, shown):
    """A blinking cursor that stops where it started: A, then B (seen, its band hot), then A again
    once the band has cooled. The rows sampled on the still screen are compared with the picture
    held now (B), not with a copy taken before B: A is seen."""
    src, fb = shown
    for _ in range(2 * SAMPLE_PHASES):  # every phase's rows looked at on the still screen (A)
        env.clock.advance(1 / IDLE_RATE)
        assert not src.poll()
    before = fb.visible(0, 0, W, H)
    fb.write(0, 5, pixel(3, 3, 200))  # B
    assert env.look(src).damage
    env.settle(src)  # the band cools
    fb.write(0, 5, before[5 * W * 4:5 * W * 4 + 4])  # A again
    changes = env.look(src)
    assert covers(changes.damage, 0, 5), changes
    assert frame_bytes(src) == fb.visible(0, 0, W, H)


def test_nothing_mapped_is_kept_across_a_rest(env, shown):
    """A framebuffer freed and made again under the same id and layout while the reader rested
    (not streaming: a lock screen's cover ended) is mapped anew when it streams again."""
    src, fb = shown
    asked = len(env.grant.asked)
    src.set_wanted(False)
    assert src._mapped == {}
    new = env.card.add_fb(1, tag=9)  # the same id, another buffer
    src.set_wanted(True)
    env.clock.advance(1 / IDLE_RATE)
    src.poll()
    assert frame_bytes(src) == new.visible(0, 0, W, H)
    assert len(env.grant.asked) == asked + 1


def test_a_screen_blanked_and_back_under_a_used_id_is_read_anew(env, shown):
    """GNOME 43's lock screen: the CRTC shows nothing (blanked), then a new buffer under the old
    framebuffer's id and layout. Nothing mapped was kept across the blank: the new picture is
    read, not the old buffer's."""
    src, old = shown
    env.card.show(0, 0, 0)  # blanked
    env.clock.advance(0.2)
    src.poll()
    assert not src.live
    os.close(old.fd)
    new = env.card.add_fb(1, tag=8)  # the same id and layout, another buffer
    env.card.show(1)
    env.clock.advance(0.2)
    assert src.poll().resized
    assert frame_bytes(src) == new.visible(0, 0, W, H)


def test_a_framebuffer_not_shown_for_a_while_is_mapped_anew(env, shown):
    """A flip to another framebuffer for longer than MAPPING_KEPT_S, then back to the first id,
    which is now a new buffer of the same layout: read from the new buffer."""
    from spice_stream_worker.sources.scanout import MAPPING_KEPT_S

    src, old = shown
    env.card.add_fb(2, tag=2)
    env.card.show(2)
    env.clock.advance(0.2)
    src.poll()
    env.clock.advance(MAPPING_KEPT_S + 0.1)
    src.poll()
    assert 1 not in src._mapped
    os.close(old.fd)
    new = env.card.add_fb(1, tag=9)
    env.card.show(1)
    env.clock.advance(0.2)
    src.poll()
    assert frame_bytes(src) == new.visible(0, 0, W, H)


def test_a_cursor_plane_showing_nothing_costs_one_ioctl_a_look(env, with_cursor):
    """The cursor plane's properties (position, hotspot) are asked for only while it shows a
    cursor: on a text console each look reads the plane alone (each ioctl is a look's cost)."""
    src, _ = with_cursor
    src.poll()
    env.card.plane_table[40] = cursor_plane(0, 0, 0)  # hidden
    env.clock.advance(0.1)
    assert src.poll().cursor_changed and src.cursor_image() is None
    env.card.plane_reads.clear()
    for _ in range(3):
        env.clock.advance(1 / IDLE_RATE)
        src.poll()
    assert env.card.plane_reads == [(40, False)] * 3
    env.card.plane_table[40] = cursor_plane(9, 5, 6, hot=(3, 4))  # shown again
    env.card.plane_reads.clear()
    env.clock.advance(0.1)
    src.poll()
    assert env.card.plane_reads == [(40, False), (40, True)]
    assert src.pointer_position() == (8, 10)
