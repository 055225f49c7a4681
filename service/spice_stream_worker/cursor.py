"""The pointer's cursor image, read with XFixes and laid out as SPICE's ALPHA cursor wants it."""

from __future__ import annotations

import array
import sys
from dataclasses import dataclass

MAX_CURSOR_SIDE = 1024


@dataclass
class CursorImage:
    """A cursor in SPICE_CURSOR_TYPE_ALPHA layout: width*height pixels of B,G,R,A bytes."""

    width: int
    height: int
    hot_x: int
    hot_y: int
    argb: bytes


def cursor_from_pixels(
    width: int, height: int, hot_x: int, hot_y: int, pixels
) -> CursorImage | None:
    """Build a CursorImage from 32-bit ARGB values (a sequence of ints, row-major).

    Cursors larger than MAX_CURSOR_SIDE are cropped to a window that keeps the hotspot inside.
    """
    if width <= 0 or height <= 0 or len(pixels) < width * height:
        return None
    words = array.array("I", pixels[: width * height])
    if sys.byteorder != "little":
        words.byteswap()
    data = words.tobytes()
    hot_x = min(max(hot_x, 0), width - 1)
    hot_y = min(max(hot_y, 0), height - 1)
    if width <= MAX_CURSOR_SIDE and height <= MAX_CURSOR_SIDE:
        return CursorImage(width, height, hot_x, hot_y, data)
    x0 = max(0, hot_x - (MAX_CURSOR_SIDE - 1))
    y0 = max(0, hot_y - (MAX_CURSOR_SIDE - 1))
    new_w = min(MAX_CURSOR_SIDE, width - x0)
    new_h = min(MAX_CURSOR_SIDE, height - y0)
    stride = width * 4
    rows = [data[(y0 + r) * stride + x0 * 4 : (y0 + r) * stride + (x0 + new_w) * 4]
            for r in range(new_h)]
    return CursorImage(new_w, new_h, hot_x - x0, hot_y - y0, b"".join(rows))


def read_cursor(display) -> CursorImage | None:
    """The current cursor via XFixes GetCursorImage; None if the server gives an empty one.

    Needs XFixes version negotiated on this connection (Screen does that at setup).
    """
    reply = display.xfixes_get_cursor_image(None)
    return cursor_from_pixels(
        reply.width, reply.height, reply.xhot, reply.yhot, reply.cursor_image
    )
