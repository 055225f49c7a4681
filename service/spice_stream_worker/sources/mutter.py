"""mutter's screen-cast session on the screen-cast thread: the session-bus connection, the
ScreenCast session and its lifecycle (lock screen, layout change, mutter leaving the bus, the
user's Stop, retries), and the pipeline reading its PipeWire node. What it gets goes to the
ScreenCast source (`out`), the only object it talks to."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from spice_stream_common.exitcodes import DisplayLost, DisplayUnavailable, StoppedByUser

from ..gstreamer import Media
from .gstmedia import copy_out, pipeline_description

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
LOGIND = "org.freedesktop.login1"
LOGIND_PATH = "/org/freedesktop/login1"
LOGIND_SESSION = "org.freedesktop.login1.Session"
PROPERTIES = "org.freedesktop.DBus.Properties"

CURSOR_EMBEDDED = 1  # RecordMonitor's cursor-mode: 0 hidden, 1 embedded, 2 metadata


def _rates(sample: Any) -> str:
    """The frame rates the stream was negotiated with ("framerate", mutter's "max-framerate"), as
    the first sample's caps say: mutter records at most max-framerate frames a second."""
    caps = sample.get_caps()
    if caps is None or caps.get_size() == 0:
        return ""
    st = caps.get_structure(0)
    found = []
    for field in ("framerate", "max-framerate"):
        ok, num, den = st.get_fraction(field)
        if ok:
            found.append(f"{field} {num}/{den}")
    return ", ".join(found)


# The states of a screen cast being made: no stream yet.
CREATING = frozenset({"create", "node", "frame", "retry", "check-lock"})


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
    # After Closed: what else happened around it (lock, layout, mutter). gnome-shell closes the
    # screen cast before logind's LockedHint says locked: 2.1 s after `loginctl lock-session`,
    # LockedHint by 3.3 s (VM, Debian 12); a later LockedHint ends the wait at once.
    settle: float = 5.0
    mutter_gone: float = 60.0  # mutter off the bus this long: DisplayLost
    backoff: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)  # one delay per failure in a row
    # Each D-Bus call: D-Bus's own default. gnome-shell still starting under TCG took more than
    # 5 s to answer CreateSession and Start (VM, Debian 12), six times in a row.
    call_ms: int = 25000
    join: float = 5.0  # close(): the thread's end
    # Back on the screen with the stream still up: a frame painted on the way back, or a new
    # stream after this long.
    back_frame: float = 1.0


