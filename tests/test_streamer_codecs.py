"""The streamer with video codecs (real vp8enc through GStreamer): the codec chosen on each
START_STOP, FORMAT naming it, keyframes as DATA and delta frames marked for the service, a keyframe
when the service asks, MJPEG again when the offer or the encoder says so."""

from __future__ import annotations

import os

import pytest

from spice_stream_common import frameparts
from spice_stream_common import protocol as p
from spice_stream_common.codecnames import Codec, parse_preference
from spice_stream_common.outbox import Outbox
from spice_stream_worker.encoder import JpegEncoder
from spice_stream_worker.geometry import Rect
from spice_stream_worker.source import Changes, Frame
from spice_stream_worker.streamcodec import StreamCodec, probe_registry
from spice_stream_worker.streamer import HostState, Streamer
from spice_stream_worker.videoencoder import AU_END, Settings, VideoEncoderError

FOUND = probe_registry()
pytestmark = pytest.mark.skipif(Codec.VP8 not in FOUND.encoders,
                                reason=f"no vp8enc here: {FOUND.missing.get(Codec.VP8)}")
W, H = 64, 48


class Picture:
    """A live picture the test paints on."""

    size = (W, H)
    live = True

    def __init__(self) -> None:
        self.pixels = bytearray(W * H * 4)

    def paint(self, value: int) -> Changes:
        self.pixels[: W * 4 * 4] = bytes([value]) * (W * 4 * 4)
        return Changes(damage=[Rect(0, 0, W, 4)])

    def grab(self, rects=None):
        return Frame(W, H, W * 4, memoryview(bytes(self.pixels)), rects)

    def pointer_position(self):
        return (0, 0)


class Rig:
    """A streamer on the service's socket (a pipe here) with a picture to paint and a clock."""

    def __init__(self, w: int, r: int, preference: str, video=None) -> None:
        self.r, self.now = r, [0.0]
        self.parser = p.Parser(frameparts.WORKER_CHANNEL_LIMITS)
        self.host_parser = p.Parser(frameparts.SERVICE_TO_WORKER_LIMITS)  # KEYFRAME too
        self.picture = Picture()
        kwargs = {} if video is None else {"video": video}
        self.codec = StreamCodec(JpegEncoder(), parse_preference(preference), Settings(fps=30),
                                 probe=lambda: FOUND, **kwargs)
        self.s = Streamer(self.picture, self.codec, Outbox(w), fps=30, host=HostState(),
                          clock=lambda: self.now[0], frame_parts=frameparts.Sender())
        self.s.start()

    def sent(self) -> list[p.Message]:
        """Tick the streamer once the next frame's time has come; the messages it wrote."""
        self.now[0] += 1.0
        self.s.tick()
        assert self.s.outbox.flush()
        try:
            return [m for m in self.parser.feed(os.read(self.r, 1 << 20)) if isinstance(m, p.Message)]
        except BlockingIOError:
            return []

    def host(self, *messages: bytes) -> None:
        self.s.on_host_bytes(b"".join(messages), self.host_parser)

    def paint(self, value: int) -> None:
        self.s.on_screen_changes(self.picture.paint(value))


@pytest.fixture
def rig(device):
    """rig(preference, video=None): a Rig on the device pipe, its encoders closed at the end."""
    made: list[Rig] = []
    r, w = device

    def make(preference: str, video=None) -> Rig:
        made.append(Rig(w, r, preference, video))
        return made[-1]

    yield make
    for one in made:
        one.codec.close()


def kinds(messages: list[p.Message]) -> list:
    return [m.type if m.type != p.MsgType.FORMAT else ("FORMAT", p.decode_format(m.payload).codec)
            for m in messages if m.type != p.MsgType.CAPABILITIES]


