"""What really changed: damage made into a few aligned captures, then checked pixel by pixel.

XDamage reports what was drawn, not what changed: an application that redraws a window the
same, or the X server's own cursor handling, reports damage with no new pixels. Comparing the
captured pixels with the framebuffer turns that into no encode at all.
"""

from __future__ import annotations

from .geometry import Grid, Rect, areas, bounding, spans

ALIGN = 16  # captures cover whole MCUs: the encoder never needs a pixel outside them
CHUNK_PX = 64  # across a changed band, the changed span is found to this many pixels
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


def refresh(fb: memoryview, stride: int, rect: Rect, new: bytes | memoryview, new_stride: int) -> list[Rect]:
    """Copy the captured `new` pixels of `rect` into the framebuffer `fb`; return the parts that
    differ from what it held: per band of ALIGN rows, the span of CHUNK_PX columns that changed."""
    src = memoryview(new).cast("B")
    row_bytes = rect.width * 4
    chunk = CHUNK_PX * 4
    changed: list[Rect] = []
    bottom = rect.y + rect.height
    for band in range(rect.y, bottom, ALIGN):
        rows: list[tuple[bytes, bytes]] = []
        for y in range(band, min(band + ALIGN, bottom)):
            at = y * stride + rect.x * 4
            old_row = fb[at:at + row_bytes].tobytes()
            new_row = src[(y - rect.y) * new_stride:(y - rect.y) * new_stride + row_bytes].tobytes()
            if old_row != new_row:
                rows.append((old_row, new_row))
                fb[at:at + row_bytes] = new_row
        if not rows:
            continue
        starts = range(0, row_bytes, chunk)
        first = next(s for s in starts if any(o[s:s + chunk] != n[s:s + chunk] for o, n in rows))
        last = next(s for s in reversed(starts)
                    if any(o[s:s + chunk] != n[s:s + chunk] for o, n in rows))
        x0 = rect.x + first // 4
        x1 = rect.x + min(last + chunk, row_bytes) // 4
        changed.append(Rect(x0, band, x1 - x0, min(band + ALIGN, bottom) - band))
    return changed
