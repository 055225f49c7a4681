"""What the display shows, whoever draws it (the login and lock screens, a text console, a session
nobody registered): the active CRTC's framebuffer and its cursor plane, read through the DRM device
the service opened, paced by a timer and compared pixel by pixel.

Nothing says when a framebuffer's pixels change (fbcon and a compositor drawing in place use one
framebuffer for ever: QXL under GNOME 43 and 48 did), so the pixels are looked at, never all of them
on a screen that stands still:
  - each look compares every SAMPLE_PHASES-th row (a different set each time): a change taller than
    SAMPLE_PHASES rows is seen at once, any change within SAMPLE_PHASES looks;
  - the bands (damage.ALIGN rows) where a sampled row differs, and those that changed in the last
    HOT_S (a blinking cursor, a moving window), are read and compared whole, tile by tile;
  - a look that finds a quarter of the bands changed (a repaint) compares the whole picture, and
    so do the next two looks;
  - looks come IDLE_RATE times a second, more while the screen changes or the pointer moves (twice
    the looks that found either in the last second), up to the frame rate and the display's
    refresh; at least FOLLOW_RATE for FOLLOW_S after what the display shows changed hands (the
    reader relayed again, a framebuffer not shown for NEW_FB_AFTER_S), when the next picture is
    about to come.
A new framebuffer on the CRTC (a page flip, a mode set, a VT switch) is always read whole.

The framebuffer handle comes from the service (fbgrant): the kernel gives it only to the DRM
master or to CAP_SYS_ADMIN, and this process has neither. Each mapping is read-only; the handle is
closed once mapped (the mapping keeps the buffer).
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import mmap
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from spice_stream_common import kms
from spice_stream_common.exitcodes import DisplayLost, DisplayUnavailable
from spice_stream_common.fbgrant import GrantRefused
from spice_stream_common.ratelimit import LogLimiter

from ..cursor import CursorImage, cursor_from_pixels
from ..damage import ALIGN, compare_bands, compare_frames
from ..geometry import Rect
from ..source import Changes, Frame
from ..timerfd import PeriodicTimer

log = logging.getLogger(__name__)

HOT_S = 1.5  # three still looks: a cursor blinking slower than the looks stays followed
# Looks per second at a still screen (VM, Debian 12, still console: 2.9% of a core at 5 a second,
# 1.5% at 2.5 with every 8th row, 1.07% at 2.5 with every 16th; 0.98% / 1.07% on Debian 12 / 13
# at 2, with the buffer checked once a second; 0.68-0.98% at 1.5 with the buffer checked every
# 2 s, too close to the 1% a still login screen may cost). A change on a still screen is seen
# within 0.8 s.
IDLE_RATE = 1.25
# A still look compares every SAMPLE_PHASES-th row: under TCG copying and comparing the rows is
# most of a look's cost (every 8th row of 1024x768, 393 KB a side: 5.8 ms, 1.5% of a core at 2.5
# looks a second, VM, Debian 12), so 16: a glyph of fbcon's 16-row font is found within a few
# looks, a pointer or anything taller than 16 rows at the next.
SAMPLE_PHASES = 16
# A look whose sampled rows changed in this share of the bands (and at least WIDE_MIN_BANDS) found
# a repaint, not an edit: the picture is compared whole at that look and the next
# WHOLE_LOOKS_AFTER_WIDE, so that what changed between sampled rows (the top bar's text, an
# icon) is not left stale for up to SAMPLE_PHASES looks (Debian 13, back to GNOME from a text
# console: the client had alice's desktop 4.5 s after QEMU's display, in pieces).
WIDE_SHARE = 0.25
WIDE_MIN_BANDS = 4
WHOLE_LOOKS_AFTER_WIDE = 2
MAX_MAPPED = 4  # framebuffers kept mapped (a compositor flips between two or three)
MAPPING_KEPT_S = 1.0
# How often a kept mapping is checked against the buffer the framebuffer id names now (a grant and
# MAP_DUMB's offset): a compositor may free a framebuffer and make a new one of the same layout
# under the same id while it is shown (Debian 13's mutter after a mode set), and the old mapping
# then shows a picture that no longer changes. That comes with a compositor's own changes of
# framebuffer (a mode set, flips, a start): each second for ACTIVE_S after the framebuffer shown
# last changed, then every IDENTITY_CHECK_STILL_S, also while pixels change in place (fbcon's
# blinking cursor, a compositor drawing into the one buffer it shows): a grant is a round trip to
# the service, a third of a still console's cost at one a second (Debian 13, TCG). At 4 s on a
# still screen, Debian 12's lock screen (virtio-gpu) gave way to the desktop in a new buffer under
# its framebuffer's id, and the client had the desktop 2 s after the display: the lock screen's
# old buffer was read until the check.
IDENTITY_CHECK_S = 1.0
IDENTITY_CHECK_STILL_S = 2.0
ACTIVE_S = 15.0
# Flips to a kept framebuffer are checked while fewer grants than this were asked for in the last
# second: the service grants 10 a second (framebuffers.GRANTS_PER_S, burst 20) and refuses past
# that; a compositor flipping at 30 fps gets its flips checked 6 times a second.
FLIP_CHECKS_PER_S = 6
CURSOR_MAX_SIDE = 512
LOG_EVERY_S = 5.0  # a line that a compositor's every frame could cause comes at most this often
# After the reader is relayed again, or a framebuffer not shown in the last NEW_FB_AFTER_S comes on
# the CRTC (a VT switch, a mode set, a compositor's first commit), looks come at least FOLLOW_RATE
# a second for FOLLOW_S: the next picture is about to come (a compositor repainting its screen,
# its own first commit). VM 17, Debian 13 under TCG, back to alice's Wayland session from bob's X11
# VT: Xorg's last framebuffer stayed on the CRTC until mutter's first commit 5-8 s after chvt, and
# looking at IDLE_RATE the client had her desktop 2.4-2.8 s after the display. A still look costs
# ~4 ms of a TCG core: 1.6% for those seconds. A compositor flipping between its buffers shows each
# of them far more often than NEW_FB_AFTER_S (a blinking cursor: 1.2 s).
FOLLOW_S = 10.0
FOLLOW_RATE = 4.0
NEW_FB_AFTER_S = 5.0
FIRST_LOOK_S = 0.01  # the first look once relayed again: at once (it was a look's period, 0.8 s)
# Looks again at once when the service refused a handle because the framebuffer asked for is no
# longer shown: the display flipped between the look and the service's check. Debian 12 on
# virtio-gpu, unlock under TCG: one such refusal dropped the picture and the desktop reached the
# client 3 s after the display.
FLIP_RETRIES = 2


@dataclass
class _Mapped:
    fb: kms.Framebuffer
    view: mmap.mmap
    key: int  # the buffer's MAP_DUMB offset: which buffer this is
    checked_at: float  # when the id last named this buffer
    shown_at: float = 0.0  # when a look last found it on the CRTC
    read: bool = False  # read whole since it was mapped


def _bands_of(rects: list[Rect]) -> int:
    """How many bands (ALIGN rows) the rectangles touch."""
    return len({b for r in rects for b in range(r.y // ALIGN, (r.y + r.height - 1) // ALIGN + 1)})


def _strided(buffer: mmap.mmap | bytearray, start: int, row: int, height: int, phase: int) -> bytes:
    """Rows phase, phase + SAMPLE_PHASES, ... of the `height` rows of `row` bytes from `start`,
    packed, in one copy."""
    views: list[memoryview] = []
    try:
        views.append(memoryview(buffer))
        views.append(views[-1][start:start + row * height])
        views.append(views[-1].cast("B", (height, row)))
        return views[-1][phase::SAMPLE_PHASES].tobytes()
    finally:
        for v in reversed(views):
            v.release()


class Scanout:
    """The capture source of the display itself (see the module's text)."""

    def __init__(self, card: kms.Card, grant: Callable[[int], int], fps: int = 30,
                 clock: Callable[[], float] = time.monotonic,
                 close_grant: Callable[[], None] | None = None) -> None:
        """Owns `card` (and what `close_grant` closes): close() closes them, and so does a
        failure here (DisplayUnavailable: the device lists no CRTCs, no timer)."""
        self._card = card
        self._grant = grant
        self._close_grant = close_grant
        self._fps = max(1, fps)
        self._clock = clock
        self._mapped: dict[int, _Mapped] = {}
        self._fb: bytearray | None = None
        self._shown: tuple | None = None  # (fb_id, x, y, width, height) last read
        self._crtc_id = 0
        self._cursor_plane = 0
        self._cursor_key: tuple | None = None
        self._cursor: CursorImage | None = None
        self._pointer = (0, 0)
        self._phase = 0
        self._whole_looks = 0  # looks left that compare the picture whole (after a repaint)
        self._hot: dict[int, float] = {}  # band -> when it last changed
        self._samples: dict[int, bytes] = {}  # phase -> the held picture's rows of that phase
        self._changes: deque[float] = deque()  # looks that found a change, the last second
        self._granted: deque[float] = deque()  # when handles were asked for, the last second
        self._log_limit = LogLimiter(log, interval=LOG_EVERY_S, clock=clock)
        self._active_at = clock()  # when the framebuffer shown (or its buffer) last changed
        self._follow_until = 0.0  # looks at FOLLOW_RATE until then
        self._seen_fbs: dict[int, float] = {}  # framebuffer id -> when a look last found it shown
        self._rate = 0.0
        self._wanted = True
        self._closed = False
        self.size = (0, 0)
        self.reads = 0  # whole reads, for the tests and the bench
        self.flip_retries = 0  # looks made again after a flip (the tests)
        timer = None
        try:
            timer = self._timer = PeriodicTimer()
            self._find_crtc()  # GETRESOURCES refused (EACCES), the device gone (ENODEV)
            self._set_rate(self._fps)
        except OSError as exc:
            if timer is not None:
                timer.close()
            card.close()
            if close_grant is not None:
                close_grant()
            raise DisplayUnavailable(f"scanout: cannot use {card.path}: {exc}") from None

    # -- which CRTC, which framebuffer -------------------------------------------------------------

    def _find_crtc(self) -> kms.Crtc | None:
        """The CRTC to read: the one read so far while it shows something, else the first that
        does (a SPICE VM has one display head; QXL offers four CRTCs)."""
        crtcs = self._card.crtcs()
        active = [c for c in crtcs if c.fb_id and c.width and c.height]
        chosen = next((c for c in active if c.crtc_id == self._crtc_id), None) or \
            (active[0] if active else None)
        if chosen is None:
            return None
        if chosen.crtc_id != self._crtc_id:
            self._crtc_id = chosen.crtc_id
            index = [c.crtc_id for c in crtcs].index(chosen.crtc_id)
            planes = self._card.planes()
            cursors = [p for p in planes if p.kind == "cursor" and p.possible_crtcs & (1 << index)]
            self._cursor_plane = cursors[0].plane_id if cursors else 0
            log.info("scanout: CRTC %d (%dx%d@%d), cursor plane %s", chosen.crtc_id, chosen.width,
                     chosen.height, chosen.refresh, self._cursor_plane or "none")
        return chosen

    def _crtc(self) -> kms.Crtc | None:
        try:
            c = self._card.crtc(self._crtc_id) if self._crtc_id else None
        except kms.KmsError:
            c = None
        if c is None or not (c.fb_id and c.width and c.height):
            c = self._find_crtc()
        return c

    def _map(self, fb_id: int, now: float, check: bool = False) -> _Mapped:
        """The framebuffer's mapping, kept from before if it still is that framebuffer's buffer:
        with `check` (a framebuffer newly shown: a flip, a mode set) GETFB2 must say the same of it
        (the kernel gives a removed framebuffer's id to the next one made, after a mode set another
        size) and the buffer the id names is asked for and compared (a new buffer of the same
        layout under the same id); without, that buffer is compared every IDENTITY_CHECK_S
        (IDENTITY_CHECK_STILL_S on a still screen). Only another buffer is mapped anew."""
        m = self._mapped.get(fb_id)
        fb = None
        if m is not None and check:
            fb = self._card.framebuffer(fb_id, handle=False)
            if fb != m.fb:
                self._unmap(fb_id)
                m = None
        every = IDENTITY_CHECK_S if now - self._active_at < ACTIVE_S else IDENTITY_CHECK_STILL_S
        # A flip to a kept framebuffer is checked too, within FLIP_CHECKS_PER_S: GNOME 48 on
        # virtio-gpu makes new buffers under its two ids while it animates (each look of 8 s of
        # animation found one), and a kept mapping then showed an older frame than the one
        # before it.
        if m is not None and not (check and self._flip_check_allowed(now)) \
                and now - m.checked_at < every:
            return m
        if fb is None:
            fb = self._card.framebuffer(fb_id, handle=False)
        if fb.pixel_format not in kms.FORMATS_BGRX or fb.modifier not in (kms.MODIFIER_LINEAR,
                                                                            kms.MODIFIER_INVALID):
            raise DisplayUnavailable(f"scanout: framebuffer {fb_id} is {fb.format_name} with "
                                     f"modifier {fb.modifier:#x}: only linear XRGB/ARGB8888 is read")
        self._granted.append(now)
        handle = self._grant(fb_id)
        try:
            key = self._card.buffer_offset(handle, f"framebuffer {fb_id}")
            if m is not None:
                if key == m.key and fb == m.fb:
                    m.checked_at = now
                    return m
                # GNOME 48 on virtio-gpu does it at each frame of an animation: a line at most
                # every few seconds.
                self._log_limit.log(logging.INFO, "another buffer",
                                    "scanout: framebuffer %d is another buffer now: read anew",
                                    fb_id)
                self._unmap(fb_id)
            view = self._card.map(fb, handle, offset=key)
        finally:
            self._card.close_handle(handle)
        while len(self._mapped) >= MAX_MAPPED:
            self._unmap(next(iter(self._mapped)))
        m = self._mapped[fb_id] = _Mapped(fb, view, key, now)
        return m

    def _flip_check_allowed(self, now: float) -> bool:
        """Whether a flip's check fits in FLIP_CHECKS_PER_S grants in the last second (the
        service grants GRANTS_PER_S; new framebuffers and the periodic checks need theirs)."""
        while self._granted and now - self._granted[0] >= 1.0:
            self._granted.popleft()
        return len(self._granted) < FLIP_CHECKS_PER_S

    def _drop_unshown(self, now: float, current: int) -> None:
        """Mappings of framebuffers not shown for MAPPING_KEPT_S go: a compositor flipping
        between its buffers shows each of them often; one not seen for that long may be freed and
        its id given to a new buffer of the same layout, which nothing would tell apart."""
        for fb_id in [f for f, m in self._mapped.items()
                      if f != current and now - m.shown_at > MAPPING_KEPT_S]:
            self._unmap(fb_id)

    def _unmap(self, fb_id: int) -> None:
        m = self._mapped.pop(fb_id, None)
        if m is not None:
            m.view.close()

    # -- pacing --------------------------------------------------------------------------------------

    def _set_rate(self, rate: float) -> None:
        if rate != self._rate:
            self._rate = rate
            if self._wanted:
                self._timer.arm(1.0 / rate)

    def set_wanted(self, wanted: bool) -> None:
        """Look at the screen only while frames are wanted (the worker's loop says when); the
        next look after a rest reads the picture whole."""
        if wanted == self._wanted:
            return
        self._wanted = wanted
        if wanted:
            # The picture held is from before the rest (another VT's, another mode's: Debian 12's
            # client got an 800x600 picture of a screen that was 1024x768 by then): no picture
            # until a look has read the screen whole (the streamer waits while it is not live).
            self._fb, self._shown = None, None
            self._hot.clear()
            self._samples.clear()
            now = self._clock()
            self._follow_until = now + FOLLOW_S
            self._rate = max(self._rate or IDLE_RATE, self._floor(now))
            self._timer.arm(1.0 / self._rate, first=FIRST_LOOK_S)
        else:
            self._timer.arm(0)
            # While it rests, compositors may free their framebuffers and make new ones under the
            # same ids (the kernel gives out the lowest free id; a lock, a VT switch): nothing
            # mapped is kept across a rest, each framebuffer is granted and mapped anew.
            for fb_id in list(self._mapped):
                self._unmap(fb_id)

    def _active_rate(self, crtc: kms.Crtc) -> float:
        return float(min(self._fps, crtc.refresh or 60))

    def _floor(self, now: float) -> float:
        """The fewest looks a second now: FOLLOW_RATE while following a change (see FOLLOW_S),
        else IDLE_RATE (never past the frame rate)."""
        return min(float(self._fps), FOLLOW_RATE) if now < self._follow_until else IDLE_RATE

    def _note_shown(self, now: float, fb_id: int) -> None:
        """Follow (FOLLOW_S) when a framebuffer not shown for NEW_FB_AFTER_S comes on the CRTC;
        not the first one a reader ever finds (it starts at its frame rate)."""
        last = self._seen_fbs.get(fb_id)
        if self._seen_fbs and (last is None or now - last > NEW_FB_AFTER_S):
            self._follow_until = now + FOLLOW_S
        self._seen_fbs[fb_id] = now
        if len(self._seen_fbs) > 2 * MAX_MAPPED:  # a compositor's new ids at each frame
            recent = {f: t for f, t in self._seen_fbs.items() if now - t <= NEW_FB_AFTER_S}
            self._seen_fbs = recent if len(recent) <= 2 * MAX_MAPPED else {fb_id: now}

    # -- the worker's loop ---------------------------------------------------------------------------

    @property
    def live(self) -> bool:
        return self._fb is not None

    def describe(self) -> str:
        return f"the display's scanout ({self._card.path}, CRTC {self._crtc_id or 'none'})"

    def fileno(self) -> int:
        return self._timer.fileno()

    def needs_poll(self) -> bool:
        return False

    def poll(self) -> Changes:
        self._check_open()
        self._timer.read()
        now = self._clock()
        changes = Changes()  # one for the retries too: a cursor change found stays found
        retries = 0
        while True:
            try:
                crtc = self._look(now, changes)
                break
            except GrantRefused as exc:
                if exc.errno == errno.EPERM and retries < FLIP_RETRIES:
                    # The display flipped between this look's GETCRTC and the service's check
                    # (a compositor's animation: Debian 12's unlock under TCG): look again now,
                    # at the framebuffer shown now.
                    retries += 1
                    self.flip_retries += 1
                    continue
                self._forget(str(exc))
                return changes
            except OSError as exc:  # KmsError, or a broken grant socket
                # The framebuffer went between two ioctls (a mode set, a VT switch), or the
                # service gave no handle (no answer in time): the next look finds the new one; a
                # lasting failure is the same error at each look, logged once.
                self._forget(str(exc))
                return changes
        if crtc is not None:
            self._pace(now, crtc, changes)
        return changes

    def _look(self, now: float, changes: Changes) -> kms.Crtc | None:
        """One look at the display: `changes` filled in, the CRTC looked at (None: none shows a
        picture)."""
        crtc = self._crtc()
        if crtc is None:
            if self._fb is not None:
                log.info("scanout: no CRTC shows a picture")
            # Nothing kept: what comes back (a screen unblanked) may be new buffers under the
            # ids of the old ones (GNOME 43's lock screen was: its picture stayed black).
            self._forget("")
            return None
        self._poll_cursor(crtc, changes)
        self._note_shown(now, crtc.fb_id)
        shown = (crtc.fb_id, crtc.x, crtc.y, crtc.width, crtc.height)
        self._drop_unshown(now, crtc.fb_id)
        m = self._map(crtc.fb_id, now, check=shown != self._shown)
        m.shown_at = now
        if shown != self._shown or self._fb is None or not m.read:
            self._read_new(m, crtc, shown, changes)
        elif self._whole_looks:
            self._whole_looks -= 1
            changes.damage = compare_frames(self._fb, self._read(m, crtc), *self.size)
            if self._wide(_bands_of(changes.damage), crtc):
                self._whole_looks = WHOLE_LOOKS_AFTER_WIDE  # still repainting
        else:
            bands = {y for y, t in self._hot.items() if now - t <= HOT_S}
            found = self._sampled_bands(m, crtc, bands) - bands  # hot ones are read anyway
            if self._wide(len(found), crtc):
                changes.damage = compare_frames(self._fb, self._read(m, crtc), *self.size)
                self._whole_looks = WHOLE_LOOKS_AFTER_WIDE
            else:
                # A change seen in a sampled row may go on in the bands beside it, whose
                # sampled rows this look did not reach: they are read whole too.
                bands |= {y + d for y in found for d in (-ALIGN, 0, ALIGN)
                          if 0 <= y + d < crtc.height}
                if bands:
                    changes.damage = compare_bands(
                        self._fb, lambda y, rows: self._rows(m, crtc, y, rows), *self.size,
                        bands)
        return crtc

    @staticmethod
    def _wide(bands: int, crtc: kms.Crtc) -> bool:
        """Whether changes in that many bands are a repaint (see WIDE_SHARE)."""
        return bands >= max(WIDE_MIN_BANDS, WIDE_SHARE * -(-crtc.height // ALIGN))

    def _pace(self, now: float, crtc: kms.Crtc, changes: Changes) -> None:
        """Remember what changed; look again sooner the more often the screen changes."""
        if changes.damage or changes.resized:
            self._samples.clear()  # the held picture changed
        if changes.damage or changes.resized or changes.pointer_moved:
            self._changes.append(now)  # the pointer too: it is followed at the pace it moves
        for r in changes.damage:
            for y in range(r.y // ALIGN * ALIGN, r.y + r.height, ALIGN):
                self._hot[y] = now
        while self._changes and now - self._changes[0] > 1.0:
            self._changes.popleft()
        if len(self._hot) > 4096 // ALIGN:  # a tall screen that changed all over: forget the old
            self._hot = {y: t for y, t in self._hot.items() if now - t <= HOT_S}
        self._set_rate(min(self._active_rate(crtc), max(self._floor(now),
                                                        2.0 * len(self._changes))))

    def _forget(self, why: str) -> None:
        if self._fb is not None and why:
            log.info("scanout: picture lost (%s)", why)
        for fb_id in list(self._mapped):
            self._unmap(fb_id)
        self._fb, self._shown = None, None
        self._hot.clear()
        self._samples.clear()
        self._set_rate(self._floor(self._clock()))

    def _read_new(self, m: _Mapped, crtc: kms.Crtc, shown: tuple, changes: Changes) -> None:
        self._active_at = self._clock()  # another framebuffer (or buffer) shown: a flip, a mode set
        size = (crtc.width, crtc.height)
        if crtc.x + crtc.width > m.fb.width or crtc.y + crtc.height > m.fb.height:
            raise kms.KmsError(0, f"CRTC {crtc.crtc_id} shows {size} at ({crtc.x}, {crtc.y}) of a "
                                  f"{m.fb.width}x{m.fb.height} framebuffer")
        pixels = self._read(m, crtc)
        m.read = True
        if self._fb is None or size != self.size:
            if self._fb is not None:
                log.info("scanout: the picture is now %dx%d (was %dx%d)", *size, *self.size)
            else:
                # Once per start, rest or loss: when the reader first had the display's picture,
                # beside the client's time of it (VM 17: which of the two was late).
                log.info("scanout: a picture, %dx%d from framebuffer %d", *size, crtc.fb_id)
            self.size = size
            self._fb = bytearray(pixels)
            changes.resized = True
        else:
            changes.damage = compare_frames(self._fb, pixels, *size)
        self._shown = shown
        # Framebuffers no longer shown after a mode set are not kept mapped.
        for fb_id in [f for f, mm in self._mapped.items()
                      if (mm.fb.width, mm.fb.height) != (m.fb.width, m.fb.height)]:
            self._unmap(fb_id)

    def _read(self, m: _Mapped, crtc: kms.Crtc) -> bytes:
        """The visible part of the framebuffer, rows packed (width * 4 bytes each)."""
        self.reads += 1
        return self._rows(m, crtc, 0, crtc.height)

    @staticmethod
    def _rows(m: _Mapped, crtc: kms.Crtc, y: int, rows: int) -> bytes:
        """Rows y to y + rows - 1 of the visible part, packed."""
        fb, view = m.fb, m.view
        row = crtc.width * 4
        start = fb.offset + (crtc.y + y) * fb.pitch + crtc.x * 4
        if fb.pitch == row:
            return view[start:start + row * rows]
        return b"".join(view[start + i * fb.pitch:start + i * fb.pitch + row] for i in range(rows))

    def _sampled_bands(self, m: _Mapped, crtc: kms.Crtc, skip: set[int]) -> set[int]:
        """The bands in which one of this look's rows (every SAMPLE_PHASES-th, from a phase that
        turns) differs from the picture held; rows of the bands in `skip` are not looked at."""
        assert self._fb is not None
        fb, view, held = m.fb, m.view, self._fb
        row = crtc.width * 4
        start = fb.offset + crtc.y * fb.pitch + crtc.x * 4
        self._phase = (self._phase + 1) % SAMPLE_PHASES
        if fb.pitch == row:
            return self._sampled_bands_packed(view, start, crtc, held)
        found = set()
        for y in range(self._phase, crtc.height, SAMPLE_PHASES):
            band = y // ALIGN * ALIGN
            if band in skip or band in found:
                continue
            a = start + y * fb.pitch
            if not held.startswith(view[a:a + row], y * row):
                found.add(band)
        return found

    def _sampled_bands_packed(self, view: mmap.mmap, start: int, crtc: kms.Crtc,
                              held: bytearray) -> set[int]:
        """_sampled_bands for rows with no gap between them (the usual layout): this look's rows
        taken in one strided copy from each side and compared at once; a Python step per row
        only where they differ. Under TCG a look cost 6 ms with a step per row (3% of a core at
        5 looks a second), most of it the interpreter's."""
        row, height, phase = crtc.width * 4, crtc.height, self._phase
        new = _strided(view, start, row, height, phase)
        # The held picture's rows of this phase, copied once while it does not change.
        old = self._samples.get(phase)
        if old is None:
            old = self._samples[phase] = _strided(held, 0, row, height, phase)
        if new == old:
            return set()
        found = set()
        for i, y in enumerate(range(phase, height, SAMPLE_PHASES)):
            if new[i * row:(i + 1) * row] != old[i * row:(i + 1) * row]:
                found.add(y // ALIGN * ALIGN)
        return found

    def _poll_cursor(self, crtc: kms.Crtc, changes: Changes) -> None:
        if not self._cursor_plane:
            return
        # Its position and hotspot only while it shows something (one ioctl less a look).
        plane = self._card.plane(self._cursor_plane, props=False)
        if plane.crtc_id == crtc.crtc_id and plane.fb_id:
            plane = self._card.plane(self._cursor_plane)
        if plane.crtc_id != crtc.crtc_id or not plane.fb_id:
            key: tuple = ()
        else:
            key = (plane.fb_id, plane.hot_x, plane.hot_y)
            pointer = (plane.crtc_x + plane.hot_x, plane.crtc_y + plane.hot_y)
            if pointer != self._pointer:
                self._pointer = pointer
                changes.pointer_moved = True
        if key != self._cursor_key:
            self._cursor_key = key
            self._cursor = self._read_cursor(plane) if key else None
            changes.cursor_changed = True

    def _read_cursor(self, plane: kms.Plane) -> CursorImage | None:
        """The cursor plane's image; its contents are read once per framebuffer (a compositor
        that draws a new cursor into the same buffer is not followed: none seen does)."""
        try:
            fb = self._card.framebuffer(plane.fb_id, handle=False)
            if fb.pixel_format != kms.fourcc("AR24") or not 0 < fb.width <= CURSOR_MAX_SIDE \
                    or not 0 < fb.height <= CURSOR_MAX_SIDE:
                return None
            handle = self._grant(plane.fb_id)
            try:
                with self._card.map(fb, handle) as view:
                    data = b"".join(view[fb.offset + y * fb.pitch:fb.offset + y * fb.pitch + fb.width * 4]
                                    for y in range(fb.height))
            finally:
                self._card.close_handle(handle)
        except (kms.KmsError, OSError) as exc:
            log.info("scanout: cursor plane %d not read: %s", plane.plane_id, exc)
            return None
        words = array.array("I", data)
        return cursor_from_pixels(fb.width, fb.height, plane.hot_x, plane.hot_y, words)

    def grab(self, rects: list[Rect] | None = None) -> Frame:
        self._check_open()
        if self._fb is None:
            raise DisplayLost("scanout: no picture to capture")
        width, height = self.size
        changed = None if rects is None else [
            c for r in rects if (c := r.clip(width, height)) is not None]
        return Frame(width, height, width * 4, memoryview(self._fb), changed)

    def pointer_position(self) -> tuple[int, int]:
        return self._pointer

    def cursor_image(self) -> CursorImage | None:
        return self._cursor

    def _check_open(self) -> None:
        if self._closed:
            raise DisplayLost("scanout: the source is closed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fb_id in list(self._mapped):
            with contextlib.suppress(OSError, ValueError):
                self._unmap(fb_id)
        self._timer.close()
        self._card.close()
        if self._close_grant is not None:
            self._close_grant()
        self._fb = None

    def __enter__(self) -> Scanout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
