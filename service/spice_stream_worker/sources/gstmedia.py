"""GStreamer for the screen cast: the elements it needs, the pipeline that reads a PipeWire node,
and a sample's pixels copied out of GStreamer's buffer."""

from __future__ import annotations

from typing import Any

from ..gstreamer import Media

MAX_SIDE = 16384  # a frame larger than this is refused (a broken caps negotiation)

PACKAGE_GST_BASE = "gstreamer1.0-plugins-base"
PACKAGE_PIPEWIRE = "gstreamer1.0-pipewire"
ELEMENTS = (("pipewiresrc", PACKAGE_PIPEWIRE), ("videoconvert", PACKAGE_GST_BASE),
            ("appsink", PACKAGE_GST_BASE))
PURPOSE = "GNOME ScreenCast capture"


def screencast_media() -> Media:
    """PyGObject and GStreamer with what a screen cast's pipeline needs (DisplayUnavailable
    names the Debian package of what is missing)."""
    return Media(PURPOSE, ELEMENTS)


def pipeline_description(node: int, fps: int) -> str:
    """The pipeline for a PipeWire node: BGRx in system memory, at most `fps` frames a second.

    A framerate range, not a value: mutter offers a range and fixed values have failed to negotiate
    (GNOME 50). `path` is the node id mutter gives (target-object would want a serial or a name).
    appsink keeps one buffer at most and drops the older one: a late consumer never holds
    pipewiresrc's buffers."""
    return (f"pipewiresrc path={int(node)} do-timestamp=true ! videoconvert ! "
            f"video/x-raw,format=BGRx,framerate=[0/1,{int(fps)}/1] ! "
            "appsink name=sink max-buffers=1 drop=true sync=false emit-signals=true")


def copy_out(gi: Media, sample: Any) -> tuple[int, int, bytes] | None:
    """The sample's pixels, copied out and packed (stride = width * 4); None if unusable."""
    Gst, GstVideo = gi.Gst, gi.GstVideo
    caps = sample.get_caps()
    buf = sample.get_buffer()
    if caps is None or buf is None:
        return None
    try:
        info = GstVideo.VideoInfo.new_from_caps(caps)
    except TypeError:  # PyGObject's word for a NULL (caps that are no video format)
        return None
    if info is None:
        return None
    width, height = info.width, info.height
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        return None
    stride, offset = info.stride[0], info.offset[0]
    meta = GstVideo.buffer_get_video_meta(buf)
    if meta is not None:
        stride, offset = meta.stride[0], meta.offset[0]
    row = width * 4
    ok, mapped = buf.map(Gst.MapFlags.READ)
    if not ok:
        return None
    try:
        # bytes() copies a view (gst-python's overrides give one); PyGObject alone gives bytes.
        data = bytes(mapped.data)
    finally:
        buf.unmap(mapped)
    if stride < row or offset < 0 or offset + (height - 1) * stride + row > len(data):
        return None
    if stride == row:
        pixels = data if offset == 0 and len(data) == row * height else \
            data[offset:offset + row * height]
    else:
        pixels = b"".join(data[offset + y * stride:offset + y * stride + row]
                          for y in range(height))
    return width, height, pixels
