"""Text a caller, a file or a child controls, made safe to put in a log line or an error message."""

from __future__ import annotations

DEFAULT_LIMIT = 200
ELLIPSIS = "…"

# Shown by name, as Python does; every other non-printable character by its code point.
_NAMED = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    if ch.isprintable():
        return ch
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape): show the byte
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def shown(text: object, limit: int = DEFAULT_LIMIT, *, quoted: bool = True) -> str:
    """`text` in a printable, bounded form: in double quotes (unless quoted=False), with control
    and other non-printable characters (newline, ESC, bidi overrides, non-UTF-8 bytes) and the
    backslash and quote escaped as in a Python literal, cut after `limit` characters with an
    ellipsis outside the quotes. A newline in a caller's path can no longer start a log line of
    its own, nor an escape sequence reach a terminal."""
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8", "surrogateescape")
    elif not isinstance(text, str):
        text = str(text)
    cut = len(text) > limit
    body = "".join(_escape(ch) for ch in text[:limit])
    if quoted:
        body = f'"{body}"'
    return body + ELLIPSIS if cut else body


def printable(text: str, limit: int = 1000) -> str:
    """`text` unchanged when it is already printable and short (a message the service composed
    with shown() for its untrusted parts), else shown() unquoted: the last guard before a text
    goes to the log or over the bus."""
    if len(text) <= limit and text.isprintable():
        return text
    return shown(text, limit, quoted=False)
