"""Frames from the worker to the service as the parts that changed: the worker's half and the service's.

Over the service's socket a frame would be a whole JPEG every time, though a few glyphs change one
band of it. The worker sends FRAME_PARTS instead: how many parts the frame has (the encoder's pieces:
header, bands, EOI) and the new bytes of those that changed (typing: 7 KB a frame instead of 216).
The service keeps each worker's last parts, applies the message and writes the whole frame to the
port as DATA. Nothing of this reaches the port: the type is the worker channel's own.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from . import protocol as p

FRAME_PARTS = 0xFF01  # far above the stream-device protocol's types
MAX_PARTS = 1088  # a 16384-row frame has 1024 bands of 16 rows, plus header and EOI
COUNT = struct.Struct("<I")  # the frame's number of parts
ENTRY = struct.Struct("<II")  # a changed part: its index, then its length and bytes
MAX_PAYLOAD = COUNT.size + MAX_PARTS * ENTRY.size + p.DATA_MAX_BYTES

# What the service's end of a worker socket accepts: the port's guest messages, and FRAME_PARTS.
WORKER_CHANNEL_LIMITS: dict[int, int] = {**p.GUEST_TO_HOST_LIMITS, FRAME_PARTS: MAX_PAYLOAD}


def message(parts: Sequence[bytes], changed: Sequence[int]) -> list[bytes]:
    """A FRAME_PARTS message as pieces to write (never joined): `parts` is the whole frame,
    `changed` the increasing indexes of those to send."""
    pieces = [b"", COUNT.pack(len(parts))]
    for i in changed:
        pieces += (ENTRY.pack(i, len(parts[i])), parts[i])
    pieces[0] = p.header(FRAME_PARTS, sum(map(len, pieces)))
    return pieces


class Sender:
    """The worker's side: what the service holds, so that only changed parts are sent."""

    def __init__(self) -> None:
        self._held: tuple[bytes, ...] | None = None

    def message(self, parts: tuple[bytes, ...]) -> list[bytes]:
        """The message that turns what the service holds into `parts`; tell sent(parts) once it
        is queued whole, forget() if it was not."""
        held = self._held
        if held is None or len(held) != len(parts):
            changed: Sequence[int] = range(len(parts))
        else:
            # The encoder hands unchanged parts back as the same objects.
            changed = [i for i, (old, new) in enumerate(zip(held, parts, strict=True))
                       if old is not new]
        return message(parts, changed)

    def sent(self, parts: tuple[bytes, ...]) -> None:
        self._held = parts

    def forget(self) -> None:
        """The last message was not sent: the next one carries every part."""
        self._held = None


class Assembler:
    """The service's side, one per worker: the parts of its last frame.

    The worker runs as the session's user, who controls it: every count, index and length is
    checked, a message that does not apply changes nothing, and no frame exceeds DATA_MAX_BYTES.
    A message costs in proportion to its own size and the count of parts, never the frame's size:
    the frame is handed on as its parts, not joined, so a flood of one-byte changes to a large
    frame is no more work than any other flood of small messages."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0

    def apply(self, payload: bytes) -> tuple[bytes, ...]:
        """The frame's parts after this FRAME_PARTS message; raises p.MessageError if it does not
        apply."""
        if len(payload) < COUNT.size:
            raise p.MessageError("FRAME_PARTS shorter than its count")
        (count,) = COUNT.unpack_from(payload)
        if not 0 < count <= MAX_PARTS:
            raise p.MessageError(f"FRAME_PARTS of {count} parts, outside 1..{MAX_PARTS}")
        whole = len(self._parts) != count  # a new layout: every part must come
        parts = [b""] * count if whole else list(self._parts)
        size = 0 if whole else self._size
        pos, last, given = COUNT.size, -1, 0
        view = memoryview(payload)
        while pos < len(payload):
            if len(payload) - pos < ENTRY.size:
                raise p.MessageError("FRAME_PARTS entry cut short")
            index, length = ENTRY.unpack_from(payload, pos)
            pos += ENTRY.size
            if not last < index < count:
                raise p.MessageError(f"FRAME_PARTS part {index} out of order or past {count}")
            if length > len(payload) - pos:
                raise p.MessageError(f"FRAME_PARTS part {index} of {length} bytes cut short")
            size += length - len(parts[index])
            parts[index] = bytes(view[pos : pos + length])
            pos += length
            last, given = index, given + 1
        if whole and given != count:
            raise p.MessageError(f"FRAME_PARTS with {given} of a new layout's {count} parts")
        if not 0 < size <= p.DATA_MAX_BYTES:
            raise p.MessageError(f"FRAME_PARTS frame of {size} bytes, outside 1..{p.DATA_MAX_BYTES}")
        self._parts, self._size = parts, size
        return tuple(parts)


def starts_with(pieces: tuple[bytes, ...], prefix: bytes) -> bool:
    """Whether the pieces, joined, would start with `prefix` (without joining them)."""
    head = b""
    for piece in pieces:
        head += piece[: len(prefix) - len(head)]
        if len(head) == len(prefix):
            break
    return head == prefix
