"""Baseline JPEG of the framebuffer, re-encoding only the 16-row bands that changed and splicing them."""

from __future__ import annotations

import functools
import io
import logging
import re
import struct
from collections.abc import Iterable

import PIL
from PIL import Image

from .capture import Frame, Rect

BAND_ROWS = 16  # one MCU row at 4:2:0: the smallest unit a restart interval can cover per row
_RST = re.compile(rb"\xff[\xd0-\xd7]")
_EOI = b"\xff\xd9"
_SOF0 = 0xC0
_SOS = 0xDA
_DRI = 0xDD
# Above this share of dirty bands one whole-frame encode is cheaper than several partial ones.
FULL_ENCODE_SHARE = 0.7
MAX_CACHED_IMAGES = 8


log = logging.getLogger(__name__)


class EncoderError(Exception):
    """libjpeg's output was not what the splicer expects (never seen with Pillow's libjpeg)."""


@functools.cache
def restart_markers_supported() -> bool:
    """Whether this Pillow writes JPEG restart markers (restart_marker_rows, Pillow 11).

    Older ones (Debian 12 has 9.4) ignore the option: without markers no band can be spliced,
    so every changed frame is encoded whole, which works everywhere, only slower."""
    out = io.BytesIO()
    Image.new("RGB", (32, 32)).save(out, "JPEG", restart_marker_rows=1)
    found = b"\xff\xdd" in out.getvalue()
    if not found:
        log.info("Pillow %s writes no JPEG restart markers: each changed frame is encoded "
                 "whole (with Pillow 11 or later only the changed bands are)",
                 PIL.__version__)
    return found


def dirty_bands(changed: Iterable[Rect], height: int) -> list[int]:
    """Indices of the bands that any rect touches, sorted."""
    nbands = (height + BAND_ROWS - 1) // BAND_ROWS
    bands: set[int] = set()
    for r in changed:
        y0, y1 = max(r.y, 0), min(r.y + r.height, height)
        if y1 <= y0 or r.width <= 0:
            continue
        bands.update(range(y0 // BAND_ROWS, min((y1 - 1) // BAND_ROWS + 1, nbands)))
    return sorted(bands)


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Consecutive indices as [start, end) runs."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


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


def _patch_header(header: bytes, width: int, height: int, restart: int) -> bytes:
    """Set SOF0's size to the full frame and check DRI holds the expected restart interval."""
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
        pos += 2 + length
    if not (seen_sof and seen_dri):
        raise EncoderError("encoder output lacks SOF0 or DRI")
    return bytes(out)


class JpegEncoder:
    """Encodes Frames to complete baseline JPEGs, caching each band's entropy-coded segment."""

    def __init__(self, quality: int = 80, splice: bool | None = None) -> None:
        self._quality = quality
        # splice=False: whole-frame encodes only (what an old Pillow allows); None: probe Pillow.
        self._splice = restart_markers_supported() if splice is None else splice
        self._size: tuple[int, int] | None = None
        self._header = b""
        self._bands: list[bytes] = []
        self._last: bytes | None = None
        # Reused pixel stores by size: a fresh Image costs an 8 MB allocation and memset at 1080p.
        self._images: dict[tuple[int, int], Image.Image] = {}

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
        self._size = None
        self._bands = []
        self._header = b""
        self._last = None
        self._images.clear()

    def encode(self, frame: Frame, changed: list[Rect] | None = None) -> bytes:
        """A complete JPEG of the whole frame; only bands touched by `changed` are re-encoded.

        changed=None re-encodes everything; so does any change of frame size or quality.
        """
        size = (frame.width, frame.height)
        if not self._splice:
            if changed is not None and size == self._size and self._last is not None \
                    and not dirty_bands(changed, frame.height):
                return self._last
            self._size, self._last = size, self._encode_rows(frame, 0, frame.height)
            return self._last
        nbands = (frame.height + BAND_ROWS - 1) // BAND_ROWS
        if changed is None or size != self._size or len(self._bands) != nbands:
            return self._encode_full(frame)
        bands = dirty_bands(changed, frame.height)
        if not bands and self._last is not None:
            return self._last
        if len(bands) >= FULL_ENCODE_SHARE * nbands:
            return self._encode_full(frame)
        for start, end in _runs(bands):
            y0, y1 = start * BAND_ROWS, min(end * BAND_ROWS, frame.height)
            _, pieces = _split_jpeg(self._encode_rows(frame, y0, y1))
            if len(pieces) != end - start:
                raise EncoderError(f"{len(pieces)} restart pieces for {end - start} bands")
            self._bands[start:end] = pieces
        self._last = self._assemble()
        return self._last

    def _encode_rows(self, frame: Frame, y0: int, y1: int) -> bytes:
        view = frame.pixels[y0 * frame.stride : y1 * frame.stride]
        size = (frame.width, y1 - y0)
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
            **({"restart_marker_rows": 1} if self._splice else {}),
        )
        return out.getvalue()

    def _encode_full(self, frame: Frame) -> bytes:
        data = self._encode_rows(frame, 0, frame.height)
        header, pieces = _split_jpeg(data)
        nbands = (frame.height + BAND_ROWS - 1) // BAND_ROWS
        if len(pieces) != nbands:
            raise EncoderError(f"{len(pieces)} restart pieces for {nbands} bands")
        restart = (frame.width + BAND_ROWS - 1) // BAND_ROWS
        self._header = _patch_header(header, frame.width, frame.height, restart)
        self._bands = pieces
        self._size = (frame.width, frame.height)
        self._last = data
        return data

    def _assemble(self) -> bytes:
        parts = [self._header]
        last = len(self._bands) - 1
        for i, piece in enumerate(self._bands):
            parts.append(piece)
            if i != last:
                parts.append(_RST_MARKERS[i & 7])
        parts.append(_EOI)
        return b"".join(parts)


_RST_MARKERS = tuple(bytes((0xFF, 0xD0 + n)) for n in range(8))
