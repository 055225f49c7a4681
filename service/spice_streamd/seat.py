"""Which VT (and, with logind, which session) is active: logind's seat0 ActiveSession, or
/sys/class/tty/tty0/active without logind (and, with it, as the first word of a switch)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from dbus_next import Message, MessageType
from dbus_next.aio import MessageBus
from dbus_next.validators import is_object_path_valid

from spice_stream_common import constants

from .sessioninfo import (
    MAX_VT,
    LogindError,
    OwnerTracker,
    add_match,
    get_properties,
    logind_present,
    parse_active_vt,
    remove_match,
)

log = logging.getLogger(__name__)

SYSFS_ACTIVE = "/sys/class/tty/tty0/active"
POLL_INTERVAL_S = 0.5
# After the kernel's VT changed, logind is asked again at these times (s) until it agrees: its
# PropertiesChanged came late or not at all under load (VM, Debian 12: a switch to an X11 session
# found by the periodic re-check 3.4 s after `chvt`, logind itself having it at 0.7 s).
KERNEL_FOLLOW_S = (0.0, 0.2, 0.5, 1.0, 2.0)
# Sessions whose VTNr is remembered (it never changes in a session's life), so that a switch to a
# known session costs logind no call: under load each took 0.5-1 s in the VM while logind handled
# the switch itself (Debian 12: the service followed 2.6 s after the kernel, logind's own signal
# having come at 0.7 s).
SESSION_VTS_KEPT = 64


def read_kernel_vt(path: str = SYSFS_ACTIVE) -> int | None:
    """The VT number in the sysfs attribute at `path` now, None if unreadable or not a VT."""
    try:
        with open(path, "rb") as f:
            return parse_active_vt(f.read(64))
    except OSError:
        return None


class VTSource(Protocol):
    active_vt: int | None
    # seat0's active logind session id; always None when has_sessions is False (no logind).
    active_session: str | None
    has_sessions: bool

    def on_change(self, callback: Callable[[int | None], None]) -> None: ...

    def kernel_vt(self) -> int | None:
        """The kernel's foreground VT read now (None: unknown), ahead of what the source has
        published: a switch reaches the kernel first."""
        ...

    async def refresh(self, why: str) -> None: ...

    async def close(self) -> None: ...


class _Notifier:
    """Holds active_vt (and active_session) and calls the callbacks once per actual change of
    either: a new session on the same VT (a logout and a login on that VT) is a change too."""

    has_sessions = False

    def __init__(self) -> None:
        self.active_vt: int | None = None
        self.active_session: str | None = None
        self._callbacks: list[Callable[[int | None], None]] = []
        self._log_changes = True  # False for a watcher whose owner logs what it concludes

    def on_change(self, callback: Callable[[int | None], None]) -> None:
        self._callbacks.append(callback)

    def _set(self, vt: int | None, why: str, session: str | None = None) -> None:
        if (vt, session) == (self.active_vt, self.active_session):
            return
        if self._log_changes and session == self.active_session:
            log.info("active VT %s -> %s (%s)", self.active_vt, vt, why)
        elif self._log_changes:
            log.info("active VT %s -> %s, session %s -> %s (%s)", self.active_vt, vt,
                     self.active_session or "(none)", session or "(none)", why)
        self.active_vt = vt
        self.active_session = session
        for cb in list(self._callbacks):
            try:
                cb(vt)
            except Exception:
                log.exception("active-VT callback failed (VT %s)", vt)


class LogindVTSource(_Notifier):
    """seat0's ActiveSession (followed through PropertiesChanged) and that session's VTNr."""

    has_sessions = True

    def __init__(self, bus: MessageBus, timeout: float = constants.LOGIND_TIMEOUT_S,
                 kernel_vt_path: str = SYSFS_ACTIVE) -> None:
        super().__init__()
        self._bus = bus
        self._timeout = timeout
        self._kernel_vt_path = kernel_vt_path
        # The kernel knows of a switch first: each change of its VT has logind asked again
        # (KERNEL_FOLLOW_S), whatever becomes of logind's signal.
        self._kernel = SysfsVTSource(kernel_vt_path, label="the kernel's VT, for logind's",
                                     log_changes=False)
        self._following = 0  # the kernel change followed now (a newer one ends the older)
        self._owner = OwnerTracker(bus)
        self._rule = (
            f"type='signal',sender='{constants.LOGIND_NAME}',"
            f"path='{constants.LOGIND_SEAT0_PATH}',interface='org.freedesktop.DBus.Properties',"
            f"member='PropertiesChanged',arg0='{constants.LOGIND_SEAT}'"
        )
        self._generation = 0
        self._published = 0  # the generation of the last answer published
        self._failing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._session_vts: OrderedDict[str, int | None] = OrderedDict()

    async def start(self) -> None:
        self._owner.on_change(self._owner_changed)
        await self._owner.start(self._timeout)
        self._bus.add_message_handler(self._handle)
        self._started = True
        await add_match(self._bus, self._rule, self._timeout)
        await self._refresh("start")
        self._kernel.on_change(self._kernel_changed)
        await self._kernel.start()

    def _owner_changed(self, owner: str | None) -> None:
        self._session_vts.clear()  # another logind: nothing it said before is taken as known
        self._schedule_refresh(f"logind owner {owner}")

    def _kernel_changed(self, vt: int | None) -> None:
        self._following += 1
        task = asyncio.get_running_loop().create_task(self._follow_kernel(self._following))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow_kernel(self, following: int) -> None:
        """Asks logind again until its VT is the kernel's (a text console with no session gives
        the kernel's too), for KERNEL_FOLLOW_S at most: a session on no VT never agrees."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for at in KERNEL_FOLLOW_S:
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            if following != self._following or self.active_vt == self._kernel.active_vt:
                return
            await self._refresh("the kernel's VT changed")

    def _handle(self, msg: Message) -> None:
        if (
            msg.message_type != MessageType.SIGNAL
            or msg.path != constants.LOGIND_SEAT0_PATH
            or msg.interface != "org.freedesktop.DBus.Properties"
            or msg.member != "PropertiesChanged"
        ):
            return None
        if msg.sender != self._owner.owner:
            log.warning("ignored seat0 PropertiesChanged from %s (not logind)", msg.sender)
            return None
        if msg.signature != "sa{sv}as" or msg.body[0] != constants.LOGIND_SEAT:
            return None
        if "ActiveSession" in msg.body[1]:
            # The signal carries the new value: the seat is not asked again.
            self._schedule_refresh("seat0 ActiveSession changed",
                                   _active_session(msg.body[1]["ActiveSession"].value))
        elif "ActiveSession" in msg.body[2]:
            self._schedule_refresh("seat0 ActiveSession changed")
        return None

    def _schedule_refresh(self, why: str, active: tuple[str, str] | None = None) -> None:
        task = asyncio.get_running_loop().create_task(self._refresh(why, active))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self, why: str, active: tuple[str, str] | None = None) -> None:
        # Lookups can overlap: an answer is published unless a newer lookup's answer already was,
        # so a slow answer about an old switch cannot override a newer one, and the first answer
        # is not held back by a newer lookup still waiting (a re-check started while logind was
        # slow under load held a switch back 3.3 s, VM, Debian 12).
        self._generation += 1
        generation = self._generation
        try:
            vt, session = await self._read_active(active)
            self._failing = False
        except LogindError as e:
            # Once per run of failures: the periodic re-check would repeat it every few seconds.
            if not self._failing:
                log.warning("cannot read seat0's active session (%s): no active VT", e)
            self._failing = True
            vt, session = None, None
        if generation > self._published:
            self._published = generation
            self._set(vt, why, session)

    async def refresh(self, why: str) -> None:
        """Reads seat0's active session again: a lost PropertiesChanged is made good here."""
        await self._refresh(why)

    async def _read_active(self, active: tuple[str, str] | None = None
                           ) -> tuple[int | None, str | None]:
        """seat0's active session's VT (None when not on a VT) and id (None without one);
        `active`: seat0's ActiveSession as logind's signal said it (the seat is not asked)."""
        if self._owner.owner is None:
            return None, None
        if active is None:
            seat = await get_properties(
                self._bus, constants.LOGIND_SEAT0_PATH, constants.LOGIND_SEAT, self._timeout
            )
            active = _active_session(seat.get("ActiveSession"))
        if active is None:
            return self.kernel_vt(), None
        session_id, path = active
        if not session_id or path in ("", "/"):
            # No session in front (a text console's login prompt): the VT is the kernel's.
            return self.kernel_vt(), None
        if session_id in self._session_vts:
            self._session_vts.move_to_end(session_id)
            return self._session_vts[session_id], session_id
        props = await get_properties(self._bus, path, constants.LOGIND_SESSION, self._timeout)
        try:
            number = int(props.get("VTNr", 0))
        except (TypeError, ValueError):
            return None, session_id  # not remembered: asked again next time
        vt = number if 1 <= number <= MAX_VT else None
        self._session_vts[session_id] = vt
        while len(self._session_vts) > SESSION_VTS_KEPT:
            self._session_vts.popitem(last=False)
        return vt, session_id

    def kernel_vt(self) -> int | None:
        return read_kernel_vt(self._kernel_vt_path)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._kernel.close()
        if self._started:
            self._started = False
            self._bus.remove_message_handler(self._handle)
            await remove_match(self._bus, self._rule, 1.0)
        await self._owner.close()


