"""H.264, VP8 and VP9 through GStreamer: a frame in, one access unit out, keyframes on demand and at
an interval, each output checked to be what was asked for."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from spice_stream_common.codecnames import Codec
from spice_stream_common.exitcodes import DisplayUnavailable

from . import yuv
from .codecs import COMMON_ELEMENTS, H264_PARSER, Candidate
from .geometry import Rect
from .gstreamer import Media
from .source import Frame
from .wholeconvert import Converted, ConvertError, WholeConverter
from .yuv import Layout, Planes

log = logging.getLogger(__name__)

# How long one frame may take through the pipeline before the encoder is deemed stuck: a 4K frame
# through x264's ultrafast preset takes about 60 ms on one core, far more under TCG.
ENCODE_TIMEOUT_S = 5.0
MAX_SIDE = 8192  # H.264 level 6.2 and VP8/VP9 all stop near here
NO_KEY_INTERVAL = 2 ** 31 - 1  # x264enc's key-int-max: no keyframe of its own accord
# H.264 is fed full-range YUV (BT.601 matrix, JPEG's), converted by the worker where the frame
# changed (yuv.Planes) and said in its VUI: limited range alone, the conversion there and back,
# costs a desktop picture 4-6 dB (37.5 dB where full range keeps 43, and the JPEG path, full
# range too, 37.3). VP8 has no way to say it and decoders of VP9 took it as limited (28 dB):
# those two get BGRx, converted whole by GStreamer to the limited range decoders assume.
PURPOSE = "video encoding"
# What ends each H.264 access unit on the wire: the next one's first NAL units, an access unit
# delimiter (primary_pic_type 7) and an SEI of one empty filler payload. spice-gtk reads H.264
# through h264parse with no alignment in its caps (src/channel-display-priv.h): the parser ends
# an access unit only once it has parsed the first NAL unit of the next, whose end in turn it
# knows only by the start code after it. Without this a still screen's last frame was never
# shown (it took a second frame, the same picture again, one frame slot later: twice the
# encoding, and a slot of latency). The next unit's own NAL units follow these two in an order
# the standard allows (delimiter, SEI, then parameter sets and slices), so x264 writes no
# delimiter of its own.
AU_END = b"\x00\x00\x00\x01\x09\xf0" + b"\x00\x00\x00\x01\x06\x03\x00\x80"
_DELIMITERS = (b"\x00\x00\x00\x01\x09", b"\x00\x00\x01\x09")


class VideoEncoderError(Exception):
    """The pipeline failed, stalled, or gave something other than one access unit for a frame."""


@dataclass(frozen=True)
class Settings:
    """What the stream asks of the encoder."""

    fps: int = 30
    quality: int = 80  # 1-100, the scale of the JPEG path's quality
    keyframe_interval_s: float = 10.0  # a keyframe at least this often (0: only when asked)


def _quantizer(quality: int) -> int:
    """x264's quantizer and libvpx's cq-level for a JPEG-like quality, straight
    lines through 100 -> 10, 80 -> 23 (x264's own default) and 1 -> 50."""
    q = max(1, min(100, quality))
    return round(10 + (100 - q) * 13 / 20) if q >= 80 else round(23 + (80 - q) * 27 / 79)


def encoder_description(codec: Codec, candidate: Candidate, settings: Settings) -> str:
    """The encoder's part of the pipeline, and what follows it up to the appsink: tuned for a
    desktop stream that must start at once (no lookahead, no B-frames, one output a frame), as
    libspice-server's own (server/gstreamer-encoder.c), but by quality, not bitrate: the host
    sends no bandwidth feedback, and a still desktop must come out sharp. Keyframes are the
    VideoEncoder's to ask for (on demand, at its interval), not the encoder's own choice."""
    q = _quantizer(settings.quality)
    name = candidate.element
    if codec == Codec.H264:
        caps = "video/x-h264,stream-format=byte-stream,alignment=au"
        if name == "x264enc":
            # A constant quantizer, not x264's constant quality (pass=qual): without lookahead
            # that gave a keyframe asked for mid-stream (a client joining, the chain cut by a
            # blocked port, the interval) 6-14 KB at 9-16 dB PSNR on a scrolling 1080p desktop,
            # and the frames after it took half a second to recover; the quantizer keeps every
            # frame at 42-43 dB (a keyframe 355-414 KB, a scroll step 4-8 KB).
            return (f"x264enc name=enc byte-stream=true aud=false tune=zerolatency "
                    f"speed-preset=ultrafast pass=quant quantizer={q} bframes=0 "
                    f"key-int-max={NO_KEY_INTERVAL} ! {caps},profile=constrained-baseline")
        # VA-API: its own rate control; h264parse makes it Annex-B, one access unit a buffer.
        return f"{name} name=enc ! {H264_PARSER[0]} config-interval=-1 ! {caps}"
    if codec in (Codec.VP8, Codec.VP9):
        if name in ("vp8enc", "vp9enc"):
            # By quality, with the bitrate's cap out of reach (GStreamer 1.22's libvpx elements
            # have no constant-quality mode of their own): VP8 by its cq-level (a typed word
            # 350 bytes); vp9enc kept one quality whatever cq-level said, so a quality floor,
            # the quantizer's cap (VP8 that way sent 3 KB for the same word).
            rate = (f"end-usage=cq cq-level={q} max-quantizer=63" if codec == Codec.VP8
                    else f"end-usage=vbr max-quantizer={q}")
            # The fastest speed each has (libvpx's realtime range: VP8 16, VP9 8): VP8 at 4 took
            # 45 ms of CPU for a typed letter at 1080p, 35 at 16, for the same bytes.
            return (f"{name} name=enc deadline=1 cpu-used={16 if codec == Codec.VP8 else 8} "
                    f"lag-in-frames=0 {rate} target-bitrate=200000000 min-quantizer=0 "
                    f"error-resilient=default keyframe-mode=disabled threads=2")
        return f"{name} name=enc"
    raise ValueError(f"no video encoder for {codec.label}")


def _ended(unit: bytes) -> bytes:
    """An H.264 access unit without a delimiter of its own at its start (a VA-API encoder's, or
    h264parse's), AU_END after it."""
    if unit.startswith(_DELIMITERS):
        after = unit.find(b"\x00\x00\x01", 4)
        unit = unit[after - (unit[after - 1:after] == b"\x00"):] if after != -1 else b""
    return unit + AU_END


class VideoEncoder:
    """One stream's encoder for one size: encode() takes a frame (BGRx) and gives its access unit
    (H.264 in Annex-B with SPS and PPS before each keyframe, AU_END after it; a VP8/VP9 frame)
    and whether it is a keyframe. Synchronous: a frame is pushed and its output awaited before
    the next, so that nothing waits inside the pipeline (the stream never has an encoded frame
    it did not send)."""

    def __init__(self, codec: Codec, candidate: Candidate, width: int, height: int,
                 settings: Settings, media: Media | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
            raise VideoEncoderError(f"{codec.label}: a {width}x{height} frame cannot be encoded")
        if codec == Codec.H264 and (width % 2 or height % 2):
            # x264 refuses odd sides at 4:2:0; a screen of that size is streamed another way.
            raise VideoEncoderError(f"h264: a {width}x{height} frame has an odd side")
        elements = (*COMMON_ELEMENTS, (candidate.element, candidate.package))
        if codec == Codec.H264 and candidate.element != "x264enc":
            elements += (H264_PARSER,)
        self.media = media or Media(PURPOSE, elements)
        self.codec, self.candidate, self.settings = codec, candidate, settings
        self.size = (width, height)
        self._clock = clock
        self._last_key_at = -math.inf
        Gst = self.media.Gst
        self._planes: Planes | None = None
        self._converter: WholeConverter | None = None
        if codec == Codec.H264:
            info = self.media.GstVideo.VideoInfo()
            info.set_format(self.media.GstVideo.VideoFormat.I420, width, height)
            self._planes = Planes(width, height, Layout(
                tuple(info.offset[:3]), tuple(info.stride[:3]), info.size), self._convert_whole)
            given = f"I420,colorimetry={yuv.COLORIMETRY}"
        else:
            given = "BGRx"
        desc = (f"appsrc name=src is-live=false format=time block=false emit-signals=false "
                f"caps=video/x-raw,format={given},width={width},height={height},"
                f"framerate={settings.fps}/1 ! videoconvert ! video/x-raw,format=I420 ! "
                f"{encoder_description(codec, candidate, settings)} ! "
                "appsink name=sink sync=false emit-signals=false max-buffers=0")
        try:
            self._pipeline = Gst.parse_launch(desc)
        except Exception as exc:  # noqa: BLE001 - GLib.Error: the description did not build
            raise DisplayUnavailable(f"{codec.label} through {candidate.element}: {exc}") from None
        self._src = self._pipeline.get_by_name("src")
        self._sink = self._pipeline.get_by_name("sink")
        self._enc = self._pipeline.get_by_name("enc")
        self._bus = self._pipeline.get_bus()
        self._frames = 0
        self._closed = False
        if self._pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            self._fail("the pipeline did not start")

    def _convert_whole(self, frame: Frame) -> Converted:
        """yuv.Planes' whole-frame path: a converter made at its first use (the first frame)."""
        if self._converter is None:
            try:
                self._converter = WholeConverter(self.media, *self.size)
            except Exception as exc:  # noqa: BLE001 - GLib.Error: the description did not build
                raise ConvertError(f"the colour converter: {exc}") from None
        return self._converter.convert_picture(frame)

    def encode(self, frame: Frame, keyframe: bool = False,
               changed: list[Rect] | None = None) -> tuple[bytes, bool]:
        """The frame's access unit and whether it is a keyframe. The first frame, one asked with
        `keyframe`, and the first once the last keyframe is keyframe_interval_s old are keyframes
        (checked: VideoEncoderError otherwise). `changed`: where the frame differs from the one
        before (None: unknown), so that only that is converted where the worker converts."""
        if self._closed:
            raise VideoEncoderError("the encoder is closed")
        if (frame.width, frame.height) != self.size:
            raise VideoEncoderError(f"a {frame.width}x{frame.height} frame for a "
                                    f"{self.size[0]}x{self.size[1]} encoder")
        Gst = self.media.Gst
        if self._planes is not None:
            try:
                picture = self._planes.update(frame, changed)
            except (ConvertError, ValueError) as exc:
                raise VideoEncoderError(f"{self.codec.label}: {exc}") from None
            # A frame converted whole goes in as the converter gave it; one changed in places,
            # as a copy of the planes (x264 may still hold the buffer it was given before).
            buf = (picture.gst_buffer() if isinstance(picture, Converted)
                   else Gst.Buffer.new_wrapped(bytes(self._planes.buffer)))
        else:
            buf = Gst.Buffer.new_wrapped(frame.packed())
        return self._encode(buf, keyframe)

    def _encode(self, buf: object, keyframe: bool) -> tuple[bytes, bool]:
        """Pushes one input buffer, awaits its access unit; the keyframe rules of encode()."""
        Gst, GstVideo = self.media.Gst, self.media.GstVideo
        now = self._clock()
        interval = self.settings.keyframe_interval_s
        want_key = keyframe or self._frames == 0 or (interval > 0 and now - self._last_key_at >= interval)
        duration = Gst.SECOND // self.settings.fps
        pts = self._frames * duration
        if want_key and self._frames:
            event = GstVideo.video_event_new_downstream_force_key_unit(
                pts, pts, pts, True, self._frames)
            # The pipeline is idle between two frames (each output is awaited): the event
            # reaches the encoder before the frame's buffer.
            self._enc.get_static_pad("sink").send_event(event)
        buf.pts, buf.dts, buf.duration = pts, pts, duration
        if self._src.emit("push-buffer", buf) != Gst.FlowReturn.OK:
            self._fail("the pipeline refused a frame")
        sample = self._sink.emit("try-pull-sample", int(ENCODE_TIMEOUT_S * Gst.SECOND))
        if sample is None:
            self._fail(f"no output within {ENCODE_TIMEOUT_S:g} s")
        out = sample.get_buffer()
        is_key = not out.has_flags(Gst.BufferFlags.DELTA_UNIT)
        ok, info = out.map(Gst.MapFlags.READ)
        if not ok:
            self._fail("an output buffer could not be read")
        try:
            data = bytes(info.data)
        finally:
            out.unmap(info)
        if self.codec == Codec.H264:
            data = _ended(data)
        self._frames += 1
        if is_key:
            self._last_key_at = now
        if want_key and not is_key:
            raise VideoEncoderError(f"{self.candidate.element} gave a delta frame where a "
                                    f"keyframe was asked for (frame {self._frames})")
        return data, is_key

    def _fail(self, what: str) -> None:
        msg = self._bus.pop_filtered(self.media.Gst.MessageType.ERROR)
        detail = ""
        if msg is not None:
            err, debug = msg.parse_error()
            detail = f": {err.message}"
        raise VideoEncoderError(f"{self.codec.label} ({self.candidate.element}): {what}{detail}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._converter is not None:
            self._converter.close()
        self._pipeline.set_state(self.media.Gst.State.NULL)
        self._pipeline = self._src = self._sink = self._enc = None

    def __enter__(self) -> VideoEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

