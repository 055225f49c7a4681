"""GNOME on Wayland: mutter's ScreenCast (D-Bus) records the primary monitor into a PipeWire node,
read with GStreamer's pipewiresrc through PyGObject.

Two threads. A dedicated one runs a GLib main loop on a main context of its own and owns the D-Bus
connection to the session bus, mutter's screen-cast session and the GStreamer pipeline; GStreamer's
streaming thread copies each frame out of its buffer (which is released at once: holding pipewiresrc's
buffers stalls the stream) into one slot under a lock and wakes the worker's selectors loop through
a pipe, fileno(). The worker's loop never waits on GLib: poll() takes the newest frame and compares
it with the previous one, pixel by pixel, as the X11 path does (pipewiresrc up to PipeWire 1.4
passes no damage regions). At most two frames are held: the slot and the framebuffer.

Lifecycle (mutter closes a screen cast for several reasons, the Closed signal says none of them):
  - the lock screen: gnome-shell closes every screen cast and refuses new ones while locked; the
    session is created again when org.gnome.ScreenSaver (or logind's LockedHint) says the screen
    is unlocked;
  - a change of the monitor layout (DisplayConfig's MonitorsChanged around the Closed): created
    again at once;
  - mutter leaving the bus (its name's owner gone or changed): created again when it is back;
  - another VT on the screen (logind's Active of the session false): the picture held is not
    current any more and none is taken until the session is back; a session that fails or closes
    meanwhile, or was still being made, is created again when it is back (never taken for the
    Stop button);
  - anything else is the user's Stop in GNOME's screen-sharing indicator: the worker exits with
    STOPPED_BY_USER and the service respects it until the next login;
  - failures to create: retried with backoff, a bounded number of times in a row.
While there is no stream the source is not `live` and the streamer sends nothing.

The cursor is embedded in the picture (cursor-mode 1): pipewiresrc passes no SPA_META_Cursor, so
there is no cursor shape or position to send apart (cursor_image() is None, no pointer motion).
"""

from __future__ import annotations

import logging
import os
import threading

from spice_stream_common.exitcodes import DisplayLost, DisplayUnavailable, WorkerError

from ..cursor import CursorImage
from ..damage import compare_frames
from ..geometry import Rect
from ..source import Changes, Frame
from .gstmedia import screencast_media
from .mutter import Controller, Timing

log = logging.getLogger(__name__)


