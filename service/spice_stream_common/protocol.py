"""The SPICE stream-device protocol, version 1: message layouts, builders and a bounded incremental parser.

The authoritative layout is spice/stream-device.h (Debian libspice-protocol-dev); the size rules below follow
what libspice-server checks on the host side, so a message we build is one the host accepts.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Protocol

PROTOCOL_VERSION = 1

HEADER = struct.Struct("<BBHI")  # protocol_version, padding, type, size
HEADER_SIZE = HEADER.size

CODEC_MJPEG = 1  # SpiceVideoCodecType
CODEC_VP8 = 2
CODEC_H264 = 3
CODEC_VP9 = 4
_VERSION_BYTE = bytes([PROTOCOL_VERSION])  # where a resynchronising parser looks for a header


class MsgType(enum.IntEnum):
    INVALID = 0
    CAPABILITIES = 1
    FORMAT = 2
    DATA = 3
    START_STOP = 4
    NOTIFY_ERROR = 5
    CURSOR_SET = 6
    CURSOR_MOVE = 7
    DEVICE_DISPLAY_INFO = 8
    QUALITY_INDICATOR = 9


class CursorType(enum.IntEnum):
    """SpiceCursorType values the stream device accepts (ALPHA, COLOR24, COLOR32 only)."""

    ALPHA = 0
    COLOR24 = 5
    COLOR32 = 6


class Capability(enum.IntEnum):
    """Bit numbers in the CAPABILITIES bitmap."""

    QUALITY_INDICATOR = 0


CAPABILITIES_MAX_BYTES = 1024
DATA_MAX_BYTES = 32 * 1024 * 1024
CURSOR_MAX_SIDE = 1024
# A payload at least this big is handed on as the parser's own buffer, not copied out of it.
HANDOVER_BYTES = 64 * 1024
NOTIFY_ERROR_MAX_BYTES = 64 * 1024
DEVICE_ADDRESS_MAX_BYTES = 255
QUALITY_MAX_BYTES = 256

FORMAT = struct.Struct("<IIB3x")
CURSOR_SET_HEADER = struct.Struct("<HHHHB3x")
CURSOR_MOVE = struct.Struct("<ii")
# What libspice-server 0.15 (server/red-stream-device.cpp, StreamDevice::handle_msg_cursor_set and
# stream_msg_cursor_set_to_cursor_cmd, unchanged from 0.14.90 to 0.15.1) accepts in a CURSOR_SET:
# a payload of at least the header and at most the header plus (1024 * 4 + 128) * 1024 bytes (its
# largest cursor at 33 bits a pixel), width and height at most 1024, one of these types with
# get_cursor_type_bits()'s bits per pixel (COLOR24 and COLOR32 carry a 1-bit mask after the
# pixels), and at least ceil(width * height * bits / 8) bytes after the header (more are ignored).
CURSOR_BITS = {CursorType.ALPHA: 32, CursorType.COLOR24: 24 + 1, CursorType.COLOR32: 32 + 1}
CURSOR_SET_MAX_BYTES = CURSOR_SET_HEADER.size + (CURSOR_MAX_SIDE * 4 + (CURSOR_MAX_SIDE + 7) // 8) \
    * CURSOR_MAX_SIDE
DEVICE_DISPLAY_INFO = struct.Struct("<III")
NOTIFY_ERROR = struct.Struct("<I")

# Largest payload each direction may carry, per type: anything bigger is refused before it is buffered.
HOST_TO_GUEST_LIMITS: dict[int, int] = {
    MsgType.CAPABILITIES: CAPABILITIES_MAX_BYTES,
    MsgType.START_STOP: 1 + 255,
    MsgType.NOTIFY_ERROR: NOTIFY_ERROR_MAX_BYTES,
}
GUEST_TO_HOST_LIMITS: dict[int, int] = {
    MsgType.CAPABILITIES: CAPABILITIES_MAX_BYTES,
    MsgType.FORMAT: FORMAT.size,
    MsgType.DATA: DATA_MAX_BYTES,
    MsgType.CURSOR_SET: CURSOR_SET_MAX_BYTES,
    MsgType.CURSOR_MOVE: CURSOR_MOVE.size,
    MsgType.DEVICE_DISPLAY_INFO: DEVICE_DISPLAY_INFO.size + DEVICE_ADDRESS_MAX_BYTES + 1,
    MsgType.QUALITY_INDICATOR: QUALITY_MAX_BYTES,
}


class MessageError(ValueError):
    """A message that does not follow the protocol (raised by builders and decoders)."""


def header(msg_type: int, size: int) -> bytes:
    return HEADER.pack(PROTOCOL_VERSION, 0, msg_type, size)


def encode(msg_type: int, payload: bytes = b"") -> bytes:
    return header(msg_type, len(payload)) + payload


def capabilities(caps: bytes | set[int] = b"") -> bytes:
    """CAPABILITIES with a bitmap, given as bytes or as a set of Capability bit numbers."""
    if not isinstance(caps, bytes | bytearray):
        caps = caps_to_bytes(caps)
    if len(caps) > CAPABILITIES_MAX_BYTES:
        raise MessageError(f"capabilities of {len(caps)} bytes exceed {CAPABILITIES_MAX_BYTES}")
    return encode(MsgType.CAPABILITIES, bytes(caps))


def caps_to_bytes(bits: set[int]) -> bytes:
    if not bits:
        return b""
    out = bytearray(max(bits) // 8 + 1)
    for bit in bits:
        out[bit // 8] |= 1 << (bit % 8)
    return bytes(out)


def has_cap(caps: bytes, bit: int) -> bool:
    return bit // 8 < len(caps) and bool(caps[bit // 8] & (1 << (bit % 8)))


def format_msg(width: int, height: int, codec: int = CODEC_MJPEG) -> bytes:
    if not (0 < width <= 0xFFFFFFFF and 0 < height <= 0xFFFFFFFF):
        raise MessageError(f"bad stream size {width}x{height}")
    return encode(MsgType.FORMAT, FORMAT.pack(width, height, codec))


def data_header(size: int) -> bytes:
    """Header of a DATA message; the frame's bytes follow it (sent separately to avoid a copy)."""
    if not 0 < size <= DATA_MAX_BYTES:
        raise MessageError(f"frame of {size} bytes is outside 1..{DATA_MAX_BYTES}")
    return header(MsgType.DATA, size)


