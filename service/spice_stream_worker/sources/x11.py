"""The X11 capture source: the X connection, MIT-SHM or GetImage, XDamage, RandR, cursor, pointer."""

from __future__ import annotations

import logging
import os
import time

from Xlib import X
from Xlib import display as xdisplay
from Xlib import error as xerror
from Xlib.ext import damage as xdamage
from Xlib.ext import randr as xrandr
from Xlib.ext import xfixes, xinput

from spice_stream_common.exitcodes import DisplayLost, DisplayUnavailable

from .. import damage
from ..cursor import CursorImage, read_cursor
from ..geometry import Rect, bounding, row_spans
from ..source import Changes, Frame
from . import xauth, xshm

__all__ = ["NO_SHM_ENV", "Changes", "Frame", "Rect", "Screen", "row_spans"]

log = logging.getLogger(__name__)

# Set to 1 to capture with plain GetImage even where MIT-SHM works (tests, debugging).
NO_SHM_ENV = "SPICE_STREAM_WORKER_NO_SHM"

# Past this many damage rectangles in one poll, report their bounding box instead: an unbounded
# list would be an unbounded cost.
MAX_RECTS = 64
# At most this many events are handled per poll() so a flood cannot starve the caller.
MAX_EVENTS_PER_POLL = 20000

_GENERIC_EVENT = 35
_XI_RAW_MOTION = 17
_XI_RAW_MOTION_MASK = 1 << _XI_RAW_MOTION


class _RateLimit:
    """Lets through at most `burst` events per `interval` seconds, then counts the rest."""

    def __init__(self, burst: int = 5, interval: float = 10.0) -> None:
        self.burst, self.interval = burst, interval
        self.start, self.count, self.dropped = 0.0, 0, 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self.start > self.interval:
            self.start, self.count = now, 0
        self.count += 1
        if self.count <= self.burst:
            return True
        self.dropped += 1
        return False


