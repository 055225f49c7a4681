"""Which worker messages may reach the host: the types a guest sends, in the form the host accepts."""

from __future__ import annotations

from spice_stream_worker import frameparts
from spice_stream_worker import protocol as p

# The parser already bounds each type's size (GUEST_TO_HOST_LIMITS) and refuses host-only types.
MAX_SIDE = 16384  # libspice-server's own limit on a stream's width and height
JPEG_SOI = b"\xff\xd8"


def refusal(msg: p.Message, host_caps: bytes | None, format_sent: bool) -> str | None:
    """Why `msg` from a worker must not be written to the port, or None when it may.

    The worker runs as the session's user, who controls it: anything the host would reject
    (and then ignore the port until it is reopened) is stopped here instead."""
    try:
        if msg.type == p.MsgType.FORMAT:
            fmt = p.decode_format(msg.payload)
            if not (0 < fmt.width <= MAX_SIDE and 0 < fmt.height <= MAX_SIDE):
                return f"FORMAT {fmt.width}x{fmt.height} outside 1..{MAX_SIDE}"
            if fmt.codec != p.CODEC_MJPEG:
                return f"FORMAT with codec {fmt.codec}: only MJPEG is streamed"
        elif msg.type == p.MsgType.DATA:
            if not format_sent:
                return "DATA before any FORMAT"
            if not frameparts.starts_with(msg.body(), JPEG_SOI):
                return "DATA that is not a JPEG"
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


def _display_info_refusal(payload: bytes) -> str | None:
    if len(payload) < p.DEVICE_DISPLAY_INFO.size:
        return "DEVICE_DISPLAY_INFO shorter than its header"
    _, _, length = p.DEVICE_DISPLAY_INFO.unpack_from(payload)
    address = payload[p.DEVICE_DISPLAY_INFO.size:]
    if length != len(address) or not address.endswith(b"\0"):
        return "DEVICE_DISPLAY_INFO address length does not match"
    return None
