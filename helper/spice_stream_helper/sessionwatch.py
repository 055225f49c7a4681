"""The helper's own logind session: found once, then watched for becoming the active one."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from dbus_next import Message, MessageType
from dbus_next.aio import MessageBus

from spice_stream_common.constants import (
    DBUS_NAME,
    DBUS_PATH,
    LOGIND_MANAGER,
    LOGIND_NAME,
    LOGIND_PATH,
    LOGIND_SESSION,
    LOGIND_USER,
)

CALL_TIMEOUT_S = 5.0
PROPERTIES = "org.freedesktop.DBus.Properties"


async def _call(bus: MessageBus, dest: str, path: str, iface: str, member: str, sig: str,
                body: list) -> list | None:
    try:
        reply = await asyncio.wait_for(bus.call(Message(
            destination=dest, path=path, interface=iface, member=member, signature=sig,
            body=body)), CALL_TIMEOUT_S)
    except (TimeoutError, OSError, EOFError):
        return None
    if reply is None or reply.message_type != MessageType.METHOD_RETURN:
        return None
    return list(reply.body)


async def own_session_path(bus: MessageBus, pid: int | None = None) -> str | None:
    """Our session's object path: the session of this process, else (GNOME's autostart runs in
    systemd --user, outside the session's scope) the user's display session; None without one."""
    pid = os.getpid() if pid is None else pid
    got = await _call(bus, LOGIND_NAME, LOGIND_PATH, LOGIND_MANAGER, "GetSessionByPID", "u", [pid])
    if got:
        return str(got[0])
    got = await _call(bus, LOGIND_NAME, LOGIND_PATH, LOGIND_MANAGER, "GetUserByPID", "u", [pid])
    if not got:
        return None
    display = await _call(bus, LOGIND_NAME, str(got[0]), PROPERTIES, "Get", "ss",
                          [LOGIND_USER, "Display"])
    if not display:
        return None
    session_id, path = display[0].value
    return str(path) if session_id else None


class ActiveWatch:
    """Calls `on_active` each time logind says our session became the active one (a VT switch to
    it): then polkit's allow_active lets this session register."""

    def __init__(self, bus: MessageBus, path: str, on_active: Callable[[], None]) -> None:
        self._bus = bus
        self.path = path
        self._on_active = on_active
        self._rule = (f"type='signal',sender='{LOGIND_NAME}',path='{path}',"
                      f"interface='{PROPERTIES}',member='PropertiesChanged',"
                      f"arg0='{LOGIND_SESSION}'")

    async def start(self) -> bool:
        self._bus.add_message_handler(self._handle)
        added = await _call(self._bus, DBUS_NAME, DBUS_PATH, DBUS_NAME, "AddMatch", "s",
                            [self._rule])
        return added is not None

    async def is_active(self) -> bool:
        got = await _call(self._bus, LOGIND_NAME, self.path, PROPERTIES, "Get", "ss",
                          [LOGIND_SESSION, "Active"])
        return bool(got and got[0].value is True)

    def _handle(self, msg: Message) -> bool:
        if (msg.message_type != MessageType.SIGNAL or msg.member != "PropertiesChanged"
                or msg.path != self.path or msg.signature != "sa{sv}as"
                or msg.body[0] != LOGIND_SESSION):
            return False
        active = msg.body[1].get("Active")
        if active is not None and active.value is True:
            self._on_active()
        return False