class Screen:
    """Owns the X connection used by the worker: capture, damage, RandR, cursor/pointer events."""

    live = True  # an X display always has a picture (see source.CaptureSource.live)

    def __init__(self, display_name: str | None = None, use_shm: bool | None = None) -> None:
        self.name = display_name or os.environ.get("DISPLAY", "")
        self._closed = False
        self._seg: xshm.ShmSegment | None = None
        self._fb: bytearray | None = None
        self._pending_resize = False
        self._errors = _RateLimit()
        xauth.install()
        try:
            self._disp = xdisplay.Display(xauth.local_only(self.name))
        except Exception as exc:  # python-xlib raises several unrelated types for this
            raise DisplayUnavailable(
                f"cannot open X display {self.name!r}: {_one_line(exc)}"
            ) from None
        self.name = self._disp.get_display_name().removeprefix("unix/")
        try:
            self._setup(use_shm)
        except DisplayUnavailable:
            self.close()
            raise
        except (xerror.ConnectionClosedError, OSError) as exc:
            self.close()
            raise DisplayUnavailable(
                f"X display {self.name!r} closed during setup: {_one_line(exc)}"
            ) from None

    # -- setup --------------------------------------------------------------------------------

    def _setup(self, use_shm: bool | None) -> None:
        d = self._disp
        d.set_error_handler(self._on_async_error)
        screen = d.screen()
        self._root = screen.root
        self._check_format(screen)
        geom = self._root.get_geometry()
        self.size: tuple[int, int] = (geom.width, geom.height)

        for ext in ("DAMAGE", "XFIXES", "RANDR"):
            if not d.has_extension(ext):
                raise DisplayUnavailable(f"X display {self.name!r} lacks the {ext} extension")
        # Each of these extensions needs its version negotiated before its other requests work.
        d.damage_query_version()
        self._damage_event = d.query_extension("DAMAGE").first_event + xdamage.DamageNotifyCode
        self._damage = self._root.damage_create(xdamage.DamageReportDeltaRectangles)

        d.xfixes_query_version()
        self._xfixes_event = d.query_extension("XFIXES").first_event + xfixes.XFixesCursorNotify
        d.xfixes_select_cursor_input(self._root, xfixes.XFixesDisplayCursorNotifyMask)

        d.xrandr_query_version()
        self._randr_event = d.query_extension("RANDR").first_event + xrandr.RRScreenChangeNotify
        self._root.xrandr_select_input(xrandr.RRScreenChangeNotifyMask)

        self._xi_opcode = None
        if d.has_extension("XInputExtension"):
            opcode = d.query_extension("XInputExtension").major_opcode
            version = xinput.XIQueryVersion(
                display=d.display, opcode=opcode, major_version=2, minor_version=2
            )
            if (version.major_version, version.minor_version) >= (2, 0):
                self._root.xinput_select_events([(xinput.AllMasterDevices, _XI_RAW_MOTION_MASK)])
                self._xi_opcode = opcode
        if self._xi_opcode is None:
            log.info("display %s: no XInput2, pointer motion is not reported", self.name)

        if use_shm is None:
            use_shm = os.environ.get(NO_SHM_ENV, "") not in ("1", "true", "yes")
        self._want_shm = use_shm and xshm.init(d)
        self._alloc()
        d.sync()
        log.info(
            "display %s: %dx%d, capture with %s",
            self.name,
            self.size[0],
            self.size[1],
            "MIT-SHM" if self.uses_shm else "GetImage",
        )

    def _check_format(self, screen) -> None:
        depth = screen.root_depth
        formats = {f.depth: f.bits_per_pixel for f in self._disp.display.info.pixmap_formats}
        visual = next(
            (v for dp in screen.allowed_depths if dp.depth == depth for v in dp.visuals
             if v.visual_id == screen.root_visual),
            None,
        )
        ok = (
            depth in (24, 32)
            and formats.get(depth) == 32
            and self._disp.display.info.image_byte_order == X.LSBFirst
            and visual is not None
            and (visual.red_mask, visual.green_mask, visual.blue_mask)
            == (0xFF0000, 0xFF00, 0xFF)
        )
        if not ok:
            raise DisplayUnavailable(
                f"X display {self.name!r}: unsupported pixel format (depth {depth}); "
                "need 24/32-bit little-endian BGRX"
            )

    def _alloc(self) -> None:
        """(Re)allocate the framebuffer for the current size: a SHM segment, else a bytearray."""
        width, height = self.size
        nbytes = width * height * 4
        if self._seg is not None:
            self._seg.close()
            self._seg = None
        self._fb = None
        if self._want_shm:
            try:
                # The framebuffer, then room for damaged rectangles, captured apart to be compared
                # with it (pages are only used as far as captures reach).
                self._seg = xshm.ShmSegment(self._disp, 2 * nbytes)
            except xshm.ShmError as exc:
                log.warning(
                    "display %s: MIT-SHM unusable (%s), falling back to GetImage",
                    self.name,
                    _one_line(exc),
                )
                self._want_shm = False
        if self._seg is None:
            self._fb = bytearray(nbytes)

    @property
    def uses_shm(self) -> bool:
        return self._seg is not None

    def describe(self) -> str:
        return f"X display {self.name} ({'MIT-SHM' if self.uses_shm else 'GetImage'} capture)"

    # -- events -------------------------------------------------------------------------------

    def fileno(self) -> int:
        return self._disp.fileno()

    def queued(self) -> int:
        """Events python-xlib already read off the socket (select() on fileno() will not see them)."""
        return len(self._disp.display.event_queue)

    def needs_poll(self) -> bool:
        """Something to report without the socket being readable: queued events or a resize grab() saw."""
        return self._pending_resize or self.queued() > 0

    def poll(self) -> Changes:
        """Handle every queued X event without blocking; raises DisplayLost if the connection broke."""
        self._check_open()
        changes = Changes()
        rects: list[Rect] = []
        if self._pending_resize:
            changes.resized = True
            self._pending_resize = False
        d = self._disp
        handled = 0
        try:
            while handled < MAX_EVENTS_PER_POLL:
                n = d.pending_events()
                if not n:
                    break
                for _ in range(n):
                    self._handle(d.next_event(), changes, rects)
                    handled += 1
        except (xerror.ConnectionClosedError, OSError) as exc:
            raise DisplayLost(f"X display {self.name!r} connection lost: {_one_line(exc)}") from None
        width, height = self.size
        clipped = [c for r in rects if (c := r.clip(width, height)) is not None]
        if len(clipped) > MAX_RECTS:
            clipped = [bounding(clipped)]
        changes.damage = list(dict.fromkeys(clipped))
        return changes

    def _handle(self, ev, changes: Changes, rects: list[Rect]) -> None:
        etype = ev.type & 0x7F
        if etype == self._damage_event:
            a = ev.area
            rects.append(Rect(a.x, a.y, a.width, a.height))
        elif etype == _GENERIC_EVENT:
            if ev.extension == self._xi_opcode and ev.evtype == _XI_RAW_MOTION:
                changes.pointer_moved = True
        elif etype == self._xfixes_event:
            changes.cursor_changed = True
        elif etype == self._randr_event:
            new = (ev.width_in_pixels, ev.height_in_pixels)
            if ev.rotation & (xrandr.Rotate_90 | xrandr.Rotate_270):
                new = (new[1], new[0])
            if new != self.size:
                self._resize(new)
                changes.resized = True

    def _resize(self, new: tuple[int, int]) -> None:
        log.info("display %s: resized %dx%d -> %dx%d", self.name, *self.size, *new)
        self.size = new
        self._alloc()

    def _on_async_error(self, err, request) -> None:
        if self._errors.allow():
            log.warning("display %s: X error %s", self.name, _one_line(err))

    # -- capture ------------------------------------------------------------------------------

    def grab(self, rects: list[Rect] | None = None) -> Frame:
        """Bring the framebuffer up to date: the whole screen (None), or the damaged rects,
        captured apart and compared with it, so Frame.changed lists only what really changed."""
        self._check_open()
        for attempt in (0, 1):
            width, height = self.size
            todo = None if rects is None else damage.plan(rects, width, height)
            try:
                # The server's damage region is emptied here, by each capture, not by each poll:
                # drawn again before the capture, a damaged area is not reported again (delta
                # level), and need not be, since the capture reads it. An animation then costs
                # one event and one subtract per frame, not one of each per drawing request.
                # In the same request stream as the capture: what is drawn after this is
                # reported anew, what was drawn before is in the pixels read next.
                self._disp.damage_subtract(self._damage, X.NONE, X.NONE)
                if todo == []:
                    self._disp.flush()  # no capture request follows to carry it
                if todo is None:
                    spans = [(0, height)] if rects is None else row_spans(rects, height)
                    for y0, y1 in spans:
                        self._grab_rows(y0, y1)
                    # Unchecked: what X reported is what changed (whole rows were refreshed).
                    changed = None if rects is None else [
                        c for r in rects if (c := r.clip(width, height)) is not None]
                else:
                    changed = []
                    fb = self._pixels()
                    for rect in todo:
                        changed += damage.refresh(fb, width * 4, rect, self._grab_rect(rect),
                                                  rect.width * 4)
                break
            except xerror.XError as exc:
                # The server's size changed before we saw its RandR event; re-read it once.
                if attempt or not self._refresh_size():
                    raise DisplayLost(
                        f"X display {self.name!r}: capture failed: {_one_line(exc)}"
                    ) from None
                rects = None
            except (xerror.ConnectionClosedError, OSError) as exc:
                raise DisplayLost(
                    f"X display {self.name!r} connection lost: {_one_line(exc)}"
                ) from None
        width, height = self.size
        return Frame(width, height, width * 4, self._pixels(), changed)

    def _pixels(self) -> memoryview:
        width, height = self.size
        if self._seg is not None:
            return self._seg.memoryview()[: width * height * 4]
        return memoryview(self._fb)

    def _grab_rows(self, y0: int, y1: int) -> None:
        width = self.size[0]
        stride = width * 4
        if self._seg is not None:
            # Full-width strips land at their final place in the segment: no copy on our side.
            self._disp.shm_get_image(self._root, 0, y0, width, y1 - y0, self._seg.xid, y0 * stride)
        else:
            image = self._root.get_image(0, y0, width, y1 - y0, X.ZPixmap, 0xFFFFFFFF)
            self._fb[y0 * stride : y1 * stride] = image.data

    def _grab_rect(self, r: Rect) -> memoryview | bytes:
        """The pixels of r, rows r.width * 4 bytes apart, outside the framebuffer."""
        if self._seg is not None:
            offset = self.size[0] * self.size[1] * 4
            self._disp.shm_get_image(self._root, r.x, r.y, r.width, r.height, self._seg.xid,
                                     offset)
            return self._seg.memoryview()[offset : offset + r.width * r.height * 4]
        return self._root.get_image(r.x, r.y, r.width, r.height, X.ZPixmap, 0xFFFFFFFF).data

    def _refresh_size(self) -> bool:
        geom = self._root.get_geometry()
        new = (geom.width, geom.height)
        if new == self.size:
            return False
        self._resize(new)
        self._pending_resize = True
        return True

    # -- pointer and cursor -------------------------------------------------------------------

    def pointer_position(self) -> tuple[int, int]:
        self._check_open()
        try:
            reply = self._root.query_pointer()
        except (xerror.ConnectionClosedError, OSError) as exc:
            raise DisplayLost(f"X display {self.name!r} connection lost: {_one_line(exc)}") from None
        return reply.root_x, reply.root_y

    def cursor_image(self) -> CursorImage | None:
        self._check_open()
        try:
            return read_cursor(self._disp)
        except (xerror.ConnectionClosedError, OSError) as exc:
            raise DisplayLost(f"X display {self.name!r} connection lost: {_one_line(exc)}") from None

    # -- teardown -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise DisplayLost(f"X display {self.name!r}: screen is closed")

    def close(self) -> None:
        """Free the SHM segment and the connection; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._seg is not None:
            alive = True
            try:
                self._disp.flush()
            except Exception:  # noqa: BLE001 - a dead connection still needs the local detach
                alive = False
            self._seg.close(connection_alive=alive)
            self._seg = None
        self._fb = None
        self._close_connection()

    def _close_connection(self) -> None:
        try:
            self._disp.close()
        except Exception:  # noqa: BLE001 - closing a broken connection may fail; nothing to do
            pass

    def __enter__(self) -> Screen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _one_line(exc: object) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:300]
