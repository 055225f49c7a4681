"""A frame as planar YUV 4:2:0 (I420) in full-range BT.601 (JPEG's), kept between frames and
converted again only where the frame changed: the H.264 encoder's input."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from .geometry import Rect
from .source import Frame

# What GStreamer calls this colour space (range full, matrix BT.601, transfer and primaries
# unknown): x264 says it in the stream's VUI, and decoders convert back with it.
COLORIMETRY = "1:4:0:0"
# When the changed rectangles cover this share of the frame, the whole frame is converted, by
# `whole` where given: GStreamer's videoconvert takes a 1080p frame in about 10 ms on the
# bench's host, Pillow's per-pixel path (split into planes, chroma reduced) 38 ms.
WHOLE_SHARE = 0.25


@dataclass(frozen=True)
class Layout:
    """Where each plane lies in the buffer and its row stride (GStreamer's own for I420, from
    GstVideo.VideoInfo: rows padded to 4 bytes)."""

    offsets: tuple[int, int, int]
    strides: tuple[int, int, int]
    size: int


class WholePicture(Protocol):
    """A whole frame converted to the planes' layout elsewhere (wholeconvert.Converted)."""

    size: int

    def tobytes(self) -> bytes: ...


class Planes:
    """The I420 picture of the frames given to update(), in one buffer of `layout`. `whole`, if
    given, converts a whole frame to that layout (wholeconvert.WholeConverter.convert_picture),
    used where much of the frame changed; the small changes go through Pillow here."""

    def __init__(self, width: int, height: int, layout: Layout,
                 whole: Callable[[Frame], WholePicture] | None = None) -> None:
        self.width, self.height, self.layout = width, height, layout
        self._buffer = bytearray(layout.size)
        self._pending: WholePicture | None = None  # the picture, not yet copied into _buffer
        self._whole_converter = whole
        self._whole = False  # converted whole once

    @property
    def buffer(self) -> bytearray:
        """The picture, in `layout`."""
        if self._pending is not None:
            self._buffer[:] = self._pending.tobytes()
            self._pending = None
        return self._buffer

    def update(self, frame: Frame, changed: Sequence[Rect] | None) -> WholePicture | None:
        """Convert the frame where it changed (None: whole; whole anyway the first time). Gives
        the whole converter's picture when the frame went through it: the caller may use that
        as it is (no copy); `buffer` is filled from it only when asked for."""
        if (frame.width, frame.height) != (self.width, self.height):
            raise ValueError(f"a {frame.width}x{frame.height} frame for {self.width}x{self.height} planes")
        if changed is None or not self._whole or (
                sum(r.width * r.height for r in changed) >= WHOLE_SHARE * self.width * self.height):
            picture = None
            if self._whole_converter is None:
                self._pending = None  # overwritten whole
                self._convert(frame, 0, 0, self.width, self.height)
            else:
                picture = self._whole_converter(frame)
                if picture.size != self.layout.size:
                    raise ValueError(f"a converted frame of {picture.size} bytes for planes of "
                                     f"{self.layout.size}")
                self._pending = picture
            self._whole = True
            return picture
        for r in changed:
            # Whole 2x2 blocks: a chroma sample covers one.
            x0, y0 = r.x & ~1, r.y & ~1
            x1, y1 = min(self.width, (r.x + r.width + 1) & ~1), min(self.height, (r.y + r.height + 1) & ~1)
            if x1 > x0 and y1 > y0:
                self._convert(frame, x0, y0, x1 - x0, y1 - y0)
        return None

    def _convert(self, frame: Frame, x: int, y: int, width: int, height: int) -> None:
        row = width * 4
        start = y * frame.stride + x * 4
        if frame.stride == row:
            data = bytes(frame.pixels[start:start + row * height])
        else:
            data = b"".join(bytes(frame.pixels[start + i * frame.stride:start + i * frame.stride + row])
                            for i in range(height))
        ycc = Image.frombytes("RGB", (width, height), data, "raw", "BGRX").convert("YCbCr")
        luma, cb, cr = ycc.split()
        # Chroma: the mean of each 2x2 block (a block at the right or bottom edge of an odd size
        # is half one).
        for plane, image, px, py in ((0, luma, x, y), (1, cb.reduce(2), x // 2, y // 2),
                                     (2, cr.reduce(2), x // 2, y // 2)):
            self._put(plane, image.tobytes(), image.width, image.height, px, py)

    def _put(self, plane: int, data: bytes, width: int, height: int, x: int, y: int) -> None:
        offset, stride = self.layout.offsets[plane], self.layout.strides[plane]
        at = offset + y * stride + x
        buffer = self.buffer
        if width == stride:
            buffer[at:at + width * height] = data
            return
        for i in range(height):
            buffer[at + i * stride:at + i * stride + width] = data[i * width:(i + 1) * width]