def cursor_set(
    width: int,
    height: int,
    hot_x: int,
    hot_y: int,
    pixels: bytes,
    cursor_type: int = CursorType.ALPHA,
) -> bytes:
    if not (0 < width <= CURSOR_MAX_SIDE and 0 < height <= CURSOR_MAX_SIDE):
        raise MessageError(f"cursor {width}x{height} exceeds {CURSOR_MAX_SIDE}x{CURSOR_MAX_SIDE}")
    if cursor_type not in CURSOR_BITS:
        raise MessageError(f"cursor type {cursor_type} is not one the stream device accepts")
    expected = cursor_data_size(width, height, cursor_type)
    if len(pixels) != expected:
        raise MessageError(f"cursor data is {len(pixels)} bytes, expected {expected}")
    hot_x = min(max(hot_x, 0), width - 1)
    hot_y = min(max(hot_y, 0), height - 1)
    return encode(
        MsgType.CURSOR_SET, CURSOR_SET_HEADER.pack(width, height, hot_x, hot_y, cursor_type) + pixels
    )


def cursor_data_size(width: int, height: int, cursor_type: int) -> int:
    """Bytes the host needs after a CURSOR_SET's header: its pixels and, for COLOR24/COLOR32,
    their mask, counted as libspice-server does (bits per pixel times pixels, rounded up to a
    byte)."""
    return (width * height * CURSOR_BITS[CursorType(cursor_type)] + 7) // 8


def cursor_move(x: int, y: int) -> bytes:
    return encode(MsgType.CURSOR_MOVE, CURSOR_MOVE.pack(x, y))


