"""Where a caller's session comes from: logind on the bus, or the /proc fallback without it."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from dbus_next import Message, MessageType
from dbus_next.aio import MessageBus

from spice_stream_common import constants

from . import errors

log = logging.getLogger(__name__)

_NO_SESSION_ERRORS = {
    "org.freedesktop.login1.NoSessionForPID",
    "org.freedesktop.login1.NoSuchSession",
    "org.freedesktop.login1.NoUserForPID",
    "org.freedesktop.login1.NoSuchUser",
    "org.freedesktop.DBus.Error.UnixProcessIdUnknown",
}
# These mean "logind is not there (any more)", not "this caller has no session".
_UNAVAILABLE_ERRORS = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.Timeout",
    "org.freedesktop.DBus.Error.TimedOut",
    "org.freedesktop.DBus.Error.Disconnected",
}

VT_MAJOR = 4
MAX_VT = 63
# The logind session Types a display session of the autostart fallback may have.
GRAPHICAL_KINDS = ("x11", "wayland")


@dataclass(frozen=True)
class SessionInfo:
    session_id: str | None  # logind session id; None with the /proc fallback
    uid: int  # the session's user (logind User) or the process's real uid
    vt: int  # 1..63
    kind: str  # logind Type: "x11", "wayland", "tty", "mir", "unspecified"
    active: bool
    # The /proc fallback knows only the controlling VT, which is seat0's and local: these defaults.
    remote: bool = False  # logind Remote: a session from ssh, xrdp...
    seat: str = "seat0"  # logind Seat's id ("" for none): only seat0 has VTs and the stream port
    closing: bool = False  # logind State "closing": logged out, processes left behind


# What session_state() says of a session logind no longer knows.
GONE = "gone"
# logind's replies for a session id or object it does not know (any more).
_GONE_ERRORS = {
    "org.freedesktop.login1.NoSuchSession",
    "org.freedesktop.DBus.Error.UnknownObject",
}


class SessionSource(Protocol):
    async def session_of_pid(self, pid: int) -> SessionInfo: ...

    async def session_state(self, session_id: str) -> str: ...

    async def runtime_path(self, uid: int) -> str: ...

    def on_session_removed(self, callback: Callable[[str], None]) -> None: ...

    async def close(self) -> None: ...


class LogindError(Exception):
    """A logind call failed; .name is the D-Bus error name ("" for a timeout)."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}" if name else text)
        self.name = name
        self.text = text


async def logind_call(
    bus: MessageBus,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
    timeout: float = constants.LOGIND_TIMEOUT_S,
    destination: str = constants.LOGIND_NAME,
) -> list[Any]:
    """Call a method with a deadline; raises LogindError on an error reply or timeout."""
    msg = Message(
        destination=destination,
        path=path,
        interface=interface,
        member=member,
        signature=signature,
        body=body or [],
    )
    try:
        reply = await asyncio.wait_for(bus.call(msg), timeout)
    except TimeoutError:
        raise LogindError("", f"{member} got no answer within {timeout:g} s") from None
    except (OSError, EOFError) as e:
        raise LogindError("org.freedesktop.DBus.Error.Disconnected", str(e)) from None
    if reply is None:
        raise LogindError("org.freedesktop.DBus.Error.NoReply", f"{member} got no reply")
    if reply.message_type == MessageType.ERROR:
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        raise LogindError(reply.error_name or "", text)
    return list(reply.body)


async def get_properties(
    bus: MessageBus, path: str, interface: str, timeout: float = constants.LOGIND_TIMEOUT_S
) -> dict[str, Any]:
    """GetAll on a logind object, unwrapped from Variants."""
    (props,) = await logind_call(
        bus, path, "org.freedesktop.DBus.Properties", "GetAll", "s", [interface], timeout
    )
    return {k: v.value for k, v in props.items()}


