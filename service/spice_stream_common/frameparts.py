"""Frames from the worker to the service as the parts that changed: the worker's half and the service's.

Over the service's socket a frame would be a whole JPEG every time, though a few glyphs change one
band of it. The worker sends FRAME_PARTS instead: how many parts the frame has (the encoder's pieces:
header, bands, EOI) and the new bytes of those that changed (typing: 7 KB a frame instead of 216).
The service keeps each worker's last parts, applies the message and writes the whole frame to the
port as DATA (its first part starts with the JPEG's SOI: the encoder's header, or the whole JPEG).
Nothing of this reaches the port: the type is the worker channel's own.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator, Sequence

from . import protocol as p

FRAME_PARTS = 0xFF01  # far above the stream-device protocol's types
# "Alive, with no picture to show" (a locked screen, a stream being created again): sent every
# HEARTBEAT_S while the host wants frames, so the service's watchdog tells a worker that waits
# from a stuck one without a stale frame being claimed as current. Empty; never reaches the port.
NO_PICTURE = 0xFF02
# "Alive; the picture the host was last sent is still the current one": sent every HEARTBEAT_S on
# a static screen instead of the frame again, so the watchdog and the Streaming property see a
# worker that has nothing new to send. Empty; never reaches the port.
UNCHANGED = 0xFF03
# A video codec's delta frame: a DATA payload whose frame needs every frame since the last
# keyframe. The service writes it to the port as DATA, after those frames, or never: a frame it
# cannot write in turn breaks the chain, and the worker is asked for a keyframe (KEYFRAME).
DELTA = 0xFF04
# From the service: "a frame of your chain was lost: the next frame must be a keyframe". Empty.
KEYFRAME = 0xFF05
MAX_PARTS = 1088  # a 16384-row frame has 1024 bands of 16 rows, plus header and EOI
COUNT = struct.Struct("<I")  # the frame's number of parts
ENTRY = struct.Struct("<II")  # a changed part: its index, then its length and bytes


def payload_limit(frame_limit: int) -> int:
    """The largest FRAME_PARTS payload that can make a frame of at most `frame_limit` bytes."""
    return COUNT.size + MAX_PARTS * ENTRY.size + frame_limit


MAX_PAYLOAD = payload_limit(p.DATA_MAX_BYTES)

# What the service's end of a worker socket accepts: the port's guest messages, FRAME_PARTS,
# DELTA, NO_PICTURE and UNCHANGED.
WORKER_CHANNEL_LIMITS: dict[int, int] = {**p.GUEST_TO_HOST_LIMITS, FRAME_PARTS: MAX_PAYLOAD,
                                          DELTA: p.DATA_MAX_BYTES, NO_PICTURE: 0, UNCHANGED: 0}
# What a worker accepts from the service: the host's messages, and KEYFRAME.
SERVICE_TO_WORKER_LIMITS: dict[int, int] = {**p.HOST_TO_GUEST_LIMITS, KEYFRAME: 0}


def no_picture() -> bytes:
    return p.header(NO_PICTURE, 0)


def unchanged() -> bytes:
    return p.header(UNCHANGED, 0)


def keyframe() -> bytes:
    return p.header(KEYFRAME, 0)


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
    checked, a message that does not apply changes nothing, and no frame exceeds `max_size` (the
    bound its FORMAT gives, at most DATA_MAX_BYTES). A message costs in proportion to its own size
    and entries, never the frame's size or count of parts: its entries are checked first, then its
    parts replaced in place, and the frame is handed on as a Held handle, whose parts are taken
    (under a lock: the port writer is a thread) only when the port takes the frame."""

    def __init__(self, max_size: int = p.DATA_MAX_BYTES) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._version = 0
        self._lock = threading.Lock()
        self.max_size = max_size

    @property
    def size(self) -> int:
        """Bytes of the frame held."""
        return self._size

    def clear(self) -> None:
        """Hold no frame (the next message must bring a whole one); handles given out go stale."""
        with self._lock:
            self._parts, self._size = [], 0
            self._version += 1

    def apply(self, payload: bytes | bytearray) -> Held:
        """The frame after this FRAME_PARTS message; raises p.MessageError if it does not apply."""
        if len(payload) < COUNT.size:
            raise p.MessageError("FRAME_PARTS shorter than its count")
        (count,) = COUNT.unpack_from(payload)
        if not 0 < count <= MAX_PARTS:
            raise p.MessageError(f"FRAME_PARTS of {count} parts, outside 1..{MAX_PARTS}")
        parts = self._parts
        whole = len(parts) != count  # a new layout: every part must come
        size = 0 if whole else self._size
        entries: list[tuple[int, int, int]] = []
        pos, last, end = COUNT.size, -1, len(payload)
        while pos < end:
            if end - pos < ENTRY.size:
                raise p.MessageError("FRAME_PARTS entry cut short")
            index, length = ENTRY.unpack_from(payload, pos)
            pos += ENTRY.size
            if not last < index < count:
                raise p.MessageError(f"FRAME_PARTS part {index} out of order or past {count}")
            if length > end - pos:
                raise p.MessageError(f"FRAME_PARTS part {index} of {length} bytes cut short")
            size += length if whole else length - len(parts[index])
            entries.append((index, pos, pos + length))
            pos += length
            last = index
        if whole and len(entries) != count:
            raise p.MessageError(f"FRAME_PARTS with {len(entries)} of a new layout's {count} parts")
        if not 0 < size <= self.max_size:
            raise p.MessageError(f"FRAME_PARTS frame of {size} bytes, outside 1..{self.max_size}")
        # Checked: now applied, each old part let go before its new one is made, so that a frame
        # and its replacement are never held whole at once.
        with self._lock, memoryview(payload) as view:
            if whole:
                self._parts = parts = []
                parts.extend(bytes(view[a:b]) for _, a, b in entries)
            else:
                for index, a, b in entries:
                    parts[index] = b""
                    parts[index] = bytes(view[a:b])
            self._size = size
            self._version += 1
            return Held(self, self._version, size, parts[0][:HEAD_BYTES])

    def _take(self, version: int) -> tuple[bytes, ...] | None:
        with self._lock:
            return tuple(self._parts) if version == self._version else None

    def _joined(self, version: int, prefix: bytes) -> bytes | None:
        # Under the lock, so that a message arriving meanwhile waits for the join (a copy: 0.7 ms
        # a MiB here, 23 ms for the largest frame, 0.2 ms for a 1080p one) instead of its frame
        # and this one both being held besides the joined copy.
        with self._lock:
            return b"".join((prefix, *self._parts)) if version == self._version else None


HEAD_BYTES = 2  # what the service checks of a frame's start: a JPEG's SOI


class Held:
    """A frame an Assembler holds, as handed on (a p.Frame): its size and its first part's start,
    and its parts when the port writer takes it, if the worker has not changed it since."""

    __slots__ = ("_assembler", "_version", "head", "size")

    def __init__(self, assembler: Assembler, version: int, size: int, head: bytes) -> None:
        self._assembler = assembler
        self._version = version
        self.size = size
        self.head = head

    def take(self) -> tuple[bytes, ...] | None:
        return self._assembler._take(self._version)

    def joined(self, prefix: bytes = b"") -> bytes | None:
        """`prefix` and the frame in one piece, or None if the holder has moved on."""
        return self._assembler._joined(self._version, prefix)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.take() or ())