def device_display_info(stream_id: int, display_id: int, address: str) -> bytes:
    raw = address.encode() + b"\0"
    if len(raw) > DEVICE_ADDRESS_MAX_BYTES + 1:
        raise MessageError(f"device address of {len(raw)} bytes is too long")
    return encode(
        MsgType.DEVICE_DISPLAY_INFO, DEVICE_DISPLAY_INFO.pack(stream_id, display_id, len(raw)) + raw
    )


def quality_indicator(text: str) -> bytes:
    raw = text.encode() + b"\0"
    if len(raw) > QUALITY_MAX_BYTES:
        raise MessageError("quality indicator text is too long")
    return encode(MsgType.QUALITY_INDICATOR, raw)


def start_stop(codecs: list[int] | tuple[int, ...]) -> bytes:
    """Host side: ask the guest to start (codecs) or stop (no codecs). Used by test peers."""
    if len(codecs) > 255:
        raise MessageError("at most 255 codecs")
    return encode(MsgType.START_STOP, bytes([len(codecs), *codecs]))


def notify_error(code: int, text: str) -> bytes:
    """Host side: report an error to the guest. Used by test peers."""
    return encode(MsgType.NOTIFY_ERROR, NOTIFY_ERROR.pack(code) + text.encode())


# --- decoding -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    type: int
    # bytes, or for a large message the parser's own buffer (a bytearray) handed on uncopied.
    payload: bytes | bytearray
    # A frame the service assembled from a worker's parts (payload is then empty): it knows its
    # size and its start, and gives its parts only when the port writer takes it.
    frame: Frame | None = None
    # A video codec's delta frame (a DATA that needs the frames before it): written after them
    # or not at all.
    delta: bool = False

    @property
    def size(self) -> int:
        return len(self.payload) if self.frame is None else self.frame.size

    def head(self, n: int) -> bytes:
        """The payload's first n bytes (fewer if it is shorter)."""
        return bytes(self.payload[:n]) if self.frame is None else self.frame.head[:n]


class Frame(Protocol):
    """A frame held in parts elsewhere (frameparts.Assembler), handed on without a copy."""

    size: int
    head: bytes  # its first bytes (at least two, the JPEG's SOI, when it has them)

    def take(self) -> tuple[bytes, ...] | None:
        """Its parts, or None if the holder has moved on to another frame since (thread-safe)."""

    def joined(self, prefix: bytes = b"") -> bytes | None:
        """`prefix` and its parts in one piece, or None as take() (thread-safe)."""


@dataclass(frozen=True)
class Violation:
    """Input that broke the protocol; `discarded` bytes were dropped to get back in step.
    `skipped_type`: a well-formed message of that type, skipped whole for its size."""

    reason: str
    discarded: int
    skipped_type: int | None = None


@dataclass(frozen=True)
class StartStop:
    codecs: tuple[int, ...]


@dataclass(frozen=True)
class NotifyError:
    code: int
    text: str


@dataclass(frozen=True)
class Format:
    width: int
    height: int
    codec: int


@dataclass(frozen=True)
class CursorSet:
    width: int
    height: int
    hot_x: int
    hot_y: int
    type: int
    data: bytes


def decode_start_stop(payload: bytes) -> StartStop:
    if not payload or len(payload) != 1 + payload[0]:
        raise MessageError(f"START_STOP of {len(payload)} bytes does not match its codec count")
    return StartStop(tuple(payload[1:]))


def decode_notify_error(payload: bytes) -> NotifyError:
    if len(payload) < NOTIFY_ERROR.size:
        raise MessageError(f"NOTIFY_ERROR of {len(payload)} bytes is shorter than its code")
    (code,) = NOTIFY_ERROR.unpack_from(payload)
    text = payload[NOTIFY_ERROR.size :].split(b"\0", 1)[0].decode("utf-8", "replace")
    return NotifyError(code, text)


def decode_format(payload: bytes) -> Format:
    if len(payload) != FORMAT.size:
        raise MessageError(f"FORMAT must be {FORMAT.size} bytes, got {len(payload)}")
    return Format(*FORMAT.unpack(payload))


