"""The SPICE stream-device protocol, version 1: message layouts, builders and a bounded incremental parser.

The authoritative layout is spice/stream-device.h (Debian libspice-protocol-dev); the size rules below follow
what libspice-server checks on the host side, so a message we build is one the host accepts.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

PROTOCOL_VERSION = 1

HEADER = struct.Struct("<BBHI")  # protocol_version, padding, type, size
HEADER_SIZE = HEADER.size

CODEC_MJPEG = 1  # SpiceVideoCodecType
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
NOTIFY_ERROR_MAX_BYTES = 64 * 1024
DEVICE_ADDRESS_MAX_BYTES = 255
QUALITY_MAX_BYTES = 256

FORMAT = struct.Struct("<IIB3x")
CURSOR_SET_HEADER = struct.Struct("<HHHHB3x")
CURSOR_MOVE = struct.Struct("<ii")
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
    MsgType.CURSOR_SET: CURSOR_SET_HEADER.size + CURSOR_MAX_SIDE * CURSOR_MAX_SIDE * 4,
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
    if cursor_type not in (CursorType.ALPHA, CursorType.COLOR32, CursorType.COLOR24):
        raise MessageError(f"cursor type {cursor_type} is not one the stream device accepts")
    bpp = 3 if cursor_type == CursorType.COLOR24 else 4
    if len(pixels) != width * height * bpp:
        raise MessageError(f"cursor data is {len(pixels)} bytes, expected {width * height * bpp}")
    hot_x = min(max(hot_x, 0), width - 1)
    hot_y = min(max(hot_y, 0), height - 1)
    return encode(
        MsgType.CURSOR_SET, CURSOR_SET_HEADER.pack(width, height, hot_x, hot_y, cursor_type) + pixels
    )


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
    payload: bytes
    # A frame the service assembled from a worker's parts: its payload is these, in order, never
    # joined (payload is then empty); whoever writes the message writes them.
    pieces: tuple[bytes, ...] | None = None

    def body(self) -> tuple[bytes, ...]:
        """The payload as the pieces to write."""
        return (self.payload,) if self.pieces is None else self.pieces


@dataclass(frozen=True)
class Violation:
    """Input that broke the protocol; `discarded` bytes were dropped to get back in step."""

    reason: str
    discarded: int


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
    if len(payload) < CURSOR_SET_HEADER.size:
        raise MessageError("CURSOR_SET shorter than its header")
    w, h, hx, hy, ctype = CURSOR_SET_HEADER.unpack_from(payload)
    data = payload[CURSOR_SET_HEADER.size :]
    if not (0 < w <= CURSOR_MAX_SIDE and 0 < h <= CURSOR_MAX_SIDE):
        raise MessageError(f"cursor {w}x{h} outside 1..{CURSOR_MAX_SIDE}")
    if ctype not in (CursorType.ALPHA, CursorType.COLOR24, CursorType.COLOR32):
        raise MessageError(f"cursor type {ctype} not allowed")
    bpp = 3 if ctype == CursorType.COLOR24 else 4
    if len(data) != w * h * bpp:
        raise MessageError(f"cursor data {len(data)} bytes, expected {w * h * bpp}")
    return CursorSet(w, h, hx, hy, ctype, data)


class Parser:
    """Splits a byte stream into messages without ever buffering more than one bounded message.

    Garbage (bad version, padding, unknown type, oversized message) yields one Violation per run of bad
    bytes; the parser then looks for the next plausible header with bytes.find on the version byte
    (checking each candidate whole), so one corrupted message does not cost the rest of the stream and
    a stream of noise costs a search, not a Python step per byte.
    """

    def __init__(self, limits: dict[int, int] | None = None) -> None:
        self._limits = HOST_TO_GUEST_LIMITS if limits is None else limits
        self._buf = bytearray()
        self._discarding = 0  # bytes dropped in the current garbage run
        self._reason = ""

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def max_buffer(self) -> int:
        return HEADER_SIZE + max(self._limits.values())

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

    def feed(self, data: bytes) -> list[Message | Violation]:
        out: list[Message | Violation] = []
        if not isinstance(data, bytes | bytearray):
            data = bytes(data)
        view = memoryview(data)
        pos = 0
        end = len(data)
        while True:
            # Only take in what can complete the message in hand, so the buffer stays bounded.
            need = self._need()
            if need > 0:
                if pos >= end:
                    break
                take = min(need, end - pos)
                self._buf += view[pos : pos + take]
                pos += take
                continue
            if self._step(out):
                continue
            # A bad header: drop its first byte and go to the next version byte, first among the
            # (at most 7) bytes still buffered, then in the input itself.
            nxt = self._buf.find(_VERSION_BYTE, 1)
            if nxt > 0:
                self._discarding += nxt
                del self._buf[:nxt]
                continue
            self._discarding += len(self._buf)
            self._buf.clear()
            nxt = data.find(_VERSION_BYTE, pos)
            if nxt < 0:
                self._discarding += end - pos
                pos = end
                break
            self._discarding += nxt - pos
            pos = nxt
        # A garbage run is reported at the end of each read, so a host that goes quiet cannot hide it.
        self._flush_violation(out)
        return out

    def _need(self) -> int:
        if len(self._buf) < HEADER_SIZE:
            return HEADER_SIZE - len(self._buf)
        version, padding, msg_type, size = HEADER.unpack_from(self._buf)
        if self._header_problem(version, padding, msg_type, size) is not None:
            return 0
        return HEADER_SIZE + size - len(self._buf)

    def _step(self, out: list[Message | Violation]) -> bool:
        """Emits the whole message in the buffer; False (nothing taken) if its header is bad."""
        version, padding, msg_type, size = HEADER.unpack_from(self._buf)
        problem = self._header_problem(version, padding, msg_type, size)
        if problem is not None:
            if not self._discarding:
                self._reason = problem
            return False
        self._flush_violation(out)
        with memoryview(self._buf) as buf:  # one copy, not a bytearray slice and then bytes
            out.append(Message(msg_type, bytes(buf[HEADER_SIZE : HEADER_SIZE + size])))
        del self._buf[: HEADER_SIZE + size]
        return True

    def _flush_violation(self, out: list[Message | Violation]) -> None:
        if self._discarding:
            out.append(Violation(self._reason, self._discarding))
            self._discarding = 0
