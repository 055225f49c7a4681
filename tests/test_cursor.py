"""Cursor images: XFixes notify and GetCursorImage on Xvfb, SPICE ALPHA layout, clamping."""

from __future__ import annotations

import struct

import pytest

from spice_stream_worker.cursor import MAX_CURSOR_SIDE, cursor_from_pixels
from spice_stream_worker.sources.x11 import Screen
from tests.support.xserver import Painter, start_xvfb, wait_for


@pytest.fixture
def xserver(monkeypatch):
    server = start_xvfb(200, 100)
    monkeypatch.setenv("XAUTHORITY", server.xauthority)
    try:
        yield server
    finally:
        server.stop()


def set_bitmap_cursor(painter: Painter, width: int, height: int, hot: tuple[int, int]) -> None:
    """Give the root window a solid red core cursor of the given size and hotspot."""
    pix = painter.root.create_pixmap(width, height, 1)
    gc = pix.create_gc(foreground=1, background=0)
    pix.fill_rectangle(gc, 0, 0, width, height)
    cursor = pix.create_cursor(pix, (65535, 0, 0), (0, 0, 65535), hot[0], hot[1])
    painter.root.change_attributes(cursor=cursor)
    painter.sync()


def test_cursor_change_is_notified_and_read(xserver):
    painter = Painter(xserver)
    screen = Screen(xserver.display)
    try:
        screen.pointer_position()
        screen.poll()
        set_bitmap_cursor(painter, 20, 12, (5, 3))
        wait_for(lambda: (screen.pointer_position(), screen.poll())[1].cursor_changed,
                 what="cursor notify")
        image = screen.cursor_image()
        assert image is not None
        assert (image.width, image.height, image.hot_x, image.hot_y) == (20, 12, 5, 3)
        assert len(image.argb) == 20 * 12 * 4
        # Every pixel opaque red: B, G, R, A bytes.
        assert image.argb[:4] == b"\x00\x00\xff\xff"
        assert set(struct.iter_unpack("<I", image.argb)) == {(0xFFFF0000,)}
    finally:
        screen.close()
        painter.close()


def test_layout_is_little_endian_argb():
    image = cursor_from_pixels(2, 1, 0, 0, [0x80102030, 0x01020304])
    assert image is not None
    assert image.argb == bytes([0x30, 0x20, 0x10, 0x80, 0x04, 0x03, 0x02, 0x01])


def test_large_cursor_is_cropped_around_hotspot():
    w, h = 1500, 1100
    pixels = [(y << 16) | x for y in range(h) for x in range(w)]
    image = cursor_from_pixels(w, h, 1400, 50, pixels)
    assert image is not None
    assert image.width <= MAX_CURSOR_SIDE and image.height <= MAX_CURSOR_SIDE
    assert len(image.argb) == image.width * image.height * 4
    assert 0 <= image.hot_x < image.width and 0 <= image.hot_y < image.height
    # The hotspot pixel is still the one that was under the hotspot.
    off = (image.hot_y * image.width + image.hot_x) * 4
    assert struct.unpack_from("<I", image.argb, off)[0] == (50 << 16) | 1400


def test_empty_or_short_cursor_is_none():
    assert cursor_from_pixels(0, 0, 0, 0, []) is None
    assert cursor_from_pixels(4, 4, 0, 0, [0] * 3) is None


def test_hotspot_outside_is_clamped():
    image = cursor_from_pixels(4, 4, 9, -2, [0] * 16)
    assert image is not None and (image.hot_x, image.hot_y) == (3, 0)