async def add_match(bus: MessageBus, rule: str, timeout: float = constants.LOGIND_TIMEOUT_S) -> None:
    await logind_call(
        bus, constants.DBUS_PATH, constants.DBUS_NAME, "AddMatch", "s", [rule], timeout,
        destination=constants.DBUS_NAME,
    )


async def remove_match(
    bus: MessageBus, rule: str, timeout: float = constants.LOGIND_TIMEOUT_S
) -> None:
    try:
        await logind_call(
            bus, constants.DBUS_PATH, constants.DBUS_NAME, "RemoveMatch", "s", [rule], timeout,
            destination=constants.DBUS_NAME,
        )
    except LogindError:
        pass  # the bus is going away: nothing to undo


async def name_owner(
    bus: MessageBus, name: str = constants.LOGIND_NAME, timeout: float = constants.LOGIND_TIMEOUT_S
) -> str | None:
    """The unique name owning `name`, or None."""
    try:
        (owner,) = await logind_call(
            bus, constants.DBUS_PATH, constants.DBUS_NAME, "GetNameOwner", "s", [name], timeout,
            destination=constants.DBUS_NAME,
        )
    except LogindError as e:
        if e.name == "org.freedesktop.DBus.Error.NameHasNoOwner":
            return None
        raise
    return owner


class OwnerTracker:
    """Tracks the unique name behind logind's well-known name.

    Signals can be unicast to us by any peer the bus policy lets send signals, so a signal only
    counts when its sender is the current owner; the bus daemon's own NameOwnerChanged (sender
    org.freedesktop.DBus, which nobody else can claim) keeps that owner current.
    """

    def __init__(self, bus: MessageBus, name: str = constants.LOGIND_NAME) -> None:
        self._bus = bus
        self._name = name
        self.owner: str | None = None
        self._callbacks: list[Callable[[str | None], None]] = []
        self._rule = (
            f"type='signal',sender='{constants.DBUS_NAME}',interface='{constants.DBUS_NAME}',"
            f"member='NameOwnerChanged',arg0='{name}'"
        )
        self._started = False

    def on_change(self, callback: Callable[[str | None], None]) -> None:
        self._callbacks.append(callback)

    async def start(self, timeout: float = constants.LOGIND_TIMEOUT_S) -> None:
        self._bus.add_message_handler(self._handle)
        self._started = True
        await add_match(self._bus, self._rule, timeout)
        self.owner = await name_owner(self._bus, self._name, timeout)

    def _handle(self, msg: Message) -> None:
        if (
            msg.message_type != MessageType.SIGNAL
            or msg.sender != constants.DBUS_NAME
            or msg.member != "NameOwnerChanged"
            or msg.interface != constants.DBUS_NAME
            or msg.signature != "sss"
            or msg.body[0] != self._name
        ):
            return None
        new = msg.body[2] or None
        if new == self.owner:
            return None
        self.owner = new
        log.info("%s owner is now %s", self._name, new or "(none)")
        for cb in list(self._callbacks):
            try:
                cb(new)
            except Exception:
                log.exception("owner-change callback failed")
        return None

    async def close(self) -> None:
        if self._started:
            self._started = False
            self._bus.remove_message_handler(self._handle)
            await remove_match(self._bus, self._rule, 1.0)


def _map_logind_error(pid: int, e: LogindError) -> errors.ServiceError:
    if e.name in _NO_SESSION_ERRORS:
        return errors.NotInSession(f"process {pid} is in no login session")
    if not e.name or e.name in _UNAVAILABLE_ERRORS:
        return errors.AuthorityUnavailable(f"logind did not answer for process {pid}: {e.text}")
    return errors.NotInSession(f"logind refused to place process {pid} in a session: {e.name}")


