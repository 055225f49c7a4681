"""Cells, areas and capture plans: what the encoder and the capture cut the screen into."""

from __future__ import annotations

import random

from spice_stream_worker import damage
from spice_stream_worker.geometry import Grid, Rect, areas, spans


def test_cells_of_rects():
    grid = Grid(100, 100, 16, 16)
    assert grid.cells([Rect(0, 0, 1, 1)]) == {0: [0]}
    assert grid.cells([Rect(15, 15, 2, 2)]) == {0: [0, 1], 1: [0, 1]}
    assert grid.cells([Rect(90, 90, 50, 50)]) == {5: [5, 6], 6: [5, 6]}
    assert grid.cells([Rect(0, 200, 5, 5), Rect(0, 0, 0, 5), Rect(-9, -9, 5, 5)]) == {}
    assert grid.rect((6, 7, 6, 7)) == Rect(96, 96, 4, 4)  # clipped to the screen


def test_areas_cover_exactly_the_cells():
    rng = random.Random(7)
    for _ in range(300):
        cells: dict[int, list[int]] = {}
        for row in rng.sample(range(12), rng.randrange(0, 12)):
            cells[row] = sorted(rng.sample(range(10), rng.randrange(1, 10)))
        for given in (cells, spans(cells)):
            covered = [(r, c) for r0, r1, c0, c1 in areas(given)
                       for r in range(r0, r1) for c in range(c0, c1)]
            assert len(covered) == len(set(covered))  # no cell twice
            assert sorted(covered) == sorted((r, c) for r, cs in given.items() for c in cs)
    # The same run in consecutive rows is one rectangle: one encode, one capture.
    assert areas({3: [1, 2], 4: [1, 2], 5: [1, 2], 7: [1, 2]}) == [(3, 6, 1, 3), (7, 8, 1, 3)]
    assert spans({0: [1, 5]}) == {0: [1, 2, 3, 4, 5]}


def test_capture_plan_is_aligned_bounded_or_none():
    assert damage.plan([], 1920, 1080) == []
    assert damage.plan([Rect(100, 200, 3, 3)], 1920, 1080) == [Rect(96, 192, 16, 16)]
    # Typing: a few glyphs side by side are one capture.
    glyphs = [Rect(400 + 9 * i, 300, 9, 15) for i in range(4)]
    assert damage.plan(glyphs, 1920, 1080) == [Rect(400, 288, 48, 32)]
    # Scattered dots in a window: never more than MAX_CAPTURES round trips.
    dots = [Rect(100 + 37 * i % 600, 100 + 23 * i % 400, 2, 2) for i in range(60)]
    planned = damage.plan(dots, 1920, 1080)
    assert planned is not None and 0 < len(planned) <= damage.MAX_CAPTURES
    for dot in dots:
        assert any(r.x <= dot.x and dot.x + 2 <= r.x + r.width and r.y <= dot.y
                   and dot.y + 2 <= r.y + r.height for r in planned)
    # Most of the screen, or dots all over it: whole rows captured, not compared.
    assert damage.plan([Rect(0, 0, 1920, 800)], 1920, 1080) is None
    assert damage.plan([Rect(37 * i % 1900, 23 * i % 1070, 2, 2) for i in range(200)],
                       1920, 1080) is None


def test_refresh_reports_changed_bands_and_updates_the_framebuffer():
    w, h = 256, 48
    fb = memoryview(bytearray(w * h * 4))
    rect = Rect(0, 0, w, h)
    new = bytearray(fb.tobytes())
    assert damage.refresh(fb, w * 4, rect, bytes(new), w * 4) == []
    for x, y in ((70, 3), (200, 40)):  # one pixel in band 0, one in band 2
        new[(y * w + x) * 4] = 255
    changed = damage.refresh(fb, w * 4, rect, bytes(new), w * 4)
    assert changed == [Rect(0, 0, w, 16), Rect(0, 32, w, 16)]
    assert fb.tobytes() == bytes(new)
    assert damage.refresh(fb, w * 4, rect, bytes(new), w * 4) == []


def test_refresh_copies_every_changed_row_of_an_inner_rect_and_nothing_outside():
    # Rows after a band's first changed row are copied without being compared: each must still
    # land, at the framebuffer's stride, and no pixel outside the rect may move.
    w, h = 96, 40
    fb = memoryview(bytearray(range(256)) * (w * h * 4 // 256))
    before = fb.tobytes()
    rect = Rect(32, 8, 48, 24)  # bands at y 8..23 and 24..31
    new = bytearray(rect.width * rect.height * 4)
    for y in range(rect.height):
        start = ((rect.y + y) * w + rect.x) * 4
        new[y * rect.width * 4:(y + 1) * rect.width * 4] = before[start:start + rect.width * 4]
    for y in (2, 9, 15):  # band 0: its 3rd, 10th and 16th rows
        new[y * rect.width * 4 + 5] ^= 0xFF
    changed = damage.refresh(fb, w * 4, rect, bytes(new), rect.width * 4)
    assert changed == [Rect(32, 8, 48, 16)]
    expected = bytearray(before)
    for y in range(rect.height):
        start = ((rect.y + y) * w + rect.x) * 4
        expected[start:start + rect.width * 4] = new[y * rect.width * 4:(y + 1) * rect.width * 4]
    assert fb.tobytes() == bytes(expected)
