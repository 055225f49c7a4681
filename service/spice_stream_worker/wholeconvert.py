"""A whole frame from BGRx to full-range BT.601 I420 through GStreamer's videoconvert: the path
yuv.Planes takes when most of the frame changed (about 4x faster than Pillow's per pixel)."""

from __future__ import annotations

from typing import Any

from .gstreamer import Media, alias
from .source import Frame
from .yuv import COLORIMETRY

# One frame through the converter; it is idle between frames, so this is only ever a stall.
CONVERT_TIMEOUT_S = 5.0


class ConvertError(Exception):
    """The converter failed or stalled."""


class Converted:
    """One converted frame as the converter's own GStreamer buffer (yuv.WholePicture): handed to
    the encoder as it is, copied out only when a later small change is converted into it (a
    1080p frame's I420 is 3 MB; four copies of it cost a whole-screen frame 2-3 ms)."""

    def __init__(self, Gst: Any, buffer: Any) -> None:
        self._Gst, self._buffer = Gst, buffer
        self.size: int = buffer.get_size()

    def tobytes(self) -> bytes:
        return self._buffer.extract_dup(0, self.size)

    def gst_buffer(self) -> Any:
        """A buffer of its own (its timestamps the caller's to set) sharing the picture's memory."""
        return alias(self._Gst, self._buffer)


class WholeConverter:
    """Owns one appsrc ! videoconvert ! appsink pipeline for one size (close() ends it).
    convert() gives the frame in GStreamer's own I420 layout (GstVideo.VideoInfo's, which
    yuv.Planes is built on), with JPEG's colour matrix and range, as yuv.Planes converts: the
    two differ by at most one level per sample (tests/test_yuv.py). convert_picture() gives it
    without a copy (Converted)."""

    def __init__(self, media: Media, width: int, height: int) -> None:
        Gst = media.Gst
        self._Gst = Gst
        self.size = (width, height)
        self._pipeline = Gst.parse_launch(
            f"appsrc name=src is-live=false format=time block=false emit-signals=false "
            f"caps=video/x-raw,format=BGRx,width={width},height={height},framerate=0/1 ! "
            f"videoconvert ! video/x-raw,format=I420,colorimetry={COLORIMETRY} ! "
            "appsink name=sink sync=false emit-signals=false max-buffers=0")
        self._src = self._pipeline.get_by_name("src")
        self._sink = self._pipeline.get_by_name("sink")
        self._frames = 0
        if self._pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            self.close()
            raise ConvertError("the converter did not start")

    def convert(self, frame: Frame) -> bytes:
        return self.convert_picture(frame).tobytes()

    def convert_picture(self, frame: Frame) -> Converted:
        Gst = self._Gst
        if self._pipeline is None:
            raise ConvertError("the converter is closed")
        if (frame.width, frame.height) != self.size:
            raise ConvertError(f"a {frame.width}x{frame.height} frame for a "
                               f"{self.size[0]}x{self.size[1]} converter")
        buf = Gst.Buffer.new_wrapped(frame.packed())
        buf.pts = self._frames
        self._frames += 1
        if self._src.emit("push-buffer", buf) != Gst.FlowReturn.OK:
            raise ConvertError("the converter refused a frame")
        sample = self._sink.emit("try-pull-sample", int(CONVERT_TIMEOUT_S * Gst.SECOND))
        if sample is None:
            raise ConvertError(f"no converted frame within {CONVERT_TIMEOUT_S:g} s")
        return Converted(Gst, sample.get_buffer())

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.set_state(self._Gst.State.NULL)
            self._pipeline = self._src = self._sink = None

