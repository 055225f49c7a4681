"""Baseline JPEG of the framebuffer, re-encoding only the tiles that changed and splicing them."""

from __future__ import annotations

import functools
import io
import logging
import math
import re
import struct

import PIL
from PIL import Image

from .geometry import Area, Grid, Rect, areas, runs, spans
from .source import Frame

MCU = 16  # pixels per MCU side at 4:2:0
BAND_ROWS = MCU  # a tile is one MCU row high
# Tiles are at most this many MCUs wide: a few glyphs cost a tile or two, and the restart markers
# between tiles (about 4 bytes each) stay near 1% of a 1080p frame.
MAX_TILE_MCUS = 8
_RST = re.compile(rb"\xff[\xd0-\xd7]")
_RST_MARKERS = tuple(bytes((0xFF, 0xD0 + n)) for n in range(8))
_EOI = b"\xff\xd9"
_SOF0 = 0xC0
_SOS = 0xDA
_DRI = 0xDD
# Above this share of dirty tiles one whole-frame encode is cheaper than several partial ones.
FULL_ENCODE_SHARE = 0.7
# An encode call's fixed cost, in tiles (measured: about 30 us a call, 4 us a 128x16 tile): a few
# clean tiles re-encoded are cheaper than one more call. And never more calls than this.
ENCODE_COST = 7
MAX_ENCODES = 24
MAX_CACHED_IMAGES = 16

log = logging.getLogger(__name__)


class EncoderError(Exception):
    """libjpeg's output was not what the splicer expects (never seen with Pillow's libjpeg)."""


@functools.cache
def restart_markers_supported() -> bool:
    """Whether this Pillow writes a restart marker every N blocks (restart_marker_blocks).

    Older ones (Debian 12 has 9.4) ignore the option: each band (16 rows) is then encoded on its
    own where a frame changed in part, and the bands are spliced with markers put in between."""
    out = io.BytesIO()
    Image.new("RGB", (32, 32)).save(out, "JPEG", restart_marker_blocks=1)
    found = b"\xff\xdd" in out.getvalue()
    if not found:
        log.info("Pillow %s writes no JPEG restart markers: a frame that changed in part is "
                 "re-encoded by whole bands of 16 rows (with Pillow 11.1 or later by tiles)",
                 PIL.__version__)
    return found


