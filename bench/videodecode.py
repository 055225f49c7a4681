"""The bench's client decoder for the video codecs: a stream read off the pty (H.264, VP8, VP9),
decoded in order through GStreamer as spice-gtk would, and the marker read in each frame's picture.
Decoding happens after the run, so it costs the measured processes nothing."""

from __future__ import annotations

from dataclasses import dataclass

from content import MARKER_SIZE, marker_value

CODEC_H264, CODEC_VP8, CODEC_VP9 = 3, 2, 4
# What decodes each (the test machine's decoders: avdec_h264 after h264parse, libvpx's).
DECODERS = {
    CODEC_H264: ("video/x-h264,stream-format=byte-stream,alignment=au", "h264parse ! avdec_h264"),
    CODEC_VP8: ("video/x-vp8", "vp8dec"),
    CODEC_VP9: ("video/x-vp9", "vp9dec"),
}
FRAME_NS = 1_000_000  # a made-up 1 ms per frame: each picture comes back with its frame's index


@dataclass
class Decoded:
    markers: list[int | None]  # per frame given: its marker value, None if it gave no picture
    errors: list[str]  # what the decoder said went wrong (a broken chain shows here or as None)


def decode_markers(codec: int, frames: list[bytes], width: int, height: int,
                   at: tuple[int, int]) -> Decoded:
    """Each frame's marker (the square at `at`), the frames decoded in order from the first."""
    from spice_stream_worker.gstreamer import Media

    media = Media("the bench's decoder")
    Gst = media.Gst
    caps, decoder = DECODERS[codec]
    pipe = Gst.parse_launch(
        f"appsrc name=src format=time caps={caps} ! {decoder} ! videoconvert ! "
        f"video/x-raw,format=RGB,width={width},height={height} ! appsink name=sink sync=false")
    src, sink = pipe.get_by_name("src"), pipe.get_by_name("sink")
    markers: list[int | None] = [None] * len(frames)
    errors: list[str] = []
    stride = (width * 3 + 3) & ~3
    cx, cy = at[0] + MARKER_SIZE // 2, at[1] + MARKER_SIZE // 2

    def take(sample) -> None:
        out = sample.get_buffer()
        index = out.pts // FRAME_NS
        ok, info = out.map(Gst.MapFlags.READ)
        try:
            pixels = info.data
            values = {marker_value(tuple(pixels[y * stride + x * 3:y * stride + x * 3 + 3]))
                      for x in (cx - 1, cx) for y in (cy - 1, cy)}
        finally:
            out.unmap(info)
        if 0 <= index < len(frames):
            markers[index] = values.pop() if len(values) == 1 else None

    pipe.set_state(Gst.State.PLAYING)
    try:
        for i, data in enumerate(frames):
            buf = Gst.Buffer.new_wrapped(data)
            buf.pts, buf.duration = i * FRAME_NS, FRAME_NS
            src.emit("push-buffer", buf)
            # Pictures taken as they come: a run's worth of 1080p RGB would not fit in memory.
            while (sample := sink.emit("try-pull-sample", 0)) is not None:
                take(sample)
        src.emit("end-of-stream")
        while (sample := sink.emit("try-pull-sample", 10 * Gst.SECOND)) is not None:
            take(sample)
        bus = pipe.get_bus()
        while (msg := bus.pop_filtered(Gst.MessageType.ERROR | Gst.MessageType.WARNING)) is not None:
            err, _ = (msg.parse_error() if msg.type == Gst.MessageType.ERROR
                      else msg.parse_warning())
            errors.append(err.message)
    finally:
        pipe.set_state(Gst.State.NULL)
    return Decoded(markers, errors)
