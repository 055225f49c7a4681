"""Pure checks of a caller's DISPLAY string and Xauthority file contents (no I/O)."""

from __future__ import annotations

import re
import socket
import struct
from dataclasses import dataclass

from .untrusted import shown

MAX_XAUTHORITY_BYTES = 64 * 1024

# Xauth families (X11/Xauth.h): only entries that can apply to a local display count.
FAMILY_INTERNET = 0
FAMILY_INTERNET6 = 6
FAMILY_LOCALHOST = 252
FAMILY_LOCAL = 256
FAMILY_WILD = 65535
# The only scheme the worker's X library (python-xlib) speaks.
COOKIE_NAME = b"MIT-MAGIC-COOKIE-1"

_DISPLAY_RE = re.compile(r":([0-9]{1,4})(?:\.([0-9]{1,2}))?")


class BadXauthority(ValueError):
    """A display string or Xauthority contents refused; the text says why, for a person. The
    service answers it as InvalidArgument, the worker takes it as no cookie."""


@dataclass(frozen=True)
class XauthEntry:
    family: int
    address: bytes
    number: bytes
    name: bytes
    data: bytes


def display_number(display: str) -> int:
    """The N of a local display ":N" or ":N.S"; anything else (remote, odd characters) is refused."""
    if not isinstance(display, str) or _DISPLAY_RE.fullmatch(display) is None:
        raise BadXauthority(
            f"display {shown(display, 40)} is not a local X display: expected ':N' or ':N.S' "
            "(e.g. ':0')")
    return int(_DISPLAY_RE.fullmatch(display).group(1))


def parse_xauthority(data: bytes) -> list[XauthEntry]:
    """Every entry of an Xauthority file; a truncated or oversized file is refused as a whole."""
    if len(data) > MAX_XAUTHORITY_BYTES:
        raise BadXauthority(f"Xauthority file is larger than {MAX_XAUTHORITY_BYTES} bytes")
    entries: list[XauthEntry] = []
    pos = 0
    end = len(data)

    def counted() -> bytes:
        nonlocal pos
        if pos + 2 > end:
            raise BadXauthority("Xauthority file is truncated or not an Xauthority file")
        (n,) = struct.unpack_from(">H", data, pos)
        pos += 2
        if pos + n > end:
            raise BadXauthority("Xauthority file is truncated or not an Xauthority file")
        field = data[pos:pos + n]
        pos += n
        return field

    while pos < end:
        if pos + 2 > end:
            raise BadXauthority("Xauthority file is truncated or not an Xauthority file")
        (family,) = struct.unpack_from(">H", data, pos)
        pos += 2
        address = counted()
        number = counted()
        name = counted()
        cookie = counted()
        entries.append(XauthEntry(family, address, number, name, cookie))
    return entries


def matches_local_display(entry: XauthEntry, number: int, hostname: bytes) -> bool:
    """libXau's rule (XauGetBestAuthByAddr) for a client of a local display, which asks with
    family FamilyLocal and this machine's host name: a FamilyWild entry or a FamilyLocal one
    for this host, whose display number is this one or empty (GDM writes empty numbers: any
    display)."""
    if entry.family != FAMILY_WILD and not (entry.family == FAMILY_LOCAL
                                            and entry.address == hostname):
        return False
    return entry.number in (b"", str(number).encode())


def require_cookie_for(data: bytes, display: str, hostname: bytes | None = None) -> XauthEntry:
    """The entry an X client on this machine would use for this local display (libXau's first
    match with a MIT-MAGIC-COOKIE-1); refuses a file without one."""
    number = display_number(display)
    entries = parse_xauthority(data)
    if not entries:
        raise BadXauthority("Xauthority file is empty: it holds no cookie")
    host = socket.gethostname().encode() if hostname is None else hostname
    for entry in entries:
        if entry.name == COOKIE_NAME and matches_local_display(entry, number, host):
            if not entry.data:
                break  # libXau would hand this empty cookie to the server: it cannot work
            return entry
    raise BadXauthority(
        f"Xauthority file holds no cookie for local display :{number} on this host "
        f"(it has {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} for other displays "
        "or hosts)")
