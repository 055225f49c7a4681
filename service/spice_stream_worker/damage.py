"""What really changed: damage made into a few aligned captures, then checked pixel by pixel.

XDamage reports what was drawn, not what changed: an application that redraws a window the
same, or the X server's own cursor handling, reports damage with no new pixels. Comparing the
captured pixels with the framebuffer turns that into no encode at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

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


# The pixel compare: bands of damage.ALIGN rows, each compared whole first (one memcmp), then the
# changed ones tile by tile, tiles as wide as the encoder's widest (8 MCUs).
TILE_WIDTH = 128
# Past this share of changed bands the tiles are not looked at: the changed bands go whole.
REFINE_MAX_SHARE = 0.35


def compare_frames(fb: bytearray, new: bytes, width: int, height: int) -> list[Rect]:
    """Bring `fb` (the previous frame) to `new` and return what differed, as rectangles of whole
    bands (ALIGN rows) and tiles (TILE_WIDTH columns) merged where they touch.

    Each band is compared whole first (memcmp speed); only the bands that differ are looked at
    tile by tile, with refresh, the compare the X11 path uses."""
    stride = width * 4
    band = ALIGN
    changed_bands = []
    whole = memoryview(new)
    for y in range(0, height, band):
        a, b = y * stride, min(y + band, height) * stride
        # startswith on a view: one memcmp, where slicing both sides copied each band twice.
        if not fb.startswith(whole[a:b], a):
            changed_bands.append(y)
    whole.release()
    if not changed_bands:
        return []
    grid = Grid(width, height, TILE_WIDTH, band)
    if len(changed_bands) > REFINE_MAX_SHARE * grid.rows:
        fb[:] = new
        cells = {y // band: list(range(grid.columns)) for y in changed_bands}
        return [grid.rect(a) for a in areas(cells)]
    src, view = memoryview(new), memoryview(fb)
    cells = {}
    for y in changed_bands:
        rows = min(band, height - y)
        for column in range(grid.columns):
            x = column * TILE_WIDTH
            tile = Rect(x, y, min(TILE_WIDTH, width - x), rows)
            if refresh(view, stride, tile, src[y * stride + x * 4:], stride):
                cells.setdefault(y // band, []).append(column)
    return [grid.rect(a) for a in areas(cells)]


def compare_bands(fb: bytearray, read: Callable[[int, int], bytes], width: int, height: int,
                  bands: Iterable[int]) -> list[Rect]:
    """compare_frames for some bands only (their first rows, multiples of ALIGN), where reading
    the new pixels costs (a framebuffer mapped from the kernel): `read(y, rows)` gives rows y to
    y + rows - 1, packed. Each band is read once, compared whole against `fb` without copying it,
    then tile by tile if it differs; `fb` is brought up to date."""
    stride = width * 4
    grid = Grid(width, height, TILE_WIDTH, ALIGN)
    view = memoryview(fb)
    cells: dict[int, list[int]] = {}
    for y in sorted(set(bands)):
        rows = min(ALIGN, height - y)
        if rows <= 0:
            continue
        new = read(y, rows)
        if fb.startswith(new, y * stride):
            continue
        src = memoryview(new)
        for column in range(grid.columns):
            x = column * TILE_WIDTH
            tile = Rect(x, y, min(TILE_WIDTH, width - x), rows)
            if refresh(view, stride, tile, src[x * 4:], stride):
                cells.setdefault(y // ALIGN, []).append(column)
    return [grid.rect(a) for a in areas(cells)]