def _active_session(value: Any) -> tuple[str, str] | None:
    """seat0's ActiveSession, (so): (session id, object path); None when it is not that shape
    (a two-letter string unpacks as a pair too: only a list or tuple is taken)."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    session_id, path = value
    if not isinstance(session_id, str) or not isinstance(path, str) or not (
            path == "/" or is_object_path_valid(path)):
        return None
    return session_id, path


class SysfsVTSource(_Notifier):
    """/sys/class/tty/tty0/active, watched through the sysfs attribute's poll notification.

    sysfs_notify() raises POLLPRI|POLLERR while the attribute always reports readable, so the
    loop's EPOLLIN reader would spin: the fd goes into an epoll set of its own, for PRI/ERR only,
    and that set's fd is what the event loop watches. A path that epoll refuses (a regular file,
    as in tests) or that is missing is polled every POLL_INTERVAL_S instead.
    """

    def __init__(self, path: str = SYSFS_ACTIVE, label: str = "active VT",
                 log_changes: bool = True) -> None:
        """`label` names it in its log lines; log_changes=False: its owner logs what it makes of
        a change."""
        super().__init__()
        self.path = path
        self._label = label
        self._log_changes = log_changes
        self.mode = "none"  # "epoll" or "poll", for tests and the startup log
        self._fd: int | None = None
        self._epoll: select.epoll | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            log.warning("cannot open %s (%s): polling it (%s)", self.path, e.strerror, self._label)
            fd = None
        if fd is not None:
            ep = select.epoll(flags=select.EPOLL_CLOEXEC)
            try:
                ep.register(fd, select.EPOLLPRI | select.EPOLLERR)
            except OSError:
                ep.close()
                os.close(fd)
            else:
                self._fd, self._epoll = fd, ep
                self._loop.add_reader(ep.fileno(), self._on_notify)
                self.mode = "epoll"
                self._read_fd("start")
        if self._epoll is None:
            self.mode = "poll"
            self._poll()
        log.info("%s from %s (%s): %s", self._label, self.path, self.mode, self.active_vt)

    def _read_fd(self, why: str) -> None:
        assert self._fd is not None
        try:
            # Reading from offset 0 is also what re-arms the sysfs notification.
            data = os.pread(self._fd, 64, 0)
        except OSError as e:
            log.warning("cannot read %s: %s", self.path, e.strerror)
            data = b""
        self._set(parse_active_vt(data), why)

    def kernel_vt(self) -> int | None:
        return read_kernel_vt(self.path)

    async def refresh(self, why: str) -> None:
        """Reads the attribute again (the poll mode does so on its own timer anyway)."""
        if self._fd is not None:
            self._read_fd(why)

    def _on_notify(self) -> None:
        assert self._epoll is not None
        self._epoll.poll(0)
        self._read_fd(f"{self.path} changed")

    def _poll(self) -> None:
        self._timer = None
        if self._closed:
            return
        try:
            with open(self.path, "rb") as f:
                data = f.read(64)
        except OSError:
            data = b""
        self._set(parse_active_vt(data), f"{self.path} polled")
        assert self._loop is not None
        self._timer = self._loop.call_later(POLL_INTERVAL_S, self._poll)

    async def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._epoll is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


async def open_vt_source(
    bus: MessageBus | None,
    sysfs_path: str = SYSFS_ACTIVE,
    timeout: float = constants.LOGIND_TIMEOUT_S,
) -> VTSource:
    """logind's seat0 when org.freedesktop.login1 has an owner on the bus, else sysfs."""
    if await logind_present(bus):
        assert bus is not None
        source: LogindVTSource | SysfsVTSource = LogindVTSource(bus, timeout, sysfs_path)
        await source.start()
        log.info("active VT comes from logind seat0: %s", source.active_vt)
        return source
    sysfs = SysfsVTSource(sysfs_path)
    await sysfs.start()
    return sysfs
