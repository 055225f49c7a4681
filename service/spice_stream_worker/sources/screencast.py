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
    session is created again when org.gnome.ScreenSaver says the screen is unlocked;
  - a change of the monitor layout (DisplayConfig's MonitorsChanged around the Closed): created
    again at once;
  - mutter leaving the bus (its name's owner gone or changed): created again when it is back;
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
import time
from dataclasses import dataclass
from typing import Any

from spice_stream_common.exitcodes import (
    DisplayLost,
    DisplayUnavailable,
    StoppedByUser,
    WorkerError,
)

from .. import damage
from ..cursor import CursorImage
from ..geometry import Grid, Rect, areas
from ..source import Changes, Frame

log = logging.getLogger(__name__)

MUTTER = "org.gnome.Mutter.ScreenCast"
MUTTER_PATH = "/org/gnome/Mutter/ScreenCast"
SESSION_IFACE = "org.gnome.Mutter.ScreenCast.Session"
STREAM_IFACE = "org.gnome.Mutter.ScreenCast.Stream"
SCREENSAVER = "org.gnome.ScreenSaver"
SCREENSAVER_PATH = "/org/gnome/ScreenSaver"
DISPLAY_CONFIG = "org.gnome.Mutter.DisplayConfig"
DISPLAY_CONFIG_PATH = "/org/gnome/Mutter/DisplayConfig"
DBUS = "org.freedesktop.DBus"

CURSOR_EMBEDDED = 1  # RecordMonitor's cursor-mode: 0 hidden, 1 embedded, 2 metadata

# The pixel compare: bands of damage.ALIGN rows, each compared whole first (one memcmp), then the
# changed ones tile by tile, tiles as wide as the encoder's widest (8 MCUs).
TILE_WIDTH = 128
# Past this share of changed bands the tiles are not looked at: the changed bands go whole.
REFINE_MAX_SHARE = 0.35
MAX_SIDE = 16384  # a frame larger than this is refused (a broken caps negotiation)

# What each missing piece is called in Debian.
PACKAGE_GI = "python3-gi"
PACKAGE_GST = "gir1.2-gstreamer-1.0"
PACKAGE_GST_BASE_GIR = "gir1.2-gst-plugins-base-1.0"
PACKAGE_GST_BASE = "gstreamer1.0-plugins-base"
PACKAGE_PIPEWIRE = "gstreamer1.0-pipewire"
ELEMENTS = (("pipewiresrc", PACKAGE_PIPEWIRE), ("videoconvert", PACKAGE_GST_BASE),
            ("appsink", PACKAGE_GST_BASE))


@dataclass
class Timing:
    """How long the source waits for what (the tests shorten them)."""

    # The constructor waits this long for a first picture (or a known reason to wait: locked)
    # before the worker's loop starts; the picture may come later. Short: the service counts a
    # worker that says nothing for 30 s as stuck, and mutter's first frame of a boot took 12 s.
    start: float = 5.0
    # Start -> PipeWireStreamAdded: 0.2-3 s seen, 6.2 s while gnome-shell was starting (VM, TCG).
    node: float = 15.0
    # A node -> its first frame: 13.4 s after CreateSession for the first screen cast of a boot
    # (Debian 12), 3.9-8.5 s later on a busy host; in a session created while gnome-shell was
    # still starting (Debian 13) none came in 25 s, and the next session's did.
    frame: float = 30.0
    settle: float = 1.0  # after Closed: what else happened around it (lock, layout, mutter)
    mutter_gone: float = 60.0  # mutter off the bus this long: DisplayLost
    backoff: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)  # one delay per failure in a row
    call_ms: int = 5000  # each D-Bus call
    join: float = 5.0  # close(): the thread's end


class _Gi:
    """The PyGObject modules, imported when a screen cast is opened, never before."""

    def __init__(self) -> None:
        try:
            import gi
        except ImportError:
            raise DisplayUnavailable(
                f"GNOME ScreenCast capture needs PyGObject: install the Debian package {PACKAGE_GI}"
            ) from None
        try:
            gi.require_version("Gst", "1.0")
            from gi.repository import Gst
        except (ValueError, ImportError):
            raise DisplayUnavailable(
                f"GNOME ScreenCast capture needs GStreamer's introspection data: install the "
                f"Debian package {PACKAGE_GST}") from None
        try:
            gi.require_version("GstVideo", "1.0")
            from gi.repository import GstVideo
        except (ValueError, ImportError):
            raise DisplayUnavailable(
                f"GNOME ScreenCast capture needs GStreamer's video library data: install the "
                f"Debian package {PACKAGE_GST_BASE_GIR}") from None
        from gi.repository import Gio, GLib

        Gst.init(None)
        for element, package in ELEMENTS:
            if Gst.ElementFactory.find(element) is None:
                raise DisplayUnavailable(
                    f"GNOME ScreenCast capture needs the GStreamer element {element}: install "
                    f"the Debian package {package}")
        self.GLib, self.Gio, self.Gst, self.GstVideo = GLib, Gio, Gst, GstVideo


def pipeline_description(node: int, fps: int) -> str:
    """The pipeline for a PipeWire node: BGRx in system memory, at most `fps` frames a second.

    A framerate range, not a value: mutter offers a range and fixed values have failed to negotiate
    (GNOME 50). `path` is the node id mutter gives (target-object would want a serial or a name).
    appsink keeps one buffer at most and drops the older one: a late consumer never holds
    pipewiresrc's buffers."""
    return (f"pipewiresrc path={int(node)} do-timestamp=true ! videoconvert ! "
            f"video/x-raw,format=BGRx,framerate=[0/1,{int(fps)}/1] ! "
            "appsink name=sink max-buffers=1 drop=true sync=false emit-signals=true")


def compare(fb: bytearray, new: bytes, width: int, height: int) -> list[Rect]:
    """Bring `fb` (the previous frame) to `new` and return what differed, as rectangles of whole
    bands (damage.ALIGN rows) and tiles (TILE_WIDTH columns) merged where they touch.

    Each band is compared whole first (memcmp speed); only the bands that differ are looked at
    tile by tile, with damage.refresh, the compare the X11 path uses."""
    stride = width * 4
    band = damage.ALIGN
    changed_bands = []
    for y in range(0, height, band):
        a, b = y * stride, min(y + band, height) * stride
        if fb[a:b] != new[a:b]:
            changed_bands.append(y)
    if not changed_bands:
        return []
    grid = Grid(width, height, TILE_WIDTH, band)
    if len(changed_bands) > REFINE_MAX_SHARE * grid.rows:
        fb[:] = new
        cells = {y // band: list(range(grid.columns)) for y in changed_bands}
        return [grid.rect(a) for a in areas(cells)]
    src, view = memoryview(new), memoryview(fb)
    cells = {}
    for y in changed_bands:
        rows = min(band, height - y)
        for column in range(grid.columns):
            x = column * TILE_WIDTH
            tile = Rect(x, y, min(TILE_WIDTH, width - x), rows)
            if damage.refresh(view, stride, tile, src[y * stride + x * 4:], stride):
                cells.setdefault(y // band, []).append(column)
    return [grid.rect(a) for a in areas(cells)]


class ScreenCast:
    """The capture source for GNOME on Wayland (see the module's text)."""

    def __init__(self, fps: int = 30, bus_address: str | None = None,
                 timing: Timing | None = None) -> None:
        gi = _Gi()
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
        self._up = False  # a stream is delivering frames
        self._fatal: WorkerError | None = None
        self._node: int | None = None
        self._waiting = "connecting to the session bus"
        self._settled = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ctl = _Controller(gi, address, fps, self.timing, self)
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
        with self._lock:
            if gen != self._accept:
                return False
            self._slot = (width, height, pixels)
        self._wake()
        return True

    def _stream_started(self, gen: int, node: int) -> None:
        with self._lock:
            self._accept, self._node, self._up, self._slot = gen, node, False, None

    def _stream_up(self, gen: int) -> None:
        with self._lock:
            if gen != self._accept:
                return
            self._up = True
        self._settled.set()

    def _stream_gone(self, waiting: str) -> None:
        with self._lock:
            self._accept, self._up, self._slot, self._node = 0, False, None, None
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
        changes.damage = compare(self._fb, pixels, width, height)
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


class _Controller:
    """Runs on the screen-cast thread: the bus connection, mutter's session, the pipeline.

    Every callback checks it belongs to the current attempt (`self.attempt`): a reply or a
    signal of a session already given up is ignored. One timer at a time (`self.timer`) stands
    for what is awaited now."""

    def __init__(self, gi: _Gi, address: str, fps: int, timing: Timing, out: ScreenCast) -> None:
        self.gi = gi
        self.address = address
        self.fps = fps
        self.timing = timing
        self.out = out
        GLib = gi.GLib
        self.ctx = GLib.MainContext.new()
        self.loop = GLib.MainLoop.new(self.ctx, False)
        self.cancel = gi.Gio.Cancellable()
        self.conn: Any = None
        self.bus_subs: list[int] = []
        self.session_subs: list[int] = []
        self.owner: str | None = None  # mutter's unique name
        self.session: str | None = None
        self.attempt = 0
        self.gen = 0
        self.pipeline: Any = None
        self.timer: Any = None
        self.failures = 0
        self.streamed = False  # a picture came once: later failures are a lost display
        self.locked = False  # org.gnome.ScreenSaver's Active, as last signalled or read
        self.monitors_changed_at = -1e9
        self.closed_at: float | None = None  # Closed received, the decision pending
        # What is awaited now: connect, create, node, frame, frames (streaming), closed (the node
        # ended, Closed awaited), settle, check-lock, retry, unlock, mutter.
        self.waiting = "connect"
        self.node = 0
        self.changes: list[threading.Thread] = []  # pipeline state changes under way
        self.done = False

    # -- plumbing ---------------------------------------------------------------------------------

    def run(self) -> None:
        self.ctx.push_thread_default()
        try:
            flags = (self.gi.Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
                     | self.gi.Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION)
            self.gi.Gio.DBusConnection.new_for_address(
                self.address, flags, None, self.cancel, self._on_connected)
            self.loop.run()
        except Exception as exc:  # noqa: BLE001 - the thread must report, not die silently
            log.exception("GNOME ScreenCast: unexpected error in its thread")
            self.out._fail(DisplayLost(f"GNOME ScreenCast: unexpected error: {_one_line(exc)}"))
        finally:
            self._teardown()
            self.ctx.pop_thread_default()

    def quit(self) -> None:
        """From any thread: end the loop (an idle source on our context, dispatched when it runs)."""
        src = self.gi.GLib.idle_source_new()
        src.set_callback(self._quit_now)
        src.attach(self.ctx)

    def _quit_now(self, *_: object) -> bool:
        self.done = True
        self.cancel.cancel()
        self.loop.quit()
        return False

    def _teardown(self) -> None:
        self._cancel_timer()
        self._stop_pipeline()
        # The session first: mutter ending its node also ends a pipewiresrc still waiting for it.
        self._close_connection()
        deadline = time.monotonic() + self.timing.join / 2
        for thread in self.changes:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self.changes):
            log.warning("GNOME ScreenCast: a pipeline did not reach NULL within %g s (pipewiresrc "
                        "still waiting for its stream)", self.timing.join / 2)
        # Dispatch what closing queued (cancelled calls' callbacks) so nothing refers to us later.
        while self.ctx.pending():
            self.ctx.iteration(False)

    def _close_connection(self) -> None:
        if self.conn is not None:
            if self.session is not None:
                # Polite; the session also ends with this connection.
                try:
                    self.conn.call_sync(self.owner, self.session, SESSION_IFACE, "Stop", None,
                                        None, 0, 1000, None)
                except Exception:  # noqa: BLE001 - gone already, or mutter busy: closing ends it
                    pass
                self.session = None
            for sub in self.session_subs + self.bus_subs:
                self.conn.signal_unsubscribe(sub)
            self.session_subs, self.bus_subs = [], []
            try:
                self.conn.close_sync(None)
            except Exception:  # noqa: BLE001 - closed by the peer already
                pass
            self.conn = None

    def _later(self, seconds: float, fn, *args: object) -> None:
        """The one pending timer: fn(*args) in `seconds`, replacing the previous timer."""
        self._cancel_timer()
        src = self.gi.GLib.timeout_source_new(max(0, int(seconds * 1000)))

        def fire(*_: object) -> bool:
            if self.timer is src:
                self.timer = None
                fn(*args)
            return False

        src.set_callback(fire)
        src.attach(self.ctx)
        self.timer = src

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.destroy()
            self.timer = None

    def _call(self, dest: str, path: str, iface: str, method: str, params: Any, reply,
              error=None) -> None:
        """An asynchronous call; reply(value) or error(GLib.Error) on this thread, dropped when
        the attempt it belongs to is over."""
        attempt = self.attempt

        def done(conn, res, *_: object) -> None:
            try:
                value = conn.call_finish(res)
            except self.gi.GLib.Error as exc:
                if self.done or attempt != self.attempt:
                    return
                if error is not None:
                    error(exc)
                return
            if self.done or attempt != self.attempt:
                return
            reply(value.unpack())

        self.conn.call(dest, path, iface, method, params, None,
                       self.gi.Gio.DBusCallFlags.NONE, self.timing.call_ms, self.cancel, done)

    def _subscribe(self, sender, iface, member, path, arg0, fn) -> int:
        def on_signal(conn, sender, path, iface, member, params, *_: object) -> None:
            if not self.done:
                fn(sender, params.unpack())

        return self.conn.signal_subscribe(sender, iface, member, path, arg0,
                                          self.gi.Gio.DBusSignalFlags.NONE, on_signal)

    # -- the bus and what we watch on it ----------------------------------------------------------

    def _on_connected(self, _src, res, *_: object) -> None:
        try:
            self.conn = self.gi.Gio.DBusConnection.new_for_address_finish(res)
        except self.gi.GLib.Error as exc:
            if not self.done:
                self.out._fail(DisplayUnavailable(
                    f"GNOME ScreenCast: cannot connect to the session bus {self.address}: "
                    f"{_one_line(exc.message)}"))
            return
        self.conn.set_exit_on_close(False)
        self.conn.connect("closed", self._on_bus_closed)
        self.bus_subs = [
            self._subscribe(DBUS, DBUS, "NameOwnerChanged", "/org/freedesktop/DBus", MUTTER,
                            self._on_mutter_owner),
            self._subscribe(SCREENSAVER, SCREENSAVER, "ActiveChanged", SCREENSAVER_PATH, None,
                            self._on_lock_changed),
            self._subscribe(DISPLAY_CONFIG, DISPLAY_CONFIG, "MonitorsChanged",
                            DISPLAY_CONFIG_PATH, None, self._on_monitors_changed),
        ]
        self._read_lock_state(lambda _: None)  # starts `locked` right; signals keep it so
        self._call(DBUS, "/org/freedesktop/DBus", DBUS, "GetNameOwner",
                   self.gi.GLib.Variant("(s)", (MUTTER,)), self._on_first_owner,
                   lambda _exc: self._mutter_absent("is not on the session bus"))

    def _on_bus_closed(self, _conn, remote: bool, error, *_: object) -> None:
        if self.done:
            return
        self._stop_pipeline()
        self.out._fail(DisplayLost("GNOME ScreenCast: the session bus connection closed"))

    def _on_first_owner(self, value: tuple[str]) -> None:
        self.owner = value[0]
        self._create()

    def _mutter_absent(self, how: str) -> None:
        self._drop_session()
        self.owner = None
        self.waiting = "mutter"
        log.info("GNOME ScreenCast: %s %s: waiting for it (at most %g s)", MUTTER, how,
                 self.timing.mutter_gone)
        self.out._stream_gone(f"{MUTTER} {how}")
        self._later(self.timing.mutter_gone, self._give_up_on_mutter)

    def _give_up_on_mutter(self) -> None:
        err = f"GNOME ScreenCast: {MUTTER} did not come on the session bus within " \
              f"{self.timing.mutter_gone:g} s"
        self.out._fail(DisplayLost(err) if self.streamed else DisplayUnavailable(err))

    def _on_mutter_owner(self, _sender: str, args: tuple[str, str, str]) -> None:
        _name, _old, new = args
        if not new:
            self._mutter_absent("left the session bus (mutter restarting?)")
            return
        if new == self.owner:
            return
        was_running = self.owner is not None
        self._drop_session()
        self.owner = new
        self.failures = 0
        log.info("GNOME ScreenCast: %s %s: recording again", MUTTER,
                 "changed owner" if was_running else "is on the session bus")
        self._create()

    def _on_lock_changed(self, _sender: str, args: tuple[bool]) -> None:
        self.locked = bool(args[0])
        if self.closed_at is not None and self.locked:
            self._decide_after_close()
        elif not self.locked and self.waiting == "unlock":
            log.info("GNOME ScreenCast: the screen was unlocked: recording again")
            self.failures = 0
            self._create()

    def _on_monitors_changed(self, _sender: str, _args: tuple) -> None:
        self.monitors_changed_at = time.monotonic()
        if self.closed_at is not None:
            self._decide_after_close()

    def _read_lock_state(self, then) -> None:
        """org.gnome.ScreenSaver's GetActive into self.locked, then then(locked); absent: unlocked."""
        def reply(value: tuple[bool]) -> None:
            self.locked = bool(value[0])
            then(self.locked)

        def error(_exc: object) -> None:
            then(self.locked)

        self._call(SCREENSAVER, SCREENSAVER_PATH, SCREENSAVER, "GetActive", None, reply, error)

    # -- the screen-cast session ------------------------------------------------------------------

    def _create(self) -> None:
        """CreateSession, RecordMonitor(primary, embedded cursor), Start; then PipeWireStreamAdded."""
        self._drop_session()
        self.attempt += 1
        self.waiting = "create"
        self.out._waiting_for("creating a screen-cast session")
        GLib = self.gi.GLib
        self._later(self.timing.node + self.timing.call_ms / 1000 * 3, self._create_failed,
                    "creating the session", "no answer")

        def created(value: tuple[str]) -> None:
            self.session = value[0]
            self.session_subs.append(self._subscribe(
                self.owner, SESSION_IFACE, "Closed", self.session, None, self._on_closed))
            props = {"cursor-mode": GLib.Variant("u", CURSOR_EMBEDDED)}
            self._call(self.owner, self.session, SESSION_IFACE, "RecordMonitor",
                       GLib.Variant("(sa{sv})", ("", props)), recording,
                       lambda exc: self._create_failed("RecordMonitor", exc.message))

        def recording(value: tuple[str]) -> None:
            stream = value[0]
            self.session_subs.append(self._subscribe(
                self.owner, STREAM_IFACE, "PipeWireStreamAdded", stream, None, self._on_node))
            self._call(self.owner, self.session, SESSION_IFACE, "Start", None, started,
                       lambda exc: self._create_failed("Start", exc.message))

        def started(_value: tuple) -> None:
            self.waiting = "node"
            self._later(self.timing.node, self._create_failed, "waiting for the PipeWire node",
                        f"mutter sent none within {self.timing.node:g} s")

        self._call(self.owner, MUTTER_PATH, MUTTER, "CreateSession",
                   GLib.Variant("(a{sv})", ({},)), created,
                   lambda exc: self._create_failed("CreateSession", exc.message))

    def _on_node(self, _sender: str, args: tuple[int]) -> None:
        if self.waiting != "node":
            return
        node = int(args[0])
        if not self._start_pipeline(node):
            return
        self.waiting = "frame"
        self._later(self.timing.frame, self._create_failed, f"reading PipeWire node {node}",
                    f"no frame within {self.timing.frame:g} s")

    def _on_first_frame(self, gen: int, width: int, height: int) -> bool:
        if gen == self.gen and self.waiting == "frame" and not self.done:
            self._cancel_timer()
            self.waiting = "frames"
            self.failures = 0
            self.streamed = True
            log.info("GNOME ScreenCast: streaming %dx%d from PipeWire node %d", width, height,
                     self.node)
            self.out._stream_up(gen)
        return False

    def _create_failed(self, what: str, why: str) -> None:
        """A failure to create: locked (wait for the unlock) or a retry after a backoff."""
        self._drop_session()
        self.attempt += 1
        self.waiting = "check-lock"
        attempt = self.attempt

        def decide(locked: bool) -> None:
            if attempt != self.attempt:
                return
            if locked:
                self._wait_for_unlock()
                return
            self.failures += 1
            if self.failures > len(self.timing.backoff):
                err = (f"GNOME ScreenCast: {what} failed {self.failures} times in a row, "
                       f"last: {_one_line(why)}")
                self.out._fail(DisplayLost(err) if self.streamed else DisplayUnavailable(err))
                return
            delay = self.timing.backoff[self.failures - 1]
            log.warning("GNOME ScreenCast: %s failed (%s): trying again in %g s (%d of %d)",
                        what, _one_line(why), delay, self.failures, len(self.timing.backoff))
            self.waiting = "retry"
            self.out._waiting_for(f"{what} failed, trying again")
            self._later(delay, self._create)

        self._read_lock_state(decide)

    def _wait_for_unlock(self) -> None:
        self._drop_session()
        self._cancel_timer()
        self.waiting = "unlock"
        log.info("GNOME ScreenCast: the screen is locked: waiting for it to be unlocked")
        self.out._stream_gone("the screen is locked")
        self.out._waiting_for("the screen is locked", settled=True)

    def _on_closed(self, _sender: str, _args: tuple) -> None:
        if self.session is None:
            return
        self.session = None
        self._unsubscribe_session()
        self._stop_pipeline()
        self.attempt += 1  # whatever was in flight for this session is over
        self.waiting = "settle"
        self.closed_at = time.monotonic()
        log.info("GNOME ScreenCast: the session was closed by GNOME")
        self.out._stream_gone("the screen cast was closed")
        # What happened around it says why: a layout change or a lock seen already decides now.
        self._decide_after_close(first=True)

    def _decide_after_close(self, first: bool = False) -> None:
        if self.closed_at is None:
            return
        if self.monitors_changed_at >= self.closed_at - self.timing.settle:
            self.closed_at = None
            log.info("GNOME ScreenCast: the monitor layout changed: recording again")
            self.failures = 0
            self._create()
        elif self.locked:
            self.closed_at = None
            self._wait_for_unlock()
        elif first:
            self._later(self.timing.settle, self._settled_after_close)

    def _settled_after_close(self) -> None:
        attempt = self.attempt

        def decide(locked: bool) -> None:
            if attempt != self.attempt or self.closed_at is None:
                return
            if locked:
                self.closed_at = None
                self._wait_for_unlock()
                return
            self.closed_at = None
            self._cancel_timer()
            self.out._fail(StoppedByUser(
                "GNOME ScreenCast: stopped in GNOME (the screen-sharing indicator's Stop): "
                "not streaming this session again until its user logs in again"))

        self._read_lock_state(decide)

    def _drop_session(self) -> None:
        """Forget the current session (Stop it if mutter still has it) and its pipeline."""
        self._cancel_timer()
        self._stop_pipeline()
        self._unsubscribe_session()
        self.closed_at = None
        if self.session is not None and self.conn is not None and self.owner is not None:
            self.conn.call(self.owner, self.session, SESSION_IFACE, "Stop", None, None,
                           self.gi.Gio.DBusCallFlags.NONE, self.timing.call_ms, None, None)
        self.session = None

    def _unsubscribe_session(self) -> None:
        for sub in self.session_subs:
            self.conn.signal_unsubscribe(sub)
        self.session_subs = []

    # -- the pipeline ---------------------------------------------------------------------------

    def _start_pipeline(self, node: int) -> bool:
        Gst = self.gi.Gst
        self._stop_pipeline()
        self.gen += 1
        gen = self.gen
        self.node = node
        try:
            pipeline = Gst.parse_launch(pipeline_description(node, self.fps))
        except self.gi.GLib.Error as exc:
            self._create_failed(f"building the pipeline for PipeWire node {node}", exc.message)
            return False
        self.pipeline = pipeline
        self.out._stream_started(gen, node)
        sink = pipeline.get_by_name("sink")
        first = [True]
        GLib = self.gi.GLib

        def on_sample(appsink, *_: object):
            sample = appsink.emit("pull-sample")
            if sample is None:
                return Gst.FlowReturn.OK
            got = self._copy_out(sample)
            del sample  # the buffer goes back to pipewiresrc now
            if got is None:
                return Gst.FlowReturn.OK
            width, height, pixels = got
            if self.out._publish(gen, width, height, pixels) and first[0]:
                first[0] = False
                src = GLib.idle_source_new()
                src.set_callback(lambda *_: self._on_first_frame(gen, width, height))
                src.attach(self.ctx)
            return Gst.FlowReturn.OK

        sink.connect("new-sample", on_sample)
        bus = pipeline.get_bus()
        bus.add_signal_watch()  # on our thread's default context
        bus.connect("message", self._on_bus_message, gen)
        log.debug("GNOME ScreenCast: reading PipeWire node %d", node)

        def failed_to_start() -> bool:
            if gen == self.gen and not self.done:
                self._create_failed(f"reading PipeWire node {node}", "the pipeline would not start")
            return False

        def play() -> None:
            if pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
                src = GLib.idle_source_new()
                src.set_callback(lambda *_: failed_to_start())
                src.attach(self.ctx)

        self._state_change(play)
        return True

    def _state_change(self, fn) -> None:
        """Run a pipeline state change on a thread of its own: pipewiresrc's start waits, under the
        element's state lock, until its stream runs, and a node that never delivers (or does not
        exist) would hold this thread, its timers and close() with it. Changes of one pipeline are
        queued behind each other by that lock; close() waits for them, bounded."""
        self.changes = [t for t in self.changes if t.is_alive()]
        thread = threading.Thread(target=fn, name="screencast-pipeline", daemon=True)
        thread.start()
        self.changes.append(thread)

    def _copy_out(self, sample) -> tuple[int, int, bytes] | None:
        """The sample's pixels, copied out and packed (stride = width * 4); None if unusable."""
        Gst, GstVideo = self.gi.Gst, self.gi.GstVideo
        caps = sample.get_caps()
        buf = sample.get_buffer()
        if caps is None or buf is None:
            return None
        info = GstVideo.VideoInfo.new_from_caps(caps)
        if info is None:
            return None
        width, height = info.width, info.height
        if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
            return None
        stride, offset = info.stride[0], info.offset[0]
        meta = GstVideo.buffer_get_video_meta(buf)
        if meta is not None:
            stride, offset = meta.stride[0], meta.offset[0]
        row = width * 4
        ok, mapped = buf.map(Gst.MapFlags.READ)
        if not ok:
            return None
        try:
            # bytes() copies a view (gst-python's overrides give one); PyGObject alone gives bytes.
            data = bytes(mapped.data)
        finally:
            buf.unmap(mapped)
        if stride < row or offset + (height - 1) * stride + row > len(data):
            return None
        if stride == row:
            pixels = data if offset == 0 and len(data) == row * height else \
                data[offset:offset + row * height]
        else:
            pixels = b"".join(data[offset + y * stride:offset + y * stride + row]
                              for y in range(height))
        return width, height, pixels

    def _on_bus_message(self, _bus, message, gen: int) -> None:
        Gst = self.gi.Gst
        if gen != self.gen or self.done:
            return
        if message.type == Gst.MessageType.ERROR:
            err, _debug = message.parse_error()
            why = err.message
        elif message.type == Gst.MessageType.EOS:
            why = "end of stream"
        else:
            return
        node = self.node
        self._stop_pipeline()
        self.out._stream_gone("the PipeWire stream ended")
        if self.waiting == "frames" and self.session is not None:
            # mutter usually ends the node when it closes the session: give Closed the time to
            # come (and say why) before calling it a failure.
            log.info("GNOME ScreenCast: PipeWire node %d ended (%s)", node, _one_line(why))
            self.waiting = "closed"
            self._later(self.timing.settle * 2, self._create_failed,
                        f"reading PipeWire node {node}", why)
        else:
            self._create_failed(f"reading PipeWire node {node}", why)

    def _stop_pipeline(self) -> None:
        if self.pipeline is None:
            return
        pipeline, self.pipeline = self.pipeline, None
        self.gen += 1  # late samples and messages of this one are ignored
        self.out._stream_gone("the PipeWire stream ended")
        bus = pipeline.get_bus()
        bus.remove_signal_watch()
        self._state_change(lambda: pipeline.set_state(self.gi.Gst.State.NULL))


def _one_line(text: object) -> str:
    text = str(text).strip() or "unknown error"
    return " ".join(text.split())[:300]
