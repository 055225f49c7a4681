"""gstmedia.copy_out: a sample's pixels copied out whole and packed, or nothing, whatever its caps,
video meta and buffer claim (real GStreamer buffers and samples, built by hand)."""

from __future__ import annotations

import pytest

from spice_stream_worker.sources import gstmedia

try:
    MEDIA = gstmedia.screencast_media()
except Exception as exc:  # noqa: BLE001 - any reason GStreamer is not usable here is a skip reason
    MEDIA = None
    WHY = str(exc)

pytestmark = pytest.mark.skipif(MEDIA is None, reason=f"no GStreamer here: {WHY}" if MEDIA is None else "")


def sample(data: bytes, caps: str, meta: tuple[int, int, int, int] | None = None):
    """A sample of `data` with `caps`; meta = (width, height, offset, stride) as a GstVideoMeta."""
    Gst, GstVideo = MEDIA.Gst, MEDIA.GstVideo
    buf = Gst.Buffer.new_wrapped(data)
    if meta is not None:
        w, h, offset, stride = meta
        GstVideo.buffer_add_video_meta_full(buf, GstVideo.VideoFrameFlags.NONE,
                                            GstVideo.VideoFormat.BGRX, w, h, 1,
                                            [offset, 0, 0, 0], [stride, 0, 0, 0])
    return Gst.Sample.new(buf, Gst.Caps.from_string(caps), None, None)


def bgrx(w: int, h: int) -> str:
    return f"video/x-raw,format=BGRx,width={w},height={h},framerate=0/1"


def test_a_packed_frame_is_copied_whole():
    data = bytes(range(24))
    assert gstmedia.copy_out(MEDIA, sample(data, bgrx(3, 2))) == (3, 2, data)


def test_a_padded_frame_is_packed_row_by_row():
    rows = [bytes([y]) * 12 + b"\xee" * 4 for y in (1, 2)]  # 3 pixels, then 4 bytes of padding
    got = gstmedia.copy_out(MEDIA, sample(b"".join(rows), bgrx(3, 2), meta=(3, 2, 0, 16)))
    assert got == (3, 2, b"\x01" * 12 + b"\x02" * 12)


def test_an_offset_frame_starts_at_its_offset():
    data = b"\xff" * 8 + bytes(range(24))
    assert gstmedia.copy_out(MEDIA, sample(data, bgrx(3, 2), meta=(3, 2, 8, 12))) == \
        (3, 2, bytes(range(24)))


BAD = [
    (bytes(23), bgrx(3, 2), None, "a buffer one byte shorter than the caps say"),
    (bytes(32), bgrx(3, 2), (3, 2, 0, 8), "a stride shorter than a row"),
    (bytes(32), bgrx(3, 2), (3, 2, 16, 12), "an offset that puts the last row past the end"),
    (bytes(64), bgrx(3, 2), (3, 2, 0, 1 << 30), "a huge stride"),
    (bytes(64), bgrx(gstmedia.MAX_SIDE + 1, 1), None, "wider than MAX_SIDE"),
    (bytes(64), "video/x-raw", None, "caps without a size or format"),
    (bytes(64), "audio/x-raw,format=S16LE,rate=48000,channels=2", None, "not video at all"),
]


@pytest.mark.parametrize("data,caps,meta,why", BAD, ids=[case[3] for case in BAD])
def test_a_sample_that_does_not_add_up_is_nothing_never_an_exception(data, caps, meta, why):
    assert gstmedia.copy_out(MEDIA, sample(data, caps, meta)) is None, why