class LogindSessionSource:
    """Sessions from org.freedesktop.login1: GetSessionByPID, else the user's display session."""

    def __init__(self, bus: MessageBus, timeout: float = constants.LOGIND_TIMEOUT_S) -> None:
        self._bus = bus
        self._timeout = timeout
        self._owner = OwnerTracker(bus)
        self._callbacks: list[Callable[[str], None]] = []
        self._rule = (
            f"type='signal',sender='{constants.LOGIND_NAME}',path='{constants.LOGIND_PATH}',"
            f"interface='{constants.LOGIND_MANAGER}',member='SessionRemoved'"
        )
        self._started = False

    async def start(self) -> None:
        await self._owner.start(self._timeout)
        self._bus.add_message_handler(self._handle)
        self._started = True
        await add_match(self._bus, self._rule, self._timeout)

    def on_session_removed(self, callback: Callable[[str], None]) -> None:
        self._callbacks.append(callback)

    def _handle(self, msg: Message) -> None:
        if (
            msg.message_type != MessageType.SIGNAL
            or msg.interface != constants.LOGIND_MANAGER
            or msg.member != "SessionRemoved"
        ):
            return None
        if msg.sender != self._owner.owner or msg.path != constants.LOGIND_PATH:
            log.warning("ignored SessionRemoved from %s (not logind)", msg.sender)
            return None
        if msg.signature != "so":
            return None
        session_id = msg.body[0]
        log.info("logind session %s removed", session_id)
        for cb in list(self._callbacks):
            try:
                cb(session_id)
            except Exception:
                log.exception("session-removed callback failed for session %s", session_id)
        return None

    async def session_of_pid(self, pid: int) -> SessionInfo:
        if not isinstance(pid, int) or pid <= 0:
            raise errors.NotInSession(f"no process {pid!r}")
        try:
            try:
                (path,) = await logind_call(
                    self._bus, constants.LOGIND_PATH, constants.LOGIND_MANAGER, "GetSessionByPID",
                    "u", [pid], self._timeout,
                )
                props = await get_properties(self._bus, path, constants.LOGIND_SESSION,
                                             self._timeout)
            except LogindError as e:
                if e.name != "org.freedesktop.login1.NoSessionForPID":
                    raise
                path, props = await self._display_session_of_user(pid)
        except LogindError as e:
            raise _map_logind_error(pid, e) from None
        try:
            vt = int(props.get("VTNr", 0))
            uid = int(props["User"][0])
            kind = str(props.get("Type", "unspecified")) or "unspecified"
            active = bool(props.get("Active", False))
            session_id = str(props.get("Id") or path.rsplit("/", 1)[-1])
            # Absent from a logind means unknown: the verifier refuses a session it cannot place
            # on seat0 as a local one, so default to what refuses.
            remote = bool(props.get("Remote", True))
            seat = str(props.get("Seat", ("",))[0])
            closing = str(props.get("State", "")) == "closing"
        except (KeyError, IndexError, TypeError, ValueError):
            raise errors.NotInSession(
                f"logind session {path} of process {pid} has malformed properties"
            ) from None
        if not 1 <= vt <= MAX_VT:
            raise errors.NotInSession(f"session {session_id} of process {pid} is not on a VT")
        return SessionInfo(session_id=session_id, uid=uid, vt=vt, kind=kind, active=active,
                           remote=remote, seat=seat, closing=closing)

    async def session_state(self, session_id: str) -> str:
        """logind's State of the session ("online", "active", "closing"), or GONE when logind no
        longer knows it. Raises LogindError when logind does not answer: then nobody knows.

        logind sends no PropertiesChanged for State, so a session's "closing" is only ever
        learnt by asking."""
        try:
            (path,) = await logind_call(
                self._bus, constants.LOGIND_PATH, constants.LOGIND_MANAGER, "GetSession", "s",
                [session_id], self._timeout)
            (state,) = await logind_call(
                self._bus, path, "org.freedesktop.DBus.Properties", "Get", "ss",
                [constants.LOGIND_SESSION, "State"], self._timeout)
        except LogindError as e:
            if e.name in _GONE_ERRORS:
                return GONE
            raise
        return str(getattr(state, "value", state))

    async def runtime_path(self, uid: int) -> str:
        """logind's RuntimePath of user `uid` (its XDG_RUNTIME_DIR, "/run/user/UID"): what the
        service gives a Wayland worker, never what a caller says. Raises NotInSession when
        logind knows no such user or gives no path, AuthorityUnavailable when it does not answer."""
        try:
            (path,) = await logind_call(
                self._bus, constants.LOGIND_PATH, constants.LOGIND_MANAGER, "GetUser", "u",
                [uid], self._timeout)
            (value,) = await logind_call(
                self._bus, path, "org.freedesktop.DBus.Properties", "Get", "ss",
                [constants.LOGIND_USER, "RuntimePath"], self._timeout)
        except LogindError as e:
            if e.name in _NO_SESSION_ERRORS:
                raise errors.NotInSession(f"logind knows no user {uid}") from None
            if not e.name or e.name in _UNAVAILABLE_ERRORS:
                raise errors.AuthorityUnavailable(
                    f"logind did not answer for user {uid}: {e.text}") from None
            raise errors.NotInSession(
                f"logind gave no runtime directory for uid {uid}: {e.name}") from None
        runtime = getattr(value, "value", value)
        if not isinstance(runtime, str) or not runtime:
            raise errors.NotInSession(f"logind gives uid {uid} no runtime directory")
        return runtime

    async def _display_session_of_user(self, pid: int) -> tuple[str, dict[str, Any]]:
        """The display session of the user owning `pid`, for a process outside any session.

        Under a systemd user instance (GNOME 43 and later) autostart programs run in
        user@UID.service, not in the session's scope, so GetSessionByPID finds nothing; like
        spice-vdagent, take the user's display session instead. Only a session that is seat0's
        active, local graphical (X11 or Wayland) session of that same user will do: anything
        looser would let a process outside a session borrow a session it is not part of. Which of
        the two a registration needs is the verifier's to check (its Type).
        """
        (user_path,) = await logind_call(
            self._bus, constants.LOGIND_PATH, constants.LOGIND_MANAGER, "GetUserByPID",
            "u", [pid], self._timeout,
        )
        user = await get_properties(self._bus, user_path, constants.LOGIND_USER, self._timeout)
        try:
            uid = int(user["UID"])
            session_id, path = str(user["Display"][0]), str(user["Display"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            raise errors.NotInSession(
                f"logind user {user_path} of process {pid} has malformed properties") from None
        if not session_id:
            raise errors.NotInSession(
                f"process {pid} is in no login session and uid {uid} has no display session")
        props = await get_properties(self._bus, path, constants.LOGIND_SESSION, self._timeout)
        try:
            owner = int(props["User"][0])
            seat = str(props["Seat"][0])
            remote = bool(props["Remote"])
            active = bool(props["Active"])
            kind = str(props["Type"])
        except (KeyError, IndexError, TypeError, ValueError):
            raise errors.NotInSession(
                f"logind session {path} of uid {uid} has malformed properties") from None
        if owner != uid or seat != "seat0" or remote or not active or \
                kind not in GRAPHICAL_KINDS:
            raise errors.NotInSession(
                f"process {pid} is in no login session, and uid {uid}'s display session "
                f"{session_id} is not seat0's active local X11 or Wayland session")
        return path, props

    async def close(self) -> None:
        if self._started:
            self._started = False
            self._bus.remove_message_handler(self._handle)
            await remove_match(self._bus, self._rule, 1.0)
        await self._owner.close()


def read_active_vt(path: str) -> int | None:
    """The VT number in a sysfs-style "ttyN" file, or None (unreadable, not a VT)."""
    try:
        with open(path, "rb") as f:
            data = f.read(64)
    except OSError:
        return None
    return parse_active_vt(data)


def parse_active_vt(data: bytes) -> int | None:
    text = data.strip()
    if not text.startswith(b"tty") or not text[3:].isdigit():
        return None
    n = int(text[3:])
    return n if 1 <= n <= MAX_VT else None


def parse_proc_stat_tty(stat: bytes) -> int:
    """tty_nr (field 7) of a /proc/PID/stat line.

    The command name (field 2) may itself hold spaces and ')', so split after the last ')'.
    """
    end = stat.rfind(b")")
    if end < 0:
        raise ValueError("no ')' in stat line")
    fields = stat[end + 1 :].split()
    # fields[0] is field 3 (state): tty_nr, field 7, is fields[4].
    return int(fields[4])


def vt_of_tty_nr(tty_nr: int) -> int | None:
    major = (tty_nr >> 8) & 0xFFF
    minor = (tty_nr & 0xFF) | ((tty_nr >> 12) & 0xFFF00)
    if major == VT_MAJOR and 1 <= minor <= MAX_VT:
        return minor
    return None


def parse_proc_status_uid(status: bytes) -> int:
    for line in status.splitlines():
        if line.startswith(b"Uid:"):
            return int(line.split()[1])  # real uid: the others can be changed by the process
    raise ValueError("no Uid line")


class ProcSessionSource:
    """Sessions from /proc when logind is absent: the controlling tty names the VT.

    Known limit: a pid can be reused between the caller's message and our read of /proc; the
    bus only gives us the pid (dbus-daemon 1.14 has no ProcessFD), so a caller that exits and is
    replaced by another process with the same pid could be attributed that process's VT.
    """

    def __init__(
        self, proc_root: str = "/proc", sysfs_active: str = "/sys/class/tty/tty0/active"
    ) -> None:
        self._proc = proc_root
        self._sysfs_active = sysfs_active

    def on_session_removed(self, callback: Callable[[str], None]) -> None:
        pass  # without logind there are no session ids to remove

    async def session_state(self, session_id: str) -> str:
        # Never asked: sessions from /proc have no id (SessionInfo.session_id is None).
        return "online"

    async def runtime_path(self, uid: int) -> str:
        # Never asked either (the verifier refuses a Wayland session without logind first).
        raise errors.NotInSession("without logind there is no runtime directory to trust")

    async def session_of_pid(self, pid: int) -> SessionInfo:
        if not isinstance(pid, int) or pid <= 0:
            raise errors.NotInSession(f"no process {pid!r}")
        base = os.path.join(self._proc, str(pid))
        try:
            with open(os.path.join(base, "stat"), "rb") as f:
                stat = f.read(4096)
            with open(os.path.join(base, "status"), "rb") as f:
                status = f.read(16384)
        except OSError:
            raise errors.NotInSession(f"process {pid} is gone") from None
        try:
            tty_nr = parse_proc_stat_tty(stat)
            uid = parse_proc_status_uid(status)
        except (ValueError, IndexError):
            raise errors.NotInSession(f"process {pid} has an unreadable /proc entry") from None
        vt = vt_of_tty_nr(tty_nr)
        if vt is None:
            raise errors.NotInSession(f"process {pid} is not on a VT (tty_nr {tty_nr:#x})")
        active = read_active_vt(self._sysfs_active) == vt
        return SessionInfo(session_id=None, uid=uid, vt=vt, kind="unspecified", active=active)

    async def close(self) -> None:
        pass


async def logind_present(bus: MessageBus | None) -> bool:
    if bus is None:
        return False
    try:
        (has,) = await logind_call(
            bus, constants.DBUS_PATH, constants.DBUS_NAME, "NameHasOwner", "s",
            [constants.LOGIND_NAME], destination=constants.DBUS_NAME,
        )
    except LogindError as e:
        log.warning("cannot ask the bus whether logind runs (%s): using /proc", e)
        return False
    return bool(has)


async def open_session_source(
    bus: MessageBus | None, timeout: float = constants.LOGIND_TIMEOUT_S
) -> SessionSource:
    """logind when org.freedesktop.login1 has an owner on the bus, else the /proc fallback."""
    if await logind_present(bus):
        assert bus is not None
        source = LogindSessionSource(bus, timeout)
        await source.start()
        log.info("sessions come from logind")
        return source
    log.info("logind is not on the bus: sessions come from /proc (controlling VT)")
    return ProcSessionSource()