class Controller:
    """Runs on the screen-cast thread: the bus connection, mutter's session, the pipeline.

    Every callback checks it belongs to the current attempt (`self.attempt`): a reply or a
    signal of a session already given up is ignored. One timer at a time (`self.timer`) stands
    for what is awaited now."""

    def __init__(self, gi: Media, address: str, fps: int, timing: Timing, out: Any,
                 session_id: str = "", system_address: str | None = None) -> None:
        self.gi = gi
        self.address = address
        self.session_id = session_id
        self.system_address = system_address
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
        # Locked: org.gnome.ScreenSaver's Active (when gnome-shell owns that name: GNOME 43 on
        # Wayland did not) or logind's LockedHint of this session, as last signalled or read.
        self.saver_locked = False
        self.hint_locked = False
        # logind's Active of this session is false: another VT is on the screen. mutter paints
        # nothing for it then, and the picture held is from before: none is claimed current.
        self.inactive = False
        self.was_locked = False  # what the wait for the screen began with (for its log lines)
        self.system: Any = None  # the system bus, for logind (with a session id only)
        self.system_subs: list[int] = []
        self.logind_session: str | None = None  # the session's object path
        self.monitors_changed_at = -1e9
        self.closed_at: float | None = None  # Closed received, the decision pending
        # What is awaited now: connect, create, node, frame, frames (streaming), closed (the node
        # ended, Closed awaited), settle, check-lock, retry, away (locked or not on the screen),
        # mutter.
        self.waiting = "connect"
        self.node = 0
        # When the current creation began and what of it came when (seconds after the start):
        # the streaming line says where a slow start went.
        self.began = 0.0
        self.steps: list[str] = []
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
            _close_bus(self.conn, self.session_subs + self.bus_subs)
            self.session_subs, self.bus_subs, self.conn = [], [], None
        if self.system is not None:
            _close_bus(self.system, self.system_subs)
            self.system_subs, self.system = [], None

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

    @property
    def locked(self) -> bool:
        return self.saver_locked or self.hint_locked

    @property
    def away(self) -> bool:
        """No screen cast can work now: the lock screen, or another VT on the screen."""
        return self.locked or self.inactive

    def _call(self, dest: str, path: str, iface: str, method: str, params: Any, reply,
              error=None, auto_start: bool = True, conn: Any = None,
              any_attempt: bool = False) -> None:
        """An asynchronous call; reply(value) or error(GLib.Error) on this thread, dropped when
        the attempt it belongs to is over."""
        attempt = self.attempt

        def done(conn, res, *_: object) -> None:
            try:
                value = conn.call_finish(res)
            except self.gi.GLib.Error as exc:
                if self.done or (attempt != self.attempt and not any_attempt):
                    return
                if error is not None:
                    error(exc)
                return
            if self.done or (attempt != self.attempt and not any_attempt):
                return
            reply(value.unpack())

        flags = self.gi.Gio.DBusCallFlags
        (conn or self.conn).call(dest, path, iface, method, params, None,
                       flags.NONE if auto_start else flags.NO_AUTO_START, self.timing.call_ms,
                       self.cancel, done)

    def _subscribe(self, sender, iface, member, path, arg0, fn, conn: Any = None) -> int:
        def on_signal(conn, sender, path, iface, member, params, *_: object) -> None:
            if not self.done:
                fn(sender, params.unpack())

        return (conn or self.conn).signal_subscribe(sender, iface, member, path, arg0,
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
        if self.session_id:
            self._watch_logind()
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

    # -- logind's LockedHint of this session (on the system bus) --------------------------------------

    def _watch_logind(self) -> None:
        """Follow LockedHint of our logind session: gnome-shell sets it on its lock screen, and
        it is the lock's only sign where org.gnome.ScreenSaver is not on the session bus."""
        Gio = self.gi.Gio
        flags = (Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
                 | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION)
        address = self.system_address or Gio.dbus_address_get_for_bus_sync(Gio.BusType.SYSTEM, None)
        Gio.DBusConnection.new_for_address(address, flags, None, self.cancel, self._on_system)

    def _on_system(self, _src, res, *_: object) -> None:
        try:
            self.system = self.gi.Gio.DBusConnection.new_for_address_finish(res)
        except self.gi.GLib.Error as exc:
            if not self.done:
                log.warning("GNOME ScreenCast: no system bus (%s): the lock screen is known only "
                            "from org.gnome.ScreenSaver", _one_line(exc.message))
            return
        self.system.set_exit_on_close(False)

        def found(value: tuple[str]) -> None:
            self.logind_session = value[0]
            self.system_subs.append(self._subscribe(
                LOGIND, PROPERTIES, "PropertiesChanged", self.logind_session, LOGIND_SESSION,
                self._on_session_props, conn=self.system))
            self._read_hint(lambda: None)

        def missing(exc: object) -> None:
            log.warning("GNOME ScreenCast: logind has no session %s (%s): the lock screen is "
                        "known only from org.gnome.ScreenSaver", self.session_id,
                        _one_line(getattr(exc, "message", exc)))

        self._call(LOGIND, LOGIND_PATH, LOGIND + ".Manager", "GetSession",
                   self.gi.GLib.Variant("(s)", (self.session_id,)), found, missing,
                   conn=self.system, any_attempt=True)

    def _read_hint(self, then) -> None:
        """logind's LockedHint and Active of our session, then then()."""
        if self.system is None or self.logind_session is None:
            then()
            return

        def reply(value: tuple) -> None:
            props = value[0]
            self.hint_locked = bool(props.get("LockedHint", False))
            self._set_active(bool(props.get("Active", True)))
            then()

        # Any attempt's: `then` checks whether it still matters.
        self._call(LOGIND, self.logind_session, PROPERTIES, "GetAll",
                   self.gi.GLib.Variant("(s)", (LOGIND_SESSION,)), reply,
                   lambda _exc: then(), conn=self.system, any_attempt=True)

    def _on_session_props(self, _sender: str, args: tuple) -> None:
        _iface, changed, _invalidated = args
        if "Active" in changed:
            self._set_active(bool(changed["Active"]))
        if "LockedHint" in changed:
            self.hint_locked = bool(changed["LockedHint"])
        if "Active" in changed or "LockedHint" in changed:
            self._lock_changed()

    def _set_active(self, active: bool) -> None:
        if active == (not self.inactive):
            return
        self.inactive = not active
        if self.inactive:
            self.out._hold("the session is not on the screen (another VT is)")
            if self.waiting == "frames":
                log.info("GNOME ScreenCast: the session left the screen (another VT): no picture "
                         "until it is back")
            elif self.waiting in CREATING:
                # A screen cast still being made is given up, and made again when the session is
                # back: its making took a guest's two CPUs for seconds under TCG, and the session
                # in front got its first picture 4 s late (Debian 12, a switch to an X11 session).
                self.attempt += 1  # what is still to come of it is ignored
                self._wait_until_back()
        else:
            self.out._release()
            if self.waiting == "frames" and not self.out._is_up():
                # mutter paints nothing on the way back when nothing changed (a static desktop:
                # no frame came in 30 s, VM, Debian 12), and a stream sends a picture only when
                # painted: without one soon, a new stream starts with the current picture.
                attempt = self.attempt
                self._later(self.timing.back_frame, self._no_frame_since_back, attempt)

    def _no_frame_since_back(self, attempt: int) -> None:
        if attempt != self.attempt or self.waiting != "frames" or self.away or self.out._is_up():
            return
        log.info("GNOME ScreenCast: no picture since the session came back: recording again")
        self._create()

    def _on_lock_changed(self, _sender: str, args: tuple[bool]) -> None:
        self.saver_locked = bool(args[0])
        self._lock_changed()

    def _lock_changed(self) -> None:
        if self.closed_at is not None and self.away:
            self._decide_after_close()
        elif not self.away and self.waiting == "away":
            if self.was_locked:
                log.info("GNOME ScreenCast: the screen was unlocked: recording again")
            else:
                log.info("GNOME ScreenCast: the session is on the screen again: recording again")
            self.failures = 0
            self._create()

    def _on_monitors_changed(self, _sender: str, _args: tuple) -> None:
        self.monitors_changed_at = time.monotonic()
        if self.closed_at is not None:
            self._decide_after_close()

    def _read_lock_state(self, then) -> None:
        """org.gnome.ScreenSaver's GetActive and logind's LockedHint (each absent: unlocked),
        then then(locked)."""
        def reply(value: tuple[bool]) -> None:
            self.saver_locked = bool(value[0])
            self._read_hint(lambda: then(self.locked))

        def error(_exc: object) -> None:
            self._read_hint(lambda: then(self.locked))

        # Any attempt's: `then` checks whether it still matters. Without auto-start: gnome-shell
        # owns the name or nobody does (a bus asked to start it tries an activation file and
        # waits for nothing), and not there is not locked.
        self._call(SCREENSAVER, SCREENSAVER_PATH, SCREENSAVER, "GetActive", None, reply, error,
                   auto_start=False, any_attempt=True)

    # -- the screen-cast session ------------------------------------------------------------------

    def _create(self) -> None:
        """CreateSession, RecordMonitor(primary, embedded cursor), Start; then PipeWireStreamAdded."""
        self._drop_session()
        self.attempt += 1
        self.waiting = "create"
        self.began, self.steps = time.monotonic(), []
        self.out._waiting_for("creating a screen-cast session")
        GLib = self.gi.GLib
        self._later(self.timing.node + self.timing.call_ms / 1000 * 3, self._create_failed,
                    "creating the session", "no answer")

        def created(value: tuple[str]) -> None:
            self.session = value[0]
            self._step("session")
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
        self._step("node")
        if not self._start_pipeline(node):
            return
        self.waiting = "frame"
        self._later(self.timing.frame, self._create_failed, f"reading PipeWire node {node}",
                    f"no frame within {self.timing.frame:g} s")

    def _on_first_frame(self, gen: int, width: int, height: int, rates: str = "") -> bool:
        if gen == self.gen and self.waiting == "frame" and not self.done:
            self._cancel_timer()
            self.waiting = "frames"
            self.failures = 0
            self.streamed = True
            self._step("first frame")
            log.info("GNOME ScreenCast: streaming %dx%d%s from PipeWire node %d (%s)", width, height,
                     f" ({rates})" if rates else "", self.node, ", ".join(self.steps))
        return False

    def _step(self, what: str) -> None:
        self.steps.append(f"{what} after {time.monotonic() - self.began:.2f} s")

    def _create_failed(self, what: str, why: str) -> None:
        """A failure to create: locked (wait for the unlock) or a retry after a backoff."""
        self._drop_session()
        self.attempt += 1
        self.waiting = "check-lock"
        attempt = self.attempt

        def decide(locked: bool) -> None:
            if attempt != self.attempt:
                return
            if locked or self.inactive:
                self._wait_until_back()
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

    def _wait_until_back(self) -> None:
        """Locked or not on the screen: no session until that ends (no retries meanwhile)."""
        self._drop_session()
        self._cancel_timer()
        self.waiting = "away"
        self.was_locked = self.locked
        if self.was_locked:
            log.info("GNOME ScreenCast: the screen is locked: waiting for it to be unlocked")
            why = "the screen is locked"
        else:
            log.info("GNOME ScreenCast: the session is not on the screen (another VT is): "
                     "waiting for it to come back")
            why = "the session is not on the screen (another VT is)"
        self.out._stream_gone(why)
        self.out._waiting_for(why, settled=True)

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
        elif self.away:
            self.closed_at = None
            self._wait_until_back()
        elif first:
            self._later(self.timing.settle, self._settled_after_close)

    def _settled_after_close(self) -> None:
        attempt = self.attempt

        def decide(locked: bool) -> None:
            if attempt != self.attempt or self.closed_at is None:
                return
            if locked or self.inactive:  # not the Stop button: nobody could press it
                self.closed_at = None
                self._wait_until_back()
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
            got = copy_out(self.gi, sample)
            rates = _rates(sample) if first[0] else ""
            del sample  # the buffer goes back to pipewiresrc now
            if got is None:
                return Gst.FlowReturn.OK
            width, height, pixels = got
            if self.out._publish(gen, width, height, pixels) and first[0]:
                first[0] = False
                src = GLib.idle_source_new()
                src.set_callback(lambda *_: self._on_first_frame(gen, width, height, rates))
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
            if (message.type == Gst.MessageType.ASYNC_DONE and self.waiting == "frame"
                    and message.src == self.pipeline):
                self._step("pipeline playing")  # where a slow start went: ours or mutter's paint
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


def _close_bus(conn: Any, subs: list[int]) -> None:
    """Drop our signal subscriptions on a connection, then close it (the peer may have already)."""
    for sub in subs:
        conn.signal_unsubscribe(sub)
    try:
        conn.close_sync(None)
    except Exception:  # noqa: BLE001 - closed by the peer already
        pass


def _one_line(text: object) -> str:
    text = str(text).strip() or "unknown error"
    return " ".join(text.split())[:300]
