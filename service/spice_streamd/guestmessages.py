"""Which worker messages may reach the host: the types a guest sends, in the form the host accepts."""

from __future__ import annotations

from spice_stream_common import protocol as p

# The parser already bounds each type's size (GUEST_TO_HOST_LIMITS) and refuses host-only types.
MAX_SIDE = 16384  # libspice-server's own limit on a stream's width and height
JPEG_SOI = b"\xff\xd8"
# A frame's bound from its FORMAT, after libjpeg-turbo's tj3JPEGBufSize() (src/turbojpeg.c, 3.x;
# tjBufSize() in 2.1): PAD(w, mcuw) * PAD(h, mcuh) * (2 + chromasf) + 2048 bytes for a baseline
# JPEG of w x h, where chromasf is 4 at 4:4:4 (8x8 MCUs) and less for every other subsampling.
# Padding both sides to 16 with the 4:4:4 factor covers them all (the worker encodes 4:2:0).
# Added: a restart marker after every MCU (2 bytes, and a byte of padding before it), counted at
# 8x8 MCUs, and headers beyond libjpeg's own (one marker segment's largest size).
BOUND_PAD = 16
BOUND_BYTES_PER_PIXEL = 6
BOUND_FIXED = 2048
BOUND_PER_MCU = 3
BOUND_HEADERS = 65_537


def frame_limit(width: int, height: int) -> int:
    """The most bytes a JPEG frame of this FORMAT can take, at most the protocol's DATA limit."""
    w = -(-width // BOUND_PAD) * BOUND_PAD
    h = -(-height // BOUND_PAD) * BOUND_PAD
    bound = (w * h * BOUND_BYTES_PER_PIXEL + BOUND_FIXED + (w // 8) * (h // 8) * BOUND_PER_MCU
             + BOUND_HEADERS)
    return min(bound, p.DATA_MAX_BYTES)


def refusal(msg: p.Message, host_caps: bytes | None, format_sent: bool,
            codec: int = p.CODEC_MJPEG, host_codecs: tuple[int, ...] | None = None) -> str | None:
    """Why `msg` from a worker must not be written to the port, or None when it may. `codec` is
    the stream's, from the FORMAT relayed last; `host_codecs` the host's last offer.

    The worker runs as the session's user, who controls it: anything the host would reject
    (and then ignore the port until it is reopened) is stopped here instead."""
    try:
        if msg.type == p.MsgType.FORMAT:
            fmt = p.decode_format(msg.payload)
            if not (0 < fmt.width <= MAX_SIDE and 0 < fmt.height <= MAX_SIDE):
                return f"FORMAT {fmt.width}x{fmt.height} outside 1..{MAX_SIDE}"
            if fmt.codec not in FRAME_CHECKS:
                return f"FORMAT with codec {fmt.codec}: not one this service streams"
            if fmt.codec != p.CODEC_MJPEG and host_codecs is not None and fmt.codec not in host_codecs:
                return f"FORMAT with codec {fmt.codec}, which the host does not offer"
        elif msg.type == p.MsgType.DATA:
            if not format_sent:
                return "DATA before any FORMAT"
            if msg.delta and codec == p.CODEC_MJPEG:
                return "a delta frame in an MJPEG stream"
            if msg.frame is not None and codec != p.CODEC_MJPEG:
                # Parts are JPEG's (latest wins, held in place): a video frame comes whole.
                return "frame parts in a stream that is not MJPEG"
            name, check = FRAME_CHECKS[codec]
            if not check(msg.head(HEAD_BYTES)):
                return f"DATA that is not {name}"
        elif msg.type == p.MsgType.CURSOR_SET:
            p.decode_cursor_set(msg.payload)
        elif msg.type == p.MsgType.CURSOR_MOVE:
            if len(msg.payload) != p.CURSOR_MOVE.size:
                return f"CURSOR_MOVE of {len(msg.payload)} bytes"
        elif msg.type == p.MsgType.DEVICE_DISPLAY_INFO:
            return _display_info_refusal(msg.payload)
        elif msg.type == p.MsgType.QUALITY_INDICATOR:
            if not (host_caps and p.has_cap(host_caps, p.Capability.QUALITY_INDICATOR)):
                return "QUALITY_INDICATOR the host did not offer"
        elif msg.type != p.MsgType.CAPABILITIES:
            return f"message type {msg.type} is not one a guest sends"
    except p.MessageError as exc:
        return str(exc)
    return None


def _h264(head: bytes) -> bool:
    """Annex-B: an access unit starts with a start code."""
    return head.startswith((b"\x00\x00\x01", b"\x00\x00\x00\x01"))


def _vp8(head: bytes) -> bool:
    """RFC 6386 9.1: a frame tag of version 0-3; a keyframe's start code after it."""
    if len(head) < 3 or (head[0] >> 1) & 0x07 > 3:
        return False
    return bool(head[0] & 1) or head[3:6] == b"\x9d\x01\x2a"


def _vp9(head: bytes) -> bool:
    """VP9 bitstream 6.2: every frame starts with the frame marker, binary 10."""
    return len(head) > 0 and head[0] >> 6 == 0b10


HEAD_BYTES = 6  # what the checks look at of a frame's start
# What a frame of each codec must start with, and the codec's name in a refusal.
FRAME_CHECKS = {
    p.CODEC_MJPEG: ("a JPEG", lambda head: head.startswith(JPEG_SOI)),
    p.CODEC_VP8: ("a VP8 frame", _vp8),
    p.CODEC_H264: ("an H.264 access unit", _h264),
    p.CODEC_VP9: ("a VP9 frame", _vp9),
}


def _display_info_refusal(payload: bytes) -> str | None:
    if len(payload) < p.DEVICE_DISPLAY_INFO.size:
        return "DEVICE_DISPLAY_INFO shorter than its header"
    _, _, length = p.DEVICE_DISPLAY_INFO.unpack_from(payload)
    address = payload[p.DEVICE_DISPLAY_INFO.size:]
    if length != len(address) or not address.endswith(b"\0"):
        return "DEVICE_DISPLAY_INFO address length does not match"
    return None
