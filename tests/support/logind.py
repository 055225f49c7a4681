"""A python-dbusmock logind on a private bus, extended with GetSessionByPID, VTNr, seat0 switching
and changes that send no signal (as logind's State, or a signal that got lost)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import dbus

from .dbusdaemon import DBusDaemon
from .waiting import stop_process, wait_until  # noqa: F401 - re-exported for tests

LOGIND_NAME = "org.freedesktop.login1"
LOGIND_PATH = "/org/freedesktop/login1"
MANAGER = "org.freedesktop.login1.Manager"
SESSION = "org.freedesktop.login1.Session"
SEAT = "org.freedesktop.login1.Seat"
MOCK = "org.freedesktop.DBus.Mock"
QUIET = "org.spice_space.Test.Quiet"  # the mock's own method for changes nobody is told about
SEAT0 = "/org/freedesktop/login1/seat/seat0"

# A permissive system-type bus for tests that do not exercise our policy (tests/support/bus.py
# from helper C1 starts one with the real policy).
_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""


class PrivateBus(DBusDaemon):
    """A permissive dbus-daemon of type system."""

    def __init__(self) -> None:
        super().__init__(_BUS_CONFIG, prefix="spice-test-bus-")


class LogindMock:
    """dbusmock's logind template in a subprocess owning org.freedesktop.login1 on `address`.

    The template gives every session VTNr 1 and lacks GetSessionByPID; add_session() sets the
    real VT/type and maps pids, activate() switches seat0 like a VT switch does.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address)
        # The template needs GLib's gi, which the venv lacks: borrow Debian's (same python3.11).
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (env.get("PYTHONPATH"), "/usr/lib/python3/dist-packages") if p
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dbusmock", "--system", "--template", "logind"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        self._pids: dict[int, str] = {}
        self._user_pids: dict[int, int] = {}  # pids in a user's manager, outside any session
        self._session_uids: dict[str, int] = {}
        self._hang_s = 0.0
        try:
            self.conn = dbus.bus.BusConnection(address)
            wait_until(self._owned, timeout=10, what="dbusmock to own org.freedesktop.login1")
            self.manager = self.conn.get_object(LOGIND_NAME, LOGIND_PATH)
            # dbusmock claims the name before it exports its objects: retry until they exist.
            wait_until(self._add_seat0, timeout=10, what="dbusmock's logind objects")
            self._install_get_session_by_pid()
        except BaseException:
            self.stop()
            raise

    def _owned(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"dbusmock exited with {self.proc.returncode}")
        return bool(self.conn.name_has_owner(LOGIND_NAME))

    def _add_seat0(self) -> bool:
        try:
            self._mock(LOGIND_PATH).AddSeat("seat0")
        except dbus.exceptions.DBusException as e:
            if e.get_dbus_name() in ("org.freedesktop.DBus.Error.UnknownMethod",
                                     "org.freedesktop.DBus.Error.UnknownObject",
                                     "org.freedesktop.DBus.Error.UnknownInterface"):
                return False
            raise
        return True

    def _mock(self, path: str) -> dbus.Interface:
        return dbus.Interface(self.conn.get_object(LOGIND_NAME, path), MOCK)

    def _install_get_session_by_pid(self) -> None:
        mapping = {int(pid): f"/org/freedesktop/login1/session/{sid}"
                   for pid, sid in self._pids.items()}
        code = ""
        if self._hang_s:
            code += f"import time\ntime.sleep({self._hang_s!r})\n"
        code += (
            f"m = {mapping!r}\n"
            "if args[0] not in m:\n"
            "    raise dbus.exceptions.DBusException("
            "'PID %d does not belong to any known session' % args[0], "
            "name='org.freedesktop.login1.NoSessionForPID')\n"
            "ret = dbus.ObjectPath(m[args[0]])\n"
        )
        self._mock(LOGIND_PATH).AddMethod(MANAGER, "GetSessionByPID", "u", "o", code)
        # The template's GetSession answers for any id; logind's knows its sessions.
        self._mock(LOGIND_PATH).AddMethod(MANAGER, "GetSession", "s", "o", (
            "p = '/org/freedesktop/login1/session/' + args[0]\n"
            "if p not in objects:\n"
            "    raise dbus.exceptions.DBusException("
            "'No session %s known' % args[0], name='org.freedesktop.login1.NoSuchSession')\n"
            "ret = dbus.ObjectPath(p)\n"
        ))
        # Property changes without PropertiesChanged: objects is dbusmock's path -> object map.
        self._mock(LOGIND_PATH).AddMethod(QUIET, "SetQuietly", "ssa{sv}", "",
                                          "objects[args[0]].props[args[1]].update(args[2])")
        # The template's GetUser fails for every uid (it adds an int to a str); logind's answers
        # for the users it knows.
        self._mock(LOGIND_PATH).AddMethod(MANAGER, "GetUser", "u", "o", (
            "p = '/org/freedesktop/login1/user/%d' % args[0]\n"
            "if p not in objects:\n"
            "    raise dbus.exceptions.DBusException("
            "'User ID %d is not logged in or lingering' % args[0], "
            "name='org.freedesktop.login1.NoSuchUser')\n"
            "ret = dbus.ObjectPath(p)\n"
        ))
        users = dict(self._user_pids)
        users.update({pid: self._session_uids[sid] for pid, sid in self._pids.items()})
        self._mock(LOGIND_PATH).AddMethod(MANAGER, "GetUserByPID", "u", "o", (
            f"m = {users!r}\n"
            "if args[0] not in m:\n"
            "    raise dbus.exceptions.DBusException("
            "'PID %d does not belong to any known or logged in user' % args[0], "
            "name='org.freedesktop.login1.NoUserForPID')\n"
            "ret = dbus.ObjectPath('/org/freedesktop/login1/user/%d' % m[args[0]])\n"
        ))

    def _add_user(self, uid: int, name: str) -> str:
        try:
            self._mock(LOGIND_PATH).AddUser(dbus.UInt32(uid), name, False)
        except dbus.exceptions.DBusException as e:
            if not e.get_dbus_name().endswith("UserExists"):
                raise
        return f"/org/freedesktop/login1/user/{uid}"

    def map_user_pids(self, uid: int, pids: Iterable[int]) -> None:
        """Processes of `uid` outside any session (as GNOME autostart programs under systemd --user)."""
        self._add_user(uid, f"user{uid}")
        for pid in pids:
            self._user_pids[int(pid)] = uid
        self._install_get_session_by_pid()

    def set_user_display(self, uid: int, session_id: str | None) -> None:
        """logind's User.Display: the user's graphical session (None: none)."""
        value = (dbus.Struct((session_id, dbus.ObjectPath(self.session_path(session_id))))
                 if session_id else dbus.Struct(("", dbus.ObjectPath("/"))))
        self._mock(f"/org/freedesktop/login1/user/{uid}").UpdateProperties(
            "org.freedesktop.login1.User", dbus.Dictionary({"Display": value}, signature="sv"))

    def set_runtime_path(self, uid: int, path: str) -> None:
        """logind's User.RuntimePath of `uid` (the template says /run/user/UID)."""
        self._mock(f"/org/freedesktop/login1/user/{uid}").UpdateProperties(
            "org.freedesktop.login1.User", dbus.Dictionary({"RuntimePath": path}, signature="sv"))

    @staticmethod
    def session_path(session_id: str) -> str:
        return f"/org/freedesktop/login1/session/{session_id}"

    def add_session(
        self,
        session_id: str,
        uid: int,
        vt: int,
        type: str = "x11",  # noqa: A002 - logind's property name
        pids: Iterable[int] = (),
        active: bool = False,
        username: str | None = None,
    ) -> str:
        """Create a session on seat0 (not active unless active=True); map pids to it."""
        name = username or f"user{uid}"
        user_path = self._add_user(uid, name)
        path = self.session_path(session_id)
        self._session_uids[session_id] = uid
        props = {
            "Id": session_id,
            "User": dbus.Struct((dbus.UInt32(uid), dbus.ObjectPath(user_path))),
            "Name": name,
            "VTNr": dbus.UInt32(vt),
            "Type": type,
            "Class": "user",
            "Active": False,
            "State": "online",
            "Remote": False,
            "Service": "dbusmock",
            "TTY": f"tty{vt}" if vt else "",
            "Display": "",
            "Leader": dbus.UInt32(1),
            "Seat": dbus.Struct(("seat0", dbus.ObjectPath(SEAT0))),
        }
        self._mock(LOGIND_PATH).AddObject(
            path, SESSION, dbus.Dictionary(props, signature="sv"),
            [("Activate", "", "", ""), ("Terminate", "", "", "")],
        )
        seat = self.conn.get_object(LOGIND_NAME, SEAT0)
        sessions = list(seat.Get(SEAT, "Sessions", dbus_interface=dbus.PROPERTIES_IFACE))
        sessions.append(dbus.Struct((session_id, dbus.ObjectPath(path))))
        self._mock(SEAT0).UpdateProperties(
            SEAT, {"Sessions": dbus.Array(sessions, signature="(so)")}
        )
        self.map_pids(session_id, pids)
        if active:
            self.activate(session_id)
        return path

    def map_pids(self, session_id: str, pids: Iterable[int]) -> None:
        for pid in pids:
            self._pids[int(pid)] = session_id
        self._install_get_session_by_pid()

    def set_hang(self, seconds: float) -> None:
        """Make GetSessionByPID block the mock for `seconds` (a logind that does not answer)."""
        self._hang_s = float(seconds)
        self._install_get_session_by_pid()

    def set_property(self, session_id: str, name: str, value) -> None:
        self._mock(self.session_path(session_id)).UpdateProperties(SESSION, {name: value})

    def set_quietly(self, path: str, interface: str, props: dict) -> None:
        """Change properties with no PropertiesChanged: logind's State (never signalled), or a
        signal the service missed."""
        dbus.Interface(self.conn.get_object(LOGIND_NAME, LOGIND_PATH), QUIET).SetQuietly(
            path, interface, dbus.Dictionary(props, signature="sv"))

    def close_session(self, session_id: str) -> None:
        """The session's user logged out with processes left behind: State "closing", told to
        nobody, as logind does."""
        self.set_quietly(self.session_path(session_id), SESSION,
                         {"State": "closing"})

    def active_session(self) -> str:
        seat = self.conn.get_object(LOGIND_NAME, SEAT0)
        return str(seat.Get(SEAT, "ActiveSession", dbus_interface=dbus.PROPERTIES_IFACE)[0])

    def _session_ids(self) -> list[str]:
        seat = self.conn.get_object(LOGIND_NAME, SEAT0)
        return [str(s[0]) for s in seat.Get(SEAT, "Sessions", dbus_interface=dbus.PROPERTIES_IFACE)]

    def _state(self, session_id: str) -> str:
        obj = self.conn.get_object(LOGIND_NAME, self.session_path(session_id))
        return str(obj.Get(SESSION, "State", dbus_interface=dbus.PROPERTIES_IFACE))

    def activate(self, session_id: str | None, quietly: bool = False) -> None:
        """Make session_id seat0's active session (None: no active session), as a VT switch.
        A closing session stays closing. quietly: seat0 sends no PropertiesChanged (lost)."""
        for sid in self._session_ids():
            if self._state(sid) == "closing":
                continue
            props = {"Active": sid == session_id,
                     "State": "active" if sid == session_id else "online"}
            if quietly:
                self.set_quietly(self.session_path(sid), SESSION, props)
            else:
                self._mock(self.session_path(sid)).UpdateProperties(SESSION, props)
        value = (
            dbus.Struct((session_id, dbus.ObjectPath(self.session_path(session_id))))
            if session_id else dbus.Struct(("", dbus.ObjectPath("/")))
        )
        if quietly:
            self.set_quietly(SEAT0, SEAT, {"ActiveSession": value})
        else:
            self._mock(SEAT0).UpdateProperties(SEAT, {"ActiveSession": value})

    def remove_session(self, session_id: str, signal: bool = True) -> None:
        """Drop the session (and its pids) and emit Manager.SessionRemoved (unless not `signal`:
        a signal the service missed)."""
        path = self.session_path(session_id)
        was_active = self.active_session() == session_id
        remaining = [s for s in self._session_ids() if s != session_id]
        self._mock(SEAT0).UpdateProperties(SEAT, {"Sessions": dbus.Array(
            [dbus.Struct((s, dbus.ObjectPath(self.session_path(s)))) for s in remaining],
            signature="(so)")})
        if was_active:
            self.activate(None)
        self._mock(LOGIND_PATH).RemoveObject(path)
        self._pids = {p: s for p, s in self._pids.items() if s != session_id}
        self._install_get_session_by_pid()
        if signal:
            self._mock(LOGIND_PATH).EmitSignal(
                MANAGER, "SessionRemoved", "so", [session_id, dbus.ObjectPath(path)]
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        conn = getattr(self, "conn", None)
        if conn is not None:
            conn.close()

    def __enter__(self) -> LogindMock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def logind_on(address: str) -> Iterator[LogindMock]:
    mock = LogindMock(address)
    try:
        yield mock
    finally:
        mock.stop()
