"""JpegEncoder: spliced tile JPEGs are byte for byte a direct encode, for any sequence of changes."""

from __future__ import annotations

import io
import math
import random
import struct

import pytest
from PIL import Image, ImageChops, ImageDraw, ImageStat

from spice_stream_worker.encoder import (
    MAX_ENCODES,
    JpegEncoder,
    TileGrid,
    plan_encodes,
    restart_markers_supported,
    tile_mcus,
)
from spice_stream_worker.geometry import areas
from spice_stream_worker.sources.x11 import Frame, Rect


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), (rng.randrange(256), 80, 160))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randrange(1, width + 1), y0 + rng.randrange(1, height + 1)
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        draw.rectangle((x0, y0, x1, y1), fill=colour)
        draw.text((x0, y0), f"spice {rng.randrange(1000)}", fill=(0, 0, 0))
    return img


def bgrx(img: Image.Image) -> bytearray:
    r, g, b = img.split()
    return bytearray(Image.merge("RGBA", (b, g, r, Image.new("L", img.size, 0))).tobytes())


def frame_of(buf: bytearray, width: int, height: int) -> Frame:
    return Frame(width, height, width * 4, memoryview(buf))


def paste(buf: bytearray, width: int, src: bytearray, rect: Rect) -> None:
    for y in range(rect.y, rect.y + rect.height):
        off = (y * width + rect.x) * 4
        buf[off : off + rect.width * 4] = src[off : off + rect.width * 4]


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def psnr(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size
    stat = ImageStat.Stat(ImageChops.difference(a, b))
    n = a.size[0] * a.size[1]
    mse = sum(stat.sum2) / (3 * n)
    return math.inf if mse == 0 else 10 * math.log10(255 * 255 / mse)


def markers(data: bytes) -> dict[int, bytes]:
    """The header segments (marker -> payload) up to SOS."""
    out: dict[int, bytes] = {}
    pos = 2
    while True:
        marker = data[pos + 1]
        (length,) = struct.unpack_from(">H", data, pos + 2)
        out[marker] = data[pos + 4 : pos + 2 + length]
        pos += 2 + length
        if marker == 0xDA:
            return out


def check_valid(data: bytes, width: int, height: int) -> Image.Image:
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
    segs = markers(data)
    assert 0xC0 in segs, "baseline SOF0 expected"
    sof = segs[0xC0]
    assert struct.unpack(">HH", sof[1:5]) == (height, width)
    assert struct.unpack(">H", segs[0xDD])[0] == tile_mcus(width)
    img = decode(data)
    assert img.size == (width, height)
    assert img.mode == "RGB"
    return img


def direct(img_buf: bytearray, width: int, height: int) -> Image.Image:
    return decode(JpegEncoder().encode(frame_of(img_buf, width, height)))


def test_full_encode_is_valid_and_faithful():
    w, h = 320, 200
    src = picture(w, h, 1)
    data = JpegEncoder(quality=80).encode(frame_of(bgrx(src), w, h))
    img = check_valid(data, w, h)
    assert psnr(img, src) > 25


@pytest.mark.parametrize("size", [(320, 240), (333, 197), (17, 15), (1, 1), (250, 16), (64, 33),
                                  (1366, 40), (2032, 20)])
def test_random_changes_splice_to_the_direct_encode_bytes(size):
    w, h = size
    rng = random.Random(w * 1000 + h)
    buf = bgrx(picture(w, h, 0))
    enc = JpegEncoder()
    check_valid(enc.encode(frame_of(buf, w, h)), w, h)
    for step in range(12):
        other = bgrx(picture(w, h, step + 1))
        rects = []
        for _ in range(rng.randrange(0, 3)):
            x, y = rng.randrange(w), rng.randrange(h)
            rect = Rect(x, y, rng.randrange(1, w - x + 1), rng.randrange(1, h - y + 1))
            paste(buf, w, other, rect)
            rects.append(rect)
        spliced = enc.encode(frame_of(buf, w, h), rects)
        check_valid(spliced, w, h)
        assert spliced == JpegEncoder().encode(frame_of(buf, w, h)), f"step {step} rects {rects}"


def test_spliced_output_equals_direct_bytes():
    # Bands are independent at 4:2:0 with restart per MCU row, so splicing is exact.
    w, h = 200, 100
    buf = bgrx(picture(w, h, 3))
    enc = JpegEncoder()
    enc.encode(frame_of(buf, w, h))
    paste(buf, w, bgrx(picture(w, h, 4)), Rect(10, 40, 50, 10))
    assert enc.encode(frame_of(buf, w, h), [Rect(10, 40, 50, 10)]) == JpegEncoder().encode(
        frame_of(buf, w, h)
    )


@pytest.mark.skipif(not restart_markers_supported(), reason="Pillow without restart markers")
def test_a_spliced_frame_comes_in_pieces_that_make_the_whole_frame():
    # The worker writes the pieces with one writev: they must be the exact JPEG, in order.
    w, h = 200, 100
    buf = bgrx(picture(w, h, 3))
    enc = JpegEncoder()
    assert enc.encode_parts(frame_of(buf, w, h)) == (JpegEncoder().encode(frame_of(buf, w, h)),)
    paste(buf, w, bgrx(picture(w, h, 4)), Rect(10, 40, 50, 10))
    parts = enc.encode_parts(frame_of(buf, w, h), [Rect(10, 40, 50, 10)])
    assert len(parts) > 2  # header, bands, EOI: not joined
    assert b"".join(parts) == JpegEncoder().encode(frame_of(buf, w, h))


def test_unchanged_area_outside_rects_is_not_reencoded():
    # Pixels changed outside the reported rects must not show up: proves only touched bands
    # were encoded (the cache supplied the rest).
    w, h = 128, 96
    buf = bgrx(Image.new("RGB", (w, h), (0, 0, 255)))
    enc = JpegEncoder()
    enc.encode(frame_of(buf, w, h))
    red = bgrx(Image.new("RGB", (w, h), (255, 0, 0)))
    paste(buf, w, red, Rect(0, 0, w, h))
    img = decode(enc.encode(frame_of(buf, w, h), [Rect(0, 20, 4, 4)]))
    assert img.getpixel((64, 80))[2] > 200  # still blue: band 5 came from the cache
    assert img.getpixel((64, 20))[0] > 200  # band 1 re-encoded: red
    assert img.getpixel((64, 40))[2] > 200  # band 2 untouched


def test_no_change_returns_same_jpeg():
    w, h = 64, 64
    buf = bgrx(picture(w, h, 9))
    enc = JpegEncoder()
    first = enc.encode(frame_of(buf, w, h))
    assert enc.encode(frame_of(buf, w, h), []) == first


def test_resize_and_quality_change_give_valid_jpegs():
    enc = JpegEncoder()
    for w, h, q in [(160, 120, 80), (97, 61, 80), (97, 61, 50), (300, 17, 50), (160, 120, 90)]:
        enc.quality = q
        buf = bgrx(picture(w, h, w))
        # A stale cache must never leak into a frame of another size: pass a partial change.
        img = check_valid(enc.encode(frame_of(buf, w, h), [Rect(0, 0, 1, 1)]), w, h)
        assert psnr(img, direct_q(buf, w, h, q)) > 35
        paste(buf, w, bgrx(picture(w, h, 1)), Rect(0, h // 2, w, h - h // 2))
        img = check_valid(enc.encode(frame_of(buf, w, h), [Rect(0, h // 2, w, h - h // 2)]), w, h)
        assert psnr(img, direct_q(buf, w, h, q)) > 35


def direct_q(buf: bytearray, w: int, h: int, q: int) -> Image.Image:
    return decode(JpegEncoder(quality=q).encode(frame_of(buf, w, h)))


def test_frame_with_padded_stride():
    w, h, stride = 50, 40, 50 * 4 + 24
    src = picture(w, h, 2)
    tight = bgrx(src)
    buf = bytearray(stride * h)
    for y in range(h):
        buf[y * stride : y * stride + w * 4] = tight[y * w * 4 : (y + 1) * w * 4]
    img = check_valid(JpegEncoder().encode(Frame(w, h, stride, memoryview(buf))), w, h)
    assert psnr(img, direct(tight, w, h)) > 35


def test_without_restart_markers_changed_bands_are_spliced_byte_for_byte():
    """Pillow older than 11.1 (Debian 12's 9.4) writes no restart markers: a whole changed frame is
    one encode without markers; a frame changed in part is spliced from bands encoded one by one
    (all of them once after a whole encode), with the markers put in between: byte for byte what
    Pillow writes with a restart marker after each band."""
    w, h = 160, 100  # 10 MCUs a row; the last band 4 rows high
    buf = bgrx(picture(w, h, 5))
    enc = JpegEncoder(markers=False)
    first = enc.encode(frame_of(buf, w, h))
    assert b"\xff\xdd" not in first and decode(first).size == (w, h)
    assert enc.encode(frame_of(buf, w, h), []) is first
    other = bgrx(picture(w, h, 6))

    def with_band_markers() -> bytes:
        out = io.BytesIO()
        Image.frombytes("RGB", (w, h), bytes(buf), "raw", "BGRX").save(
            out, "JPEG", quality=80, subsampling=2, optimize=False, progressive=False,
            restart_marker_blocks=10)
        return out.getvalue()

    encoded = enc.tiles_encoded
    paste(buf, w, other, Rect(3, 40, 20, 2))
    second = enc.encode(frame_of(buf, w, h), [Rect(3, 40, 20, 2)])
    assert second == with_band_markers()
    assert enc.tiles_encoded - encoded == 7  # every band, once, after the whole encode
    for rect in (Rect(150, 98, 10, 2), Rect(0, 0, 1, 1), Rect(20, 30, 30, 40)):
        encoded = enc.tiles_encoded
        paste(buf, w, other, rect)
        spliced = enc.encode(frame_of(buf, w, h), [rect])
        assert spliced == with_band_markers(), rect
        assert enc.tiles_encoded - encoded == (rect.y + rect.height - 1) // 16 - rect.y // 16 + 1
    big = Rect(0, 0, w, 90)
    paste(buf, w, bgrx(picture(w, h, 7)), big)
    whole = enc.encode(frame_of(buf, w, h), [big])  # most bands changed: one encode
    assert b"\xff\xdd" not in whole and psnr(decode(whole), direct(buf, w, h)) > 35
    set_size = enc.encode(frame_of(bgrx(picture(80, 48, 7)), 80, 48), [Rect(0, 0, 1, 1)])
    assert decode(set_size).size == (80, 48)


def test_the_pillow_pyproject_asks_for_splices():
    from spice_stream_worker.encoder import restart_markers_supported

    assert restart_markers_supported() is True
    assert b"\xff\xdd" in JpegEncoder().encode(frame_of(bgrx(picture(32, 32, 1)), 32, 32))


def test_tile_width_divides_the_mcus_of_a_row():
    assert tile_mcus(1920) == 8  # 120 MCUs: 15 tiles of 128 px
    assert tile_mcus(1024) == 8
    assert tile_mcus(1366) == 2  # 86 = 2 x 43
    assert tile_mcus(2032) == 1  # 127 MCUs, a prime: tiles of one MCU
    assert tile_mcus(17) == 2 and tile_mcus(1) == 1
    grid = TileGrid(1920, 1080)
    assert (grid.columns, grid.rows, grid.cell_width) == (15, 68, 128)


def test_only_touched_tiles_are_encoded():
    w, h = 1920, 1080
    buf = bgrx(Image.new("RGB", (w, h), (0, 0, 255)))
    enc = JpegEncoder()
    enc.encode(frame_of(buf, w, h))
    before = enc.tiles_encoded
    paste(buf, w, bgrx(Image.new("RGB", (w, h), (255, 0, 0))), Rect(0, 0, w, h))
    # 64x64 at (360, 100): x crosses the tile edge at 384, y spans bands 6..10.
    img = decode(enc.encode(frame_of(buf, w, h), [Rect(360, 100, 64, 64)]))
    assert enc.tiles_encoded - before == 2 * 5
    assert img.getpixel((330, 130))[0] > 200  # in a re-encoded tile: red
    assert img.getpixel((600, 130))[2] > 200  # same band, another tile: still the cached blue
    assert img.getpixel((330, 400))[2] > 200


def test_scattered_changes_stay_few_encodes_and_exact():
    w, h = 1024, 512
    rng = random.Random(3)
    buf = bgrx(picture(w, h, 1))
    enc = JpegEncoder()
    enc.encode(frame_of(buf, w, h))
    other = bgrx(picture(w, h, 2))
    # Every other tile of every other band: far more rectangles than MAX_ENCODES.
    rects = [Rect(t * 128 + 5, b * 16 + 3, 4, 4) for b in range(0, 32, 2) for t in range(0, 8, 2)]
    assert len(areas(TileGrid(w, h).cells(rects))) > MAX_ENCODES
    for r in rects:
        paste(buf, w, other, r)
    rng.shuffle(rects)
    assert enc.encode(frame_of(buf, w, h), rects) == JpegEncoder().encode(frame_of(buf, w, h))


def test_encode_plan_prefers_fewer_calls_over_a_few_clean_tiles():
    # A region whose edges move by a tile from band to band: one box, not one call per band.
    ragged = {b: list(range(3 + b % 2, 8 + b % 3)) for b in range(10, 27)}
    assert plan_encodes(ragged) == [(10, 27, 3, 10)]
    # Two windows far apart in the same bands: two calls, not the 60 tiles between them.
    apart = {b: [0, 1, 120, 121] for b in range(5, 9)}
    assert sorted(plan_encodes(apart)) == [(5, 9, 0, 2), (5, 9, 120, 122)]
    # Exact cells when the box would waste more than the calls cost.
    stair = {0: [0], 1: [20], 2: [40]}
    assert sorted(plan_encodes(stair)) == [(0, 1, 0, 1), (1, 2, 20, 21), (2, 3, 40, 41)]
    # Every other band of a tall frame: never more than MAX_ENCODES calls.
    assert len(plan_encodes({b: [b % 7] for b in range(0, 120, 2)})) <= MAX_ENCODES
    # One rectangle of tiles is that rectangle; one with a gap in a band or between bands is not.
    assert plan_encodes({b: [4, 5, 6] for b in range(13, 31)}) == [(13, 31, 4, 7)]
    assert sorted(plan_encodes({b: [4, 40] for b in range(13, 15)})) == [(13, 15, 4, 5),
                                                                          (13, 15, 40, 41)]
    assert sorted(plan_encodes({3: [4], 40: [4]})) == [(3, 4, 4, 5), (40, 41, 4, 5)]