def test_the_preferred_codec_the_host_offers_keyframe_as_data_then_marked_deltas(rig):
    t = rig("vp8 mjpeg")
    t.host(p.start_stop((p.CODEC_MJPEG, p.CODEC_VP8)))
    first = t.sent()
    assert kinds(first) == [("FORMAT", Codec.VP8), p.MsgType.DATA]
    assert first[-1].payload[3:6] == b"\x9d\x01\x2a"  # a VP8 keyframe's start code
    t.paint(200)
    delta = t.sent()
    assert kinds(delta) == [frameparts.DELTA]
    assert delta[0].payload[0] & 1  # VP8's frame tag: not a keyframe
    # Nothing changed: nothing sent (UNCHANGED only, for the service's watchdog).
    assert frameparts.DELTA not in kinds(t.sent())
    # The service lost a frame of the chain: a keyframe at once, with nothing changed.
    t.host(frameparts.keyframe())
    again = t.sent()
    assert kinds(again) == [p.MsgType.DATA] and again[0].payload[3:6] == b"\x9d\x01\x2a"


def test_a_new_offer_without_the_codec_moves_the_stream_to_mjpeg_and_back(rig):
    t = rig("vp8")
    t.host(p.start_stop((p.CODEC_MJPEG, p.CODEC_VP8)))
    assert kinds(t.sent())[0] == ("FORMAT", Codec.VP8)
    # A client that decodes only MJPEG joined.
    t.host(p.start_stop((p.CODEC_MJPEG,)))
    got = t.sent()
    assert kinds(got)[0] == ("FORMAT", Codec.MJPEG) and frameparts.FRAME_PARTS in kinds(got)
    # It left: VP8 again, from a keyframe.
    t.host(p.start_stop((p.CODEC_MJPEG, p.CODEC_VP8)))
    assert kinds(t.sent()) == [("FORMAT", Codec.VP8), p.MsgType.DATA]


def test_a_restart_in_the_same_codec_starts_with_format_and_a_keyframe(rig):
    # libspice-server says START_STOP again when a client connects: it needs both.
    t = rig("vp8")
    t.host(p.start_stop((p.CODEC_MJPEG, p.CODEC_VP8)))
    t.sent()
    t.paint(90)
    assert kinds(t.sent()) == [frameparts.DELTA]
    t.host(p.start_stop((p.CODEC_MJPEG, p.CODEC_VP8)))
    assert kinds(t.sent()) == [("FORMAT", Codec.VP8), p.MsgType.DATA]


def test_a_failing_video_encoder_gives_way_to_mjpeg_for_good(rig, caplog):
    def broken(*args):
        raise VideoEncoderError("no output within 5 s")

    t = rig("vp8", video=broken)
    t.host(p.start_stop((p.CODEC_MJPEG, p.CODEC_VP8)))
    got = t.sent() + t.sent()
    assert kinds(got)[0] == ("FORMAT", Codec.MJPEG), kinds(got)
    assert "vp8: no output within 5 s: streaming without it" in caplog.text
    # Offered again later, it is not tried again in this worker.
    t.host(p.start_stop((p.CODEC_MJPEG, p.CODEC_VP8)))
    assert kinds(t.sent())[0] == ("FORMAT", Codec.MJPEG)


def test_mjpeg_only_never_loads_gstreamer():
    probed = []
    codec = StreamCodec(JpegEncoder(), (Codec.MJPEG,), probe=lambda: probed.append(1) or FOUND)
    assert codec.choose((p.CODEC_MJPEG, p.CODEC_H264)) == Codec.MJPEG
    assert probed == []


@pytest.mark.skipif(Codec.H264 not in FOUND.encoders, reason="no x264enc here")
def test_an_h264_frame_goes_once_ended_for_the_clients_parser(rig):
    # A still screen sends its last H.264 frame once, ended so that spice-gtk's h264parse shows it
    # at once (videoencoder.AU_END); it was followed by the same picture again before.
    t = rig("h264")
    t.host(p.start_stop((p.CODEC_MJPEG, p.CODEC_H264)))
    first = t.sent()
    assert kinds(first) == [("FORMAT", Codec.H264), p.MsgType.DATA]
    assert first[-1].payload.endswith(AU_END)
    frames = (p.MsgType.DATA, frameparts.DELTA)
    assert not set(kinds(t.sent() + t.sent())) & set(frames)
    t.paint(120)
    change = t.sent()
    assert kinds(change) == [frameparts.DELTA] and change[-1].payload.endswith(AU_END)
    assert not set(kinds(t.sent())) & set(frames)
