"""A whole frame from BGRx to full-range BT.601 I420 through GStreamer's videoconvert: the path
yuv.Planes takes when most of the frame changed (about 4x faster than Pillow's per pixel)."""

from __future__ import annotations

from .gstreamer import Media
from .source import Frame
from .yuv import COLORIMETRY

# One frame through the converter; it is idle between frames, so this is only ever a stall.
CONVERT_TIMEOUT_S = 5.0


class ConvertError(Exception):
    """The converter failed or stalled."""


class WholeConverter:
    """Owns one appsrc ! videoconvert ! appsink pipeline for one size (close() ends it).
    convert() gives the frame in GStreamer's own I420 layout (GstVideo.VideoInfo's, which
    yuv.Planes is built on), with JPEG's colour matrix and range, as yuv.Planes converts: the
    two differ by at most one level per sample (tests/test_yuv.py)."""

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
        out = sample.get_buffer()
        ok, info = out.map(Gst.MapFlags.READ)
        if not ok:
            raise ConvertError("a converted frame could not be read")
        try:
            return bytes(info.data)
        finally:
            out.unmap(info)

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.set_state(self._Gst.State.NULL)
            self._pipeline = self._src = self._sink = None

