"""yuv.Planes: I420 in full-range BT.601, converted where the frame changed, the same bytes as a
whole conversion of the new frame; GStreamer converts it back to the picture (its own layout).
wholeconvert.WholeConverter: the whole frame through videoconvert, within a level of Pillow's."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from spice_stream_worker.geometry import Rect
from spice_stream_worker.source import Frame
from spice_stream_worker.wholeconvert import ConvertError, WholeConverter
from spice_stream_worker.yuv import COLORIMETRY, WHOLE_SHARE, Layout, Planes
from tests.support.spicehost import psnr

try:
    from spice_stream_worker.gstreamer import Media

    MEDIA = Media("the tests")
except Exception as exc:  # noqa: BLE001 - any reason GStreamer is not usable here is a skip reason
    MEDIA, WHY = None, str(exc)

pytestmark = pytest.mark.skipif(MEDIA is None, reason=f"no GStreamer here: {WHY}" if MEDIA is None else "")


def layout(width: int, height: int) -> Layout:
    info = MEDIA.GstVideo.VideoInfo()
    info.set_format(MEDIA.GstVideo.VideoFormat.I420, width, height)
    return Layout(tuple(info.offset[:3]), tuple(info.stride[:3]), info.size)


def picture(width: int, height: int, seed: int) -> Image.Image:
    rnd = random.Random(seed)
    im = Image.new("RGB", (width, height), (240, 240, 240))
    for _ in range(40):
        x, y = rnd.randrange(width), rnd.randrange(height)
        im.paste((rnd.randrange(256), rnd.randrange(256), rnd.randrange(256)),
                 (x, y, min(width, x + rnd.randrange(1, 60)), min(height, y + rnd.randrange(1, 30))))
    return im


def frame_of(im: Image.Image, pad: int = 0) -> Frame:
    """BGRX rows, each `pad` pixels wider than the picture (a stride larger than a row)."""
    row = im.convert("RGB").tobytes("raw", "BGRX")
    w = im.width * 4
    data = b"".join(row[y * w:(y + 1) * w] + b"\x55" * (4 * pad) for y in range(im.height))
    return Frame(im.width, im.height, w + 4 * pad, memoryview(data))


@pytest.mark.parametrize("size", [(64, 48), (1366, 20), (641, 481)], ids=str)
@pytest.mark.parametrize("pad", [0, 3])
def test_a_partial_update_gives_the_bytes_of_a_whole_conversion(size, pad):
    w, h = size
    before, after = picture(w, h, 1), picture(w, h, 1)
    # Changes at odd places and sizes, one at each edge.
    rects = [Rect(5, 3, 7, 9), Rect(w - 3, h - 5, 3, 5), Rect(0, h // 2, 1, 1), Rect(w // 3, 0, 11, 2)]
    for r in rects:
        after.paste((10, 200, 30), (r.x, r.y, r.x + r.width, r.y + r.height))
    partial = Planes(w, h, layout(w, h))
    partial.update(frame_of(before, pad), None)
    partial.update(frame_of(after, pad), rects)
    whole = Planes(w, h, layout(w, h))
    whole.update(frame_of(after, pad), None)
    assert partial.buffer == whole.buffer


def test_the_first_update_is_whole_whatever_changed_says():
    w, h = 32, 32
    planes = Planes(w, h, layout(w, h))
    planes.update(frame_of(picture(w, h, 2)), [Rect(0, 0, 2, 2)])
    whole = Planes(w, h, layout(w, h))
    whole.update(frame_of(picture(w, h, 2)), None)
    assert planes.buffer == whole.buffer


def test_gstreamer_converts_the_planes_back_to_the_picture():
    w, h = 320, 200
    im = picture(w, h, 3)
    planes = Planes(w, h, layout(w, h))
    planes.update(frame_of(im), None)
    Gst = MEDIA.Gst
    pipe = Gst.parse_launch(
        f"appsrc name=src format=time caps=video/x-raw,format=I420,width={w},height={h},"
        f"framerate=30/1,colorimetry={COLORIMETRY} ! videoconvert ! video/x-raw,format=RGB ! "
        "appsink name=sink sync=false")
    src, sink = pipe.get_by_name("src"), pipe.get_by_name("sink")
    pipe.set_state(Gst.State.PLAYING)
    try:
        buf = Gst.Buffer.new_wrapped(bytes(planes.buffer))
        buf.pts = 0
        src.emit("push-buffer", buf)
        src.emit("end-of-stream")
        sample = sink.emit("try-pull-sample", 5 * Gst.SECOND)
        out = sample.get_buffer()
        ok, info = out.map(Gst.MapFlags.READ)
        back = Image.frombytes("RGB", (w, h), bytes(info.data))
        out.unmap(info)
    finally:
        pipe.set_state(Gst.State.NULL)
    # 4:2:0 halves the colour of these sharp-edged patches; full range keeps the rest.
    assert psnr(back, im) > 30


def test_a_frame_of_another_size_is_refused():
    planes = Planes(32, 32, layout(32, 32))
    with pytest.raises(ValueError, match="64x32 frame for 32x32 planes"):
        planes.update(frame_of(Image.new("RGB", (64, 32))), None)


@pytest.mark.parametrize("size", [(64, 48), (642, 482)], ids=str)
@pytest.mark.parametrize("pad", [0, 3])
def test_gstreamers_whole_conversion_is_within_a_level_of_pillows(size, pad):
    w, h = size
    im = picture(w, h, 4)
    pillow = Planes(w, h, layout(w, h))
    pillow.update(frame_of(im, pad), None)
    converter = WholeConverter(MEDIA, w, h)
    try:
        converted = converter.convert(frame_of(im, pad))
    finally:
        converter.close()
    assert len(converted) == len(pillow.buffer)
    got, want = samples(converted, w, h), samples(pillow.buffer, w, h)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1
    assert len(set(got)) > 10  # a picture, not a blank buffer that happens to be close


def samples(buffer: bytes, w: int, h: int) -> bytes:
    """Every plane's samples, without the padding at the end of its rows (which is nobody's)."""
    lay = layout(w, h)
    out = bytearray()
    for plane, (pw, ph) in enumerate(((w, h), ((w + 1) // 2, (h + 1) // 2), ((w + 1) // 2, (h + 1) // 2))):
        for y in range(ph):
            at = lay.offsets[plane] + y * lay.strides[plane]
            out += buffer[at:at + pw]
    return bytes(out)


class Filled:
    """A stand-in for the converter's picture: `size` bytes of 7, and how often they were read."""

    def __init__(self, size: int) -> None:
        self.size, self.reads = size, 0

    def tobytes(self) -> bytes:
        self.reads += 1
        return bytes([7]) * self.size


