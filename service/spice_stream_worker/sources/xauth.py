"""The worker's X cookie: chosen by libXau's rule (the one the service checked), not python-xlib's."""

from __future__ import annotations

import os
import re
import socket

from Xlib.support import unix_connect

from spice_stream_common.xauthority import (
    COOKIE_NAME,
    BadXauthority,
    matches_local_display,
    parse_xauthority,
)

_xlib_get_auth = unix_connect.get_auth


def xauthority_path(env: dict[str, str] | os._Environ[str] = os.environ) -> str:
    return env.get("XAUTHORITY") or os.path.join(env.get("HOME", "/"), ".Xauthority")


def local_cookie(path: str, number: int, hostname: bytes) -> tuple[bytes, bytes]:
    """(name, data) of the first MIT-MAGIC-COOKIE-1 entry libXau would use, or (b"", b"")."""
    try:
        with open(path, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as f:
            data = f.read(64 * 1024 + 1)
        entries = parse_xauthority(data)
    except (OSError, BadXauthority):
        return b"", b""
    for entry in entries:
        if entry.name == COOKIE_NAME and matches_local_display(entry, number, hostname):
            return entry.name, entry.data
    return b"", b""


def _get_auth(sock, dname, protocol, host, dno):  # python-xlib's signature
    # python-xlib 0.33 ignores FamilyWild entries, which GDM's Xauthority relies on; a local
    # display gets libXau's choice, anything else python-xlib's own.
    if protocol in (None, "unix") and not host:
        return local_cookie(xauthority_path(), int(dno), socket.gethostname().encode())
    return _xlib_get_auth(sock, dname, protocol, host, dno)


_LOCAL = re.compile(r":[0-9]+(\.[0-9]+)?")


def local_only(display: str) -> str:
    """A local display ":N" as python-xlib's "unix/:N": for ":N" it falls back to TCP when the
    socket fails, which the service's sandbox forbids (EAFNOSUPPORT, a misleading reason) and a
    local display never needs."""
    return "unix/" + display if _LOCAL.fullmatch(display) else display


def install() -> None:
    """Make python-xlib's connection setup use _get_auth (idempotent)."""
    unix_connect.get_auth = _get_auth