class ScreenCast:
    """The capture source for GNOME on Wayland (see the module's text)."""

    def __init__(self, fps: int = 30, bus_address: str | None = None,
                 timing: Timing | None = None, session_id: str | None = None,
                 system_bus_address: str | None = None) -> None:
        gi = screencast_media()
        address = bus_address or os.environ.get("DBUS_SESSION_BUS_ADDRESS", "")
        if not address:
            raise DisplayUnavailable(
                "GNOME ScreenCast capture needs the session bus: DBUS_SESSION_BUS_ADDRESS is not set")
        self.timing = timing or Timing()
        self.size: tuple[int, int] = (0, 0)
        self.frames_received = 0  # frames taken by poll(), for the tests and the curious
        self._fb: bytearray | None = None
        self._live = False
        self._closed = False
        # Shared with the screen-cast and streaming threads, under _lock.
        self._lock = threading.Lock()
        self._slot: tuple[int, int, bytes] | None = None
        self._accept = 0  # frames are taken from this pipeline generation only (0: none)
        self._held = False  # the session is not on the screen: frames wait in _held_frame
        self._held_frame: tuple[int, int, bytes] | None = None
        self._up = False  # a stream is delivering frames
        self._fatal: WorkerError | None = None
        self._node: int | None = None
        self._waiting = "connecting to the session bus"
        self._settled = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The logind session the service verified (XDG_SESSION_ID): its LockedHint tells the lock
        # screen where gnome-shell does not own org.gnome.ScreenSaver.
        if session_id is None:
            session_id = os.environ.get("XDG_SESSION_ID", "")
        self._ctl = Controller(gi, address, fps, self.timing, self, session_id=session_id,
                               system_address=system_bus_address)
        self._thread = threading.Thread(target=self._ctl.run, name="screencast", daemon=True)
        self._thread.start()
        self._settled.wait(self.timing.start)  # not yet: the loop starts without a picture
        with self._lock:
            fatal = self._fatal
            if self._slot is not None:  # the size for the start line (poll() still says resized)
                self.size = self._slot[:2]
        if fatal is not None:
            self.close()
            if isinstance(fatal, DisplayLost):  # nothing was lost: it never worked
                fatal = DisplayUnavailable(str(fatal))
            raise fatal

    # -- the other threads' side (any thread) -----------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # full: the loop is woken already; closed: nobody to wake

    def _publish(self, gen: int, width: int, height: int, pixels: bytes) -> bool:
        """A frame of pipeline `gen`; False if that pipeline is no longer the one read. Its first
        frame is what makes the stream up, here and not later on the screen-cast thread: mutter
        sends a static screen's picture once, and a frame taken while not up is dropped."""
        with self._lock:
            if gen != self._accept:
                return False
            if self._held:
                self._held_frame = (width, height, pixels)
                return True
            self._slot = (width, height, pixels)
            first, self._up = not self._up, True
        self._wake()
        if first:
            self._settled.set()
        return True

    def _stream_started(self, gen: int, node: int) -> None:
        with self._lock:
            self._accept, self._node, self._up, self._slot = gen, node, False, None
            self._held_frame = None

    def _hold(self, waiting: str) -> None:
        """The session left the screen: the picture held is no longer current. Frames are kept
        aside until _release(): mutter paints none while another VT is on the screen, so one
        that came meanwhile was painted on the way back, and is current then."""
        with self._lock:
            self._held, self._up, self._slot, self._waiting = True, False, None, waiting
            self._held_frame = None
        self._wake()

    def _is_up(self) -> bool:
        """Whether the current stream has given a frame (since it started or came back)."""
        with self._lock:
            return self._up

    def _release(self) -> None:
        with self._lock:
            self._held, frame, self._held_frame = False, self._held_frame, None
            if frame is not None:
                self._slot, self._up = frame, True
        if frame is not None:
            self._wake()

    def _stream_gone(self, waiting: str) -> None:
        with self._lock:
            self._accept, self._up, self._slot, self._node = 0, False, None, None
            self._held_frame = None
            self._waiting = waiting
        self._wake()

    def _waiting_for(self, waiting: str, settled: bool = False) -> None:
        with self._lock:
            self._waiting = waiting
        if settled:
            self._settled.set()

    def _fail(self, exc: WorkerError) -> None:
        with self._lock:
            if self._fatal is None:
                self._fatal = exc
            self._accept, self._up, self._slot = 0, False, None
        self._settled.set()
        self._wake()

    # -- the worker's loop --------------------------------------------------------------------------

    @property
    def live(self) -> bool:
        """Whether there is a current picture: none while locked, between streams, before the first."""
        return self._live

    def describe(self) -> str:
        with self._lock:
            node, waiting = self._node, self._waiting
        if node is not None:
            return f"GNOME ScreenCast (PipeWire node {node})"
        return f"GNOME ScreenCast (no stream: {waiting})"

    def fileno(self) -> int:
        return self._wake_r

    def needs_poll(self) -> bool:
        return False  # everything comes through the pipe

    def poll(self) -> Changes:
        self._check_open()
        _drain(self._wake_r)
        with self._lock:
            fatal, slot, up = self._fatal, self._slot, self._up
            self._slot = None
        if fatal is not None:
            raise fatal
        changes = Changes()
        if not up:
            # No stream: nothing held, nothing claimed current; the next stream starts whole.
            self._fb, self._live = None, False
            return changes
        if slot is None:
            return changes
        width, height, pixels = slot
        self.frames_received += 1
        if self._fb is None or (width, height) != self.size:
            if self._fb is not None:
                log.info("GNOME ScreenCast: the picture is now %dx%d (was %dx%d)",
                         width, height, *self.size)
            self.size = (width, height)
            self._fb = bytearray(pixels)
            self._live = True
            changes.resized = True
            return changes
        changes.damage = compare_frames(self._fb, pixels, width, height)
        return changes

    def grab(self, rects: list[Rect] | None = None) -> Frame:
        """The newest picture; what changed was found by poll()'s compare, so `changed` is
        the damage given (clipped), or None for a whole frame."""
        self._check_open()
        if self._fb is None:
            raise DisplayLost("GNOME ScreenCast: no picture to capture (no stream)")
        width, height = self.size
        changed = None if rects is None else [
            c for r in rects if (c := r.clip(width, height)) is not None]
        return Frame(width, height, width * 4, memoryview(self._fb), changed)

    def pointer_position(self) -> tuple[int, int]:
        return (0, 0)  # never asked for: poll() reports no pointer motion (embedded cursor)

    def cursor_image(self) -> CursorImage | None:
        return None  # the cursor is in the picture

    def _check_open(self) -> None:
        if self._closed:
            raise DisplayLost("GNOME ScreenCast: the source is closed")

    def close(self) -> None:
        """Stop the thread (which sets the pipeline to NULL, stops the session and closes the
        connection), wait for it, close the pipe; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._ctl.quit()
        self._thread.join(self.timing.join)
        if self._thread.is_alive():
            log.warning("GNOME ScreenCast: its thread did not end within %g s", self.timing.join)
        with self._lock:
            self._slot, self._accept = None, 0
        self._fb = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> ScreenCast:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, OSError):
        pass
