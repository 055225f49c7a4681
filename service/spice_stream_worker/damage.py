"""What really changed: damage made into a few aligned captures, then checked pixel by pixel.

XDamage reports what was drawn, not what changed: an application that redraws a window the
same, or the X server's own cursor handling, reports damage with no new pixels. Comparing the
captured pixels with the framebuffer turns that into no encode at all.
"""

from __future__ import annotations

from .geometry import Grid, Rect, areas, bounding, spans

ALIGN = 16  # captures cover whole MCUs: the encoder never needs a pixel outside them
MAX_CAPTURES = 16  # each capture is one X round trip
# Damage larger than this share of the screen is captured as whole rows straight into the
# framebuffer, unchecked: a compare costs about a third of an encode, and a change that large
# is rarely false.
COMPARE_MAX_SHARE = 0.35


def plan(rects: list[Rect], width: int, height: int) -> list[Rect] | None:
    """The MCU-aligned rectangles to capture and compare for this damage (at most MAX_CAPTURES),
    or None when the damage is too large to be worth comparing."""
    if sum(r.width * r.height for r in rects) > COMPARE_MAX_SHARE * width * height:
        return None
    aligned = list(dict.fromkeys(a for r in rects if (a := _aligned(r, width, height))))
    if len(aligned) <= MAX_CAPTURES and not _any_overlap(aligned):
        return aligned  # the common case, one window or one spot: no cell bookkeeping
    grid = Grid(width, height, ALIGN, ALIGN)
    cells = grid.cells(rects)
    if not cells:
        return []
    todo = areas(cells)
    if len(todo) > MAX_CAPTURES:
        todo = areas(spans(cells))
    out = [grid.rect(a) for a in todo]
    if len(out) > MAX_CAPTURES:
        out = [bounding(out)]
    if sum(r.width * r.height for r in out) > COMPARE_MAX_SHARE * width * height:
        return None
    return out


def _aligned(r: Rect, width: int, height: int) -> Rect | None:
    """r grown to whole MCUs and clipped to the screen."""
    x0, y0 = r.x // ALIGN * ALIGN, r.y // ALIGN * ALIGN
    x1, y1 = -(-(r.x + r.width) // ALIGN) * ALIGN, -(-(r.y + r.height) // ALIGN) * ALIGN
    return Rect(x0, y0, x1 - x0, y1 - y0).clip(width, height)


def _any_overlap(rects: list[Rect]) -> bool:
    return any(a.overlaps(b) for i, a in enumerate(rects) for b in rects[i + 1:])


def refresh(fb: memoryview, stride: int, rect: Rect, new: bytes | memoryview,
            new_stride: int) -> list[Rect]:
    """Copy the captured `new` pixels of `rect` into the framebuffer `fb`; return the parts that
    differ from what it held: each band of ALIGN rows in which some row changed, rect-wide.

    Rows, not columns: a row compares at memcmp speed, while finding the changed columns would
    cost a Python step per piece of each row (measured: more than the encode it saves). A band's
    rows are compared only up to the first that differs: the rest are copied unread, since the
    band is changed either way (a real change then costs one compare per band, not sixteen)."""
    src = memoryview(new).cast("B")
    row_bytes = rect.width * 4
    changed: list[Rect] = []
    bottom = rect.y + rect.height
    for band in range(rect.y, bottom, ALIGN):
        end = min(band + ALIGN, bottom)
        at = band * stride + rect.x * 4
        off = (band - rect.y) * new_stride
        y = band
        while y < end and fb[at:at + row_bytes].tobytes() == src[off:off + row_bytes].tobytes():
            y, at, off = y + 1, at + stride, off + new_stride
        if y == end:
            continue  # the same pixels: nothing to copy, nothing changed
        for _ in range(end - y):  # from the first changed row on
            fb[at:at + row_bytes] = src[off:off + row_bytes]
            at += stride
            off += new_stride
        changed.append(Rect(rect.x, band, rect.width, end - band))
    return changed