def decode_cursor_set(payload: bytes) -> CursorSet:
    """A CURSOR_SET in the forms the host accepts (see CURSOR_BITS), except that a side of 0,
    which the host takes and no client can draw, is refused too; `data` is what the host uses."""
    if not CURSOR_SET_HEADER.size <= len(payload) <= CURSOR_SET_MAX_BYTES:
        raise MessageError(f"CURSOR_SET of {len(payload)} bytes outside "
                           f"{CURSOR_SET_HEADER.size}..{CURSOR_SET_MAX_BYTES}")
    w, h, hx, hy, ctype = CURSOR_SET_HEADER.unpack_from(payload)
    if not (0 < w <= CURSOR_MAX_SIDE and 0 < h <= CURSOR_MAX_SIDE):
        raise MessageError(f"cursor {w}x{h} outside 1..{CURSOR_MAX_SIDE}")
    if ctype not in CURSOR_BITS:
        raise MessageError(f"cursor type {ctype} not allowed")
    need = cursor_data_size(w, h, ctype)
    if len(payload) - CURSOR_SET_HEADER.size < need:
        raise MessageError(f"cursor data {len(payload) - CURSOR_SET_HEADER.size} bytes, "
                           f"the host needs {need}")
    start = CURSOR_SET_HEADER.size
    return CursorSet(w, h, hx, hy, ctype, bytes(payload[start : start + need]))


