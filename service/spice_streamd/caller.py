"""Who is calling: the caller's uid, pid and groups as the bus daemon reports them, never as claimed."""

from __future__ import annotations

import asyncio
import pwd
from dataclasses import dataclass

from dbus_next import Message, MessageType
from dbus_next.aio import MessageBus

from spice_stream_common import constants

from .errors import AuthorityUnavailable, PermissionDenied

NOGROUP = 65534
CREDENTIALS_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Caller:
    sender: str
    uid: int
    pid: int
    gid: int  # primary group from passwd (the bus gives groups unordered)
    groups: tuple[int, ...]  # supplementary groups, never containing 0

    def __str__(self) -> str:
        return f"uid {self.uid} pid {self.pid} ({self.sender})"


def primary_gid(uid: int) -> int:
    try:
        gid = pwd.getpwuid(uid).pw_gid
    except KeyError:
        return NOGROUP
    # Nothing the service starts for a user may keep the root group.
    return NOGROUP if gid == 0 and uid != 0 else gid


async def _credentials(bus: MessageBus, sender: str, timeout: float) -> dict:
    msg = Message(destination=constants.DBUS_NAME, path=constants.DBUS_PATH,
                  interface=constants.DBUS_NAME, member="GetConnectionCredentials",
                  signature="s", body=[sender])
    try:
        reply = await asyncio.wait_for(bus.call(msg), timeout)
    except TimeoutError:
        raise AuthorityUnavailable("the bus daemon did not report the caller's credentials") from None
    if reply is None or reply.message_type == MessageType.ERROR:
        # The caller left before we asked: nobody to answer.
        raise PermissionDenied("the caller's credentials are unknown (has it disconnected?)")
    return reply.body[0]


async def uid_of(bus: MessageBus, sender: str, timeout: float = CREDENTIALS_TIMEOUT_S) -> int:
    """The uid of a unique bus name, as the bus daemon reports it."""
    creds = await _credentials(bus, sender, timeout)
    if "UnixUserID" not in creds:
        raise PermissionDenied("the bus daemon did not report the caller's uid")
    return int(creds["UnixUserID"].value)


async def credentials_of(bus: MessageBus, sender: str,
                         timeout: float = CREDENTIALS_TIMEOUT_S) -> Caller:
    """GetConnectionCredentials of a unique bus name; the bus daemon, not the caller, vouches."""
    creds = await _credentials(bus, sender, timeout)
    if "UnixUserID" not in creds or "ProcessID" not in creds:
        raise PermissionDenied("the bus daemon did not report the caller's uid and pid")
    uid = int(creds["UnixUserID"].value)
    pid = int(creds["ProcessID"].value)
    groups = tuple(sorted({int(g) for g in creds["UnixGroupIDs"].value} - {0})) \
        if "UnixGroupIDs" in creds else ()
    return Caller(sender=sender, uid=uid, pid=pid, gid=primary_gid(uid), groups=groups)