def test_a_large_change_goes_whole_through_the_converter_a_small_one_through_pillow():
    w, h = 64, 48
    calls = []

    def whole(frame: Frame) -> Filled:
        calls.append(frame)
        return Filled(layout(w, h).size)  # not what Pillow would give: the buffer shows who

    planes = Planes(w, h, layout(w, h), whole)
    first = frame_of(picture(w, h, 5))
    given = planes.update(first, [Rect(0, 0, 2, 2)])  # the first update is whole
    assert len(calls) == 1 and given is not None and given.reads == 0  # not copied yet
    assert planes.buffer == bytes([7]) * len(planes.buffer) and given.reads == 1
    small = Rect(0, 0, 8, 8)
    planes.update(first, [small])
    assert len(calls) == 1 and planes.buffer[0] != 7  # Pillow converted the small change
    big = Rect(0, 0, w, int(h * WHOLE_SHARE) + 1)
    planes.update(first, [big])
    assert len(calls) == 2
    planes.update(first, None)
    assert len(calls) == 3


def test_a_converted_frame_of_the_wrong_size_is_refused():
    planes = Planes(32, 32, layout(32, 32), lambda frame: Filled(5))
    with pytest.raises(ValueError, match="5 bytes"):
        planes.update(frame_of(picture(32, 32, 6)), None)


def test_the_converter_refuses_a_frame_of_another_size_and_a_use_after_close():
    converter = WholeConverter(MEDIA, 32, 32)
    with pytest.raises(ConvertError, match="64x32 frame for a 32x32"):
        converter.convert(frame_of(Image.new("RGB", (64, 32))))
    converter.close()
    with pytest.raises(ConvertError, match="closed"):
        converter.convert(frame_of(Image.new("RGB", (32, 32))))


def test_a_small_change_after_a_whole_conversion_lands_on_the_converters_picture():
    """The converter's picture is kept as it was given (no copy) until a small change needs the
    planes: then the change goes on top of it, as if the new frame had been converted whole."""
    w, h = 320, 200
    before, after = picture(w, h, 7), picture(w, h, 7)
    change = Rect(101, 37, 9, 13)
    after.paste((200, 30, 90), (change.x, change.y, change.x + change.width, change.y + change.height))
    converter = WholeConverter(MEDIA, w, h)
    try:
        planes = Planes(w, h, layout(w, h), converter.convert_picture)
        assert planes.update(frame_of(before), None) is not None
        assert planes.update(frame_of(after), [change]) is None  # Pillow's, in place
        want = converter.convert(frame_of(after))
    finally:
        converter.close()
    got = samples(planes.buffer, w, h)
    assert max(abs(a - b) for a, b in zip(got, samples(want, w, h), strict=True)) <= 1
    x, y = change.x + 4, change.y + 6  # luma: the first plane, rows w samples apart here
    assert abs(got[y * w + x] - luma((200, 30, 90))) <= 1
    assert abs(got[y * w + x] - luma(before.getpixel((x, y)))) > 10  # the change is there


def luma(rgb: tuple[int, int, int]) -> int:
    r, g, b = rgb
    return round(0.299 * r + 0.587 * g + 0.114 * b)