class Parser:
    """Splits a byte stream into messages without ever buffering more than one bounded message.

    Garbage (bad version, padding, unknown type, oversized message) yields one Violation per run of bad
    bytes; the parser then looks for the next plausible header with bytes.find on the version byte
    (checking each candidate whole), so one corrupted message does not cost the rest of the stream and
    a stream of noise costs a search, not a Python step per byte. With `skip_oversized` a well-formed
    header of a known type whose size is past its limit is skipped whole instead (one Violation; its
    bytes are dropped as they come, never buffered): a peer that frames its messages correctly, as the
    worker does, stays in step.

    A read is handed over with push() and taken a message at a time with next(), so that whoever
    reads can stop between two messages (a budget per wake-up) and change a limit (set_limit) before
    the next header is judged; feed() does both for a whole read.
    """

    def __init__(self, limits: dict[int, int] | None = None, *, skip_oversized: bool = False) -> None:
        self._limits = dict(HOST_TO_GUEST_LIMITS if limits is None else limits)
        self._skip_oversized = skip_oversized
        self._buf = bytearray()
        self._in: bytes | bytearray = b""  # the read being parsed, from _pos
        self._pos = 0
        self._skip = 0  # bytes of a skipped message still to come
        self._discarding = 0  # bytes dropped in the current garbage run
        self._reason = ""

    @property
    def buffered(self) -> int:
        """Bytes held: the message begun, and the part of the last read not parsed yet."""
        return len(self._buf) + len(self._in) - self._pos

    @property
    def pending(self) -> bool:
        """Whether the last read is not wholly parsed yet (next() has more to say)."""
        return self._pos < len(self._in)

    @property
    def needed(self) -> int:
        """Bytes that complete what is in hand (a header, a message, a skip): reading no more than
        this never takes in the start of the next message."""
        return self._skip or self._need() or HEADER_SIZE

    @property
    def max_buffer(self) -> int:
        return HEADER_SIZE + max(self._limits.values())

    def set_limit(self, msg_type: int, size: int) -> None:
        """From the next header on, a message of this type may carry at most `size` bytes."""
        self._limits[msg_type] = size

    def _header_problem(self, version: int, padding: int, msg_type: int, size: int) -> str | None:
        if version != PROTOCOL_VERSION:
            return f"protocol version {version}, expected {PROTOCOL_VERSION}"
        if padding != 0:
            return f"header padding {padding}, expected 0"
        limit = self._limits.get(msg_type)
        if limit is None:
            return f"unexpected message type {msg_type}"
        if size > limit:
            return f"message type {msg_type} of {size} bytes exceeds {limit}"
        return None

    def push(self, data: bytes | bytearray) -> None:
        """Hand over a read; next() parses it. The previous one must have been wholly parsed."""
        if self.pending:
            raise RuntimeError("push() before the previous read was parsed")
        self._in = data if isinstance(data, bytes | bytearray) else bytes(data)
        self._pos = 0

    def feed(self, data: bytes) -> list[Message | Violation]:
        self.push(data)
        out: list[Message | Violation] = []
        while (item := self.next()) is not None:
            out.append(item)
        return out

    def next(self) -> Message | Violation | None:
        """The next message (or Violation) of the reads pushed so far; None when more input is
        needed. A garbage run is reported when a read runs out, so a peer that goes quiet cannot
        hide it."""
        data, end = self._in, len(self._in)
        while True:
            if self._skip:
                n = min(self._skip, end - self._pos)
                self._skip -= n
                self._pos += n
                if self._skip:
                    break
            if not self._buf and end - self._pos >= HEADER_SIZE:
                # A whole message in the read is taken straight from it: one copy, no buffer.
                version, padding, msg_type, size = HEADER.unpack_from(data, self._pos)
                start = self._pos + HEADER_SIZE
                if end - start >= size and \
                        self._header_problem(version, padding, msg_type, size) is None:
                    if self._discarding:
                        return self._violation()
                    self._pos = start + size
                    return Message(msg_type, bytes(data[start : start + size]))
            # Only take in what can complete the message in hand, so the buffer stays bounded.
            need = self._need()
            if need > 0:
                if self._pos >= end:
                    break
                take = min(need, end - self._pos)
                with memoryview(data) as view:
                    self._buf += view[self._pos : self._pos + take]
                self._pos += take
                continue
            version, padding, msg_type, size = HEADER.unpack_from(self._buf)
            problem = self._header_problem(version, padding, msg_type, size)
            if problem is None:
                if self._discarding:
                    return self._violation()
                return self._take(msg_type, size)
            if (self._skip_oversized and version == PROTOCOL_VERSION and padding == 0
                    and msg_type in self._limits):
                if self._discarding:
                    return self._violation()
                self._buf.clear()
                self._skip = size
                return Violation(problem, HEADER_SIZE + size, msg_type)
            # A bad header: drop its first byte and go to the next version byte, first among the
            # (at most 7) bytes still buffered, then in the input itself.
            if not self._discarding:
                self._reason = problem
            nxt = self._buf.find(_VERSION_BYTE, 1)
            if nxt > 0:
                self._discarding += nxt
                del self._buf[:nxt]
                continue
            self._discarding += len(self._buf)
            self._buf.clear()
            nxt = data.find(_VERSION_BYTE, self._pos)
            if nxt < 0:
                self._discarding += end - self._pos
                self._pos = end
                break
            self._discarding += nxt - self._pos
            self._pos = nxt
        return self._violation() if self._discarding else None

    def drop(self) -> None:
        """Forget what is held and stay in step: the rest of the read is parsed and thrown away,
        and the rest of a message begun is skipped as it comes instead of being buffered."""
        while self.next() is not None:
            pass
        if len(self._buf) >= HEADER_SIZE:
            self._skip = self._need()
            self._buf = bytearray()

    def _need(self) -> int:
        if len(self._buf) < HEADER_SIZE:
            return HEADER_SIZE - len(self._buf)
        version, padding, msg_type, size = HEADER.unpack_from(self._buf)
        if self._header_problem(version, padding, msg_type, size) is not None:
            return 0
        return HEADER_SIZE + size - len(self._buf)

    def _take(self, msg_type: int, size: int) -> Message:
        """The whole message in the buffer, which then starts empty."""
        buf = self._buf
        if size >= HANDOVER_BYTES:
            # A frame is not copied again: the buffer itself becomes the payload (dropping the
            # header from a bytearray's front only moves its start).
            self._buf = bytearray()
            del buf[:HEADER_SIZE]
            return Message(msg_type, buf)
        with memoryview(buf) as view:
            payload = bytes(view[HEADER_SIZE : HEADER_SIZE + size])
        buf.clear()
        return Message(msg_type, payload)

    def _violation(self) -> Violation:
        violation = Violation(self._reason, self._discarding)
        self._discarding = 0
        return violation