def tile_mcus(width: int) -> int:
    """MCUs per tile: the largest divisor of the MCUs per row up to MAX_TILE_MCUS, so the tiles
    split every band exactly and one restart interval covers one tile."""
    mcus = max(1, (width + MCU - 1) // MCU)
    return next(k for k in range(min(MAX_TILE_MCUS, mcus), 0, -1) if mcus % k == 0)


class TileGrid(Grid):
    """A frame's tiles: bands of 16 rows (the grid's rows), each cut into tiles of
    tile_mcus(width) MCUs (its columns), or with `whole_bands` one tile per band."""

    def __init__(self, width: int, height: int, whole_bands: bool = False) -> None:
        self.mcus = (max(1, (width + MCU - 1) // MCU) if whole_bands else tile_mcus(width))
        super().__init__(width, height, self.mcus * MCU, BAND_ROWS)


def plan_encodes(dirty: dict[int, list[int]]) -> list[Area]:
    """The areas to encode for these dirty tiles (band -> tiles), at most MAX_ENCODES: of the exact
    cover, each band's span, each run of bands' box and one box round all, the cheapest by
    ENCODE_COST."""
    rows = list(dirty)
    first = dirty[rows[0]]
    if (rows[-1] - rows[0] + 1 == len(rows) and first[-1] - first[0] + 1 == len(first)
            and all(dirty[b] == first for b in rows)):
        # One rectangle of tiles (one window, one spot): one call encoding exactly those is
        # the cheapest plan there is.
        return [(rows[0], rows[-1] + 1, first[0], first[-1] + 1)]
    boxes = [(b0, b1, min(dirty[b][0] for b in range(b0, b1)),
              max(dirty[b][-1] for b in range(b0, b1)) + 1) for b0, b1 in runs(rows)]
    whole = [(boxes[0][0], boxes[-1][1], min(b[2] for b in boxes), max(b[3] for b in boxes))]
    options = [areas(dirty), areas(spans(dirty)), boxes, whole]

    def cost(plan: list[Area]) -> float:
        if len(plan) > MAX_ENCODES:
            return math.inf
        return sum(ENCODE_COST + (b1 - b0) * (t1 - t0) for b0, b1, t0, t1 in plan)

    return min(options, key=cost)


def _split_jpeg(data: bytes) -> tuple[bytes, list[bytes]]:
    """Split a JPEG into its header (SOI .. SOS segment) and its restart-separated scan pieces."""
    if data[:2] != b"\xff\xd8":
        raise EncoderError("encoder output does not start with SOI")
    pos = 2
    while True:
        if data[pos] != 0xFF:
            raise EncoderError(f"bad marker at offset {pos}")
        marker = data[pos + 1]
        (length,) = struct.unpack_from(">H", data, pos + 2)
        pos += 2 + length
        if marker == _SOS:
            break
    end = data.rfind(_EOI)
    if end < pos:
        raise EncoderError("encoder output has no EOI")
    return data[:pos], _RST.split(data[pos:end])


def _patch_header(header: bytes, width: int, height: int, restart: int,
                  add_dri: bool = False) -> bytes:
    """Set SOF0's size to the full frame and check DRI holds the expected restart interval; with
    `add_dri` (a JPEG written without restart markers) put DRI in, just before SOS, where libjpeg
    writes it."""
    out = bytearray(header)
    pos = 2
    seen_sof = seen_dri = False
    while pos < len(out):
        marker = out[pos + 1]
        (length,) = struct.unpack_from(">H", out, pos + 2)
        if marker == _SOF0:
            struct.pack_into(">HH", out, pos + 5, height, width)
            seen_sof = True
        elif marker == _DRI:
            (interval,) = struct.unpack_from(">H", out, pos + 4)
            if interval != restart:
                raise EncoderError(f"restart interval {interval}, expected {restart}")
            seen_dri = True
        elif marker == _SOS and add_dri and not seen_dri:
            out[pos:pos] = struct.pack(">BBHH", 0xFF, _DRI, 4, restart)
            seen_dri = True
            break
        pos += 2 + length
    if not (seen_sof and seen_dri):
        raise EncoderError("encoder output lacks SOF0 or DRI")
    return bytes(out)


class JpegEncoder:
    """Encodes Frames to complete baseline JPEGs, caching each tile's entropy-coded segment.

    With a restart marker after every tile, each tile's segment depends on its own pixels only
    (4:2:0 downsampling stays inside an MCU, and the DC predictor restarts), so a tile encoded
    on its own is byte for byte the one a whole-frame encode would write. The same holds for a
    whole band encoded as a JPEG of its own, with no marker at all: its scan is what one restart
    interval of a band would be (the predictor starts at 0, the last byte is padded alike). So
    where Pillow writes no restart markers (`markers` False; None: Pillow is asked), the tiles
    are whole bands, encoded one call each, and the markers are put in between here.
    """

    def __init__(self, quality: int = 80, markers: bool | None = None) -> None:
        self._quality = quality
        self._markers = restart_markers_supported() if markers is None else markers
        self._grid: TileGrid | None = None
        self._header = b""
        # Each band's tiles with the restart marker after each (none after the frame's last):
        # tile t of a band sits at index 2t, so a band is one join and a tile one item to
        # replace. None: not split out of _last yet.
        self._tiles: list[list[bytes]] | None = None
        self._bands: list[bytes] = []  # each band's list above, joined
        self._last: tuple[bytes, ...] | None = None  # the last JPEG, as encode_parts() gave it
        # Reused pixel stores by size: a fresh Image costs an 8 MB allocation and memset at 1080p.
        self._images: dict[tuple[int, int], Image.Image] = {}
        self.tiles_encoded = 0  # since creation: what the cache did not supply

    @property
    def quality(self) -> int:
        return self._quality

    @quality.setter
    def quality(self, value: int) -> None:
        value = max(1, min(100, int(value)))
        if value != self._quality:
            self._quality = value
            self.reset()

    def reset(self) -> None:
        """Forget the cache: the next encode re-encodes the whole frame."""
        self._grid = None
        self._tiles = None
        self._bands = []
        self._header = b""
        self._last = None
        self._images.clear()

    def encode(self, frame: Frame, changed: list[Rect] | None = None) -> bytes:
        """A complete JPEG of the whole frame; only tiles touched by `changed` are re-encoded.

        changed=None re-encodes everything; so does any change of frame size or quality.
        """
        parts = self.encode_parts(frame, changed)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def encode_parts(self, frame: Frame, changed: list[Rect] | None = None) -> tuple[bytes, ...]:
        """encode()'s JPEG as the pieces it is spliced from (header, bands, EOI), not joined:
        whoever writes it hands them to one writev instead of copying the frame once more."""
        grid = self._grid
        if changed is None or grid is None or (grid.width, grid.height) != (
                frame.width, frame.height) or self._last is None:
            return (self._encode_full(frame),)
        dirty = grid.cells(changed)
        if not dirty:
            return self._last
        ndirty = sum(len(t) for t in dirty.values())
        if ndirty >= FULL_ENCODE_SHARE * grid.count:
            return (self._encode_full(frame),)
        if not self._markers:
            return self._encode_bands(frame, grid, dirty)
        todo = plan_encodes(dirty)
        tiles = self._split_last(grid)
        touched: set[int] = set()
        for area in todo:
            b0, b1, t0, t1 = area
            r = grid.rect(area)
            _, pieces = _split_jpeg(self._encode_area(frame, r.x, r.y, r.x + r.width,
                                                      r.y + r.height, grid.mcus))
            if len(pieces) != (b1 - b0) * (t1 - t0):
                raise EncoderError(f"{len(pieces)} restart pieces for area {area}")
            width = t1 - t0
            for i, band in enumerate(range(b0, b1)):
                tiles[band][2 * t0:2 * t1:2] = pieces[i * width:(i + 1) * width]
                touched.add(band)
            self.tiles_encoded += len(pieces)
        for band in touched:
            self._bands[band] = b"".join(tiles[band])
        self._last = (self._header, *self._bands, _EOI)
        return self._last

    def _encode_area(self, frame: Frame, x0: int, y0: int, x1: int, y1: int,
                     restart_blocks: int) -> bytes:
        # From the first pixel to the last one's end: the rows between are read at `stride`.
        view = frame.pixels[y0 * frame.stride + x0 * 4 : (y1 - 1) * frame.stride + x1 * 4]
        size = (x1 - x0, y1 - y0)
        image = self._images.get(size)
        if image is None:
            if len(self._images) >= MAX_CACHED_IMAGES:
                self._images.clear()
            image = self._images[size] = Image.new("RGB", size)
        try:
            image.frombytes(view, "raw", ("BGRX", frame.stride, 1))
        except TypeError:
            # Pillow before 10 takes only bytes (Debian 12 has 9.4): one copy more per encode.
            image.frombytes(bytes(view), "raw", ("BGRX", frame.stride, 1))
        out = io.BytesIO()
        # No optimize: the standard Huffman tables are then the same in every call, which is
        # what lets segments from different calls share one header.
        image.save(
            out,
            "JPEG",
            quality=self._quality,
            subsampling=2,
            optimize=False,
            progressive=False,
            **({"restart_marker_blocks": restart_blocks} if self._markers else {}),
        )
        return out.getvalue()

    def _encode_bands(self, frame: Frame, grid: TileGrid, dirty: dict[int, list[int]]
                      ) -> tuple[bytes, ...]:
        """Without restart markers from Pillow: each changed band encoded on its own and spliced
        between the others'. After a whole-frame encode (no markers in it, nothing to splice
        into) every band is encoded so, once: about one whole-frame encode more."""
        todo = range(grid.rows) if self._tiles is None else sorted(dirty)
        pieces = {}
        header = b""
        for band in todo:
            y = band * BAND_ROWS
            header, scan = _split_jpeg(self._encode_area(frame, 0, y, frame.width,
                                                         min(y + BAND_ROWS, frame.height), grid.mcus))
            if len(scan) != 1:
                raise EncoderError(f"{len(scan)} restart pieces in band {band}, written without markers")
            pieces[band] = scan[0]
        self.tiles_encoded += len(pieces)
        if self._tiles is None:
            self._header = _patch_header(header, grid.width, grid.height, grid.mcus, add_dri=True)
            self._tiles = [[pieces[b], _RST_MARKERS[b & 7] if b < grid.rows - 1 else b""]
                           for b in range(grid.rows)]
            self._bands = [b"".join(t) for t in self._tiles]
        else:
            for band, piece in pieces.items():
                self._tiles[band][0] = piece
                self._bands[band] = b"".join(self._tiles[band])
        self._last = (self._header, *self._bands, _EOI)
        return self._last

    def _encode_full(self, frame: Frame) -> bytes:
        grid = TileGrid(frame.width, frame.height, whole_bands=not self._markers)
        data = self._encode_area(frame, 0, 0, frame.width, frame.height, grid.mcus)
        self.tiles_encoded += grid.count
        self._grid = grid
        self._last = (data,)
        # Split into tiles only when a partial change needs them: a screen that changes whole
        # every frame never pays for it.
        self._tiles = None
        return data

    def _split_last(self, grid: TileGrid) -> list[list[bytes]]:
        if self._tiles is not None:
            return self._tiles
        assert self._last is not None and len(self._last) == 1
        header, pieces = _split_jpeg(self._last[0])
        if len(pieces) != grid.count:
            raise EncoderError(f"{len(pieces)} restart pieces for {grid.count} tiles")
        self._header = _patch_header(header, grid.width, grid.height, grid.mcus)
        n = grid.columns
        # Restart markers count 0..7 over the whole scan; the last tile's b"" stands for none.
        markers = [_RST_MARKERS[t & 7] for t in range(grid.count - 1)] + [b""]
        self._tiles = [[piece for t in range(b * n, (b + 1) * n) for piece in (pieces[t], markers[t])]
                       for b in range(grid.rows)]
        self._bands = [b"".join(band) for band in self._tiles]
        return self._tiles
