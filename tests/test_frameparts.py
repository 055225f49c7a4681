"""Frames to the service as their changed parts: exact frames, small messages, untrusted input refused."""

from __future__ import annotations

import asyncio
import io
import random

import pytest

from spice_stream_common import frameparts as fp
from spice_stream_common import protocol as p
from spice_streamd import guestmessages
from spice_streamd.workerchannel import WorkerChannel, socket_pair


def payload_of(pieces: list[bytes]) -> bytes:
    """The message's payload, as the service's parser hands it on."""
    whole = b"".join(pieces)
    version, _, msg_type, size = p.HEADER.unpack_from(whole)
    assert (version, msg_type, size) == (p.PROTOCOL_VERSION, fp.FRAME_PARTS, len(whole) - p.HEADER_SIZE)
    return whole[p.HEADER_SIZE:]


def frames(seed: int, count: int, n_parts: int = 70):
    """Frames as an encoder gives them: the same objects for unchanged parts, new ones for changed."""
    rng = random.Random(seed)
    parts = tuple([b"\xff\xd8header"] + [rng.randbytes(rng.randint(0, 5000)) for _ in range(n_parts - 2)]
                  + [b"\xff\xd9"])
    for _ in range(count):
        yield parts
        changed = rng.sample(range(1, n_parts - 1), rng.choice((0, 1, 3, 20)))
        parts = tuple(rng.randbytes(rng.randint(1, 5000)) if i in changed else part
                      for i, part in enumerate(parts))


def test_the_service_assembles_every_frame_exactly_from_small_messages():
    sender, assembler = fp.Sender(), fp.Assembler()
    sizes = []
    for parts in frames(1, 60):
        pieces = sender.message(parts)
        sender.sent(parts)
        assert assembler.apply(payload_of(pieces)).take() == parts
        sizes.append(sum(map(len, pieces)))
    whole = sum(map(len, parts))
    assert sizes[0] > whole  # the first carries everything
    assert min(sizes[1:]) < 200  # a frame with no part changed is a few bytes
    assert sorted(sizes[1:])[len(sizes) // 2] < whole / 3


def test_a_message_that_was_not_sent_makes_the_next_one_whole():
    sender, assembler = fp.Sender(), fp.Assembler()
    stream = frames(2, 4)
    first = next(stream)
    sender.message(first)
    sender.sent(first)
    assembler.apply(payload_of(fp.message(first, range(len(first)))))
    dropped = next(stream)
    sender.message(dropped)
    sender.forget()  # the outbox dropped it: the service never saw it
    third = next(stream)
    assert assembler.apply(payload_of(sender.message(third))).take() == third


def test_a_new_layout_must_come_whole():
    assembler = fp.Assembler()
    parts = [b"\xff\xd8a", b"b", b"c"]
    assembler.apply(payload_of(fp.message(parts, [0, 1, 2])))
    with pytest.raises(p.MessageError, match="new layout"):
        assembler.apply(payload_of(fp.message([b"\xff\xd8x", b"y"], [1])))


def entries(count: int, *items: tuple[int, int, bytes]) -> bytes:
    return fp.COUNT.pack(count) + b"".join(fp.ENTRY.pack(i, n) + data for i, n, data in items)


@pytest.mark.parametrize("payload, reason", [
    (b"\x01\x00", "shorter than its count"),
    (entries(0), "outside 1.."),
    (entries(fp.MAX_PARTS + 1, (0, 1, b"x")), "outside 1.."),
    (entries(2, (1, 1, b"x"), (0, 1, b"y")), "out of order"),
    (entries(2, (0, 1, b"x"), (0, 1, b"y")), "out of order"),
    (entries(2, (0, 1, b"x"), (2, 1, b"y")), "past 2"),
    (entries(2, (0, 1, b"x"), (1, 9, b"y")), "cut short"),
    (entries(2, (0, 1, b"x")) + b"\x01\x00\x00", "entry cut short"),
    (entries(2, (0, 0, b""), (1, 0, b"")), "frame of 0 bytes"),
])
def test_what_does_not_apply_is_refused_and_changes_nothing(payload, reason):
    assembler = fp.Assembler()
    good = [b"\xff\xd8", b"abc"]
    assert assembler.apply(payload_of(fp.message(good, [0, 1]))).take() == tuple(good)
    with pytest.raises(p.MessageError, match=reason):
        assembler.apply(payload)
    # The frame the worker's next delta builds on is still the last good one.
    assert assembler.apply(payload_of(fp.message([b"\xff\xd8", b"xyz"], [1]))).take() == \
        (b"\xff\xd8", b"xyz")


def test_no_frame_exceeds_its_bound():
    assembler = fp.Assembler(max_size=1000)
    assembler.apply(entries(2, (0, 600, b"\xff" * 600), (1, 300, b"a" * 300)))
    with pytest.raises(p.MessageError, match="outside 1..1000"):
        assembler.apply(entries(2, (1, 500, b"b" * 500)))


def test_the_service_channel_hands_on_whole_frames_and_drops_what_does_not_apply(caplog):
    async def run() -> tuple[list[p.Message], list[bytes | None]]:
        ours, theirs = socket_pair()
        got: list[p.Message] = []
        WorkerChannel(ours, label="worker uid=1000", check=lambda m: None, deliver=got.append,
                      relayed=True)
        theirs.sendall(p.format_msg(640, 480))  # no frame before its FORMAT
        first = [b"\xff\xd8" + bytes(300), b"band" * 100, b"\xff\xd9"]
        theirs.sendall(b"".join(fp.message(first, [0, 1, 2])))
        # A part past the frame's count: refused, and the next delta still applies.
        bad = p.header(fp.FRAME_PARTS, 4 + 8 + 1) + entries(3, (7, 1, b"x"))
        theirs.sendall(bad)
        theirs.sendall(b"".join(fp.message([first[0], b"new", first[2]], [1])))
        theirs.sendall(p.cursor_move(1, 2))  # the channel goes on after a refusal
        for _ in range(200):
            if len(got) == 4:
                break
            await asyncio.sleep(0.01)
        # What the port writer would take of each frame now (the worker has not closed yet).
        taken = [m.frame.take() if m.frame else None for m in got[1:]]
        theirs.close()
        return got[1:], [b"".join(t) if t else None for t in taken]

    got, taken = asyncio.run(run())
    assert [m.type for m in got] == [p.MsgType.DATA, p.MsgType.DATA, p.MsgType.CURSOR_MOVE]
    # The first frame was changed by the second message since: it is not handed out any more.
    assert taken[0] is None
    assert taken[1] == b"\xff\xd8" + bytes(300) + b"new\xff\xd9"
    assert got[1].size == len(taken[1])
    assert "worker uid=1000: message refused: FRAME_PARTS part 7" in caplog.text


def test_the_port_never_sees_frame_parts():
    # Only the worker channel's parser knows the type: the host's and the port's do not.
    assert fp.FRAME_PARTS not in p.GUEST_TO_HOST_LIMITS
    assert fp.FRAME_PARTS not in p.HOST_TO_GUEST_LIMITS


def test_a_frame_of_parts_is_checked_by_its_first_part():
    # The service checks a frame's start (a JPEG's SOI) in its first part (the encoder's header,
    # or the whole JPEG), whatever the count of parts: a check that costs the same for any frame.
    def data(*parts: bytes) -> p.Message:
        assembler = fp.Assembler()
        return p.Message(p.MsgType.DATA, b"", assembler.apply(entries(
            len(parts), *((i, len(part), part) for i, part in enumerate(parts)))))

    assert guestmessages.refusal(data(b"\xff\xd8rest"), None, True) is None
    assert guestmessages.refusal(data(b"\xff\xd8", b"x"), None, True) is None
    assert guestmessages.refusal(data(b"\xff", b"\xd8rest"), None, True) == "DATA that is not a JPEG"
    assert guestmessages.refusal(data(b"", b"\xff\xd8", b"x"), None, True) == "DATA that is not a JPEG"
    assert guestmessages.refusal(data(b"ab"), None, True) == "DATA that is not a JPEG"


def test_unchanged_parts_are_handed_on_as_they_are():
    # No copy of what did not change: the frame's cost follows the message, not the frame.
    assembler = fp.Assembler()
    big = bytes(100_000)
    first = assembler.apply(payload_of(fp.message([b"\xff\xd8", big, b"\xff\xd9"], [0, 1, 2]))).take()
    second = assembler.apply(payload_of(fp.message([b"\xff\xd8", big, b"!"], [2]))).take()
    assert second[1] is first[1]
    assert second[2] == b"!"


@pytest.mark.parametrize("width, height", [(1, 1), (17, 9), (64, 48), (333, 77), (1920, 1080)])
def test_the_format_bound_holds_the_largest_jpeg_of_that_size(width, height):
    # Noise at quality 100 without chroma subsampling is the largest a baseline JPEG gets; with a
    # restart marker after every MCU where Pillow writes them (what the worker's splicing uses).
    from PIL import Image

    from spice_stream_worker import encoder

    rng = random.Random(width * height)
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    extra = {"restart_marker_blocks": 1} if encoder.restart_markers_supported() else {}
    for subsampling in (0, 2):  # 4:4:4, 4:2:0 (the worker's)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=100, subsampling=subsampling, **extra)
        assert len(out.getvalue()) <= guestmessages.frame_limit(width, height)
    # And the bound is no more than a few times the picture's raw size, and never past DATA's.
    assert guestmessages.frame_limit(width, height) < 6 * 16 * 16 * width * height + 70_000
    assert guestmessages.frame_limit(16384, 16384) == p.DATA_MAX_BYTES


VP8_KEY = b"\x50\x42\x00\x9d\x01\x2a" + b"\x40\x00\xf0\x00"  # a frame tag, then the start code
VP8_DELTA = b"\x31\x0b\x00" + b"\x11" * 8  # bit 0 set: an inter frame


@pytest.mark.parametrize("codec, key, delta", [
    (p.CODEC_H264, b"\x00\x00\x00\x01\x09\x10" + b"x" * 9, b"\x00\x00\x01\x41" + b"y" * 6),
    (p.CODEC_VP8, VP8_KEY, VP8_DELTA),
    (p.CODEC_VP9, b"\x82\x49\x83\x42\x00" + b"z" * 6, b"\x86\x00" + b"z" * 6),
], ids=["h264", "vp8", "vp9"])
def test_video_frames_are_checked_as_their_stream_s_codec(codec, key, delta):
    # Issue 18: DATA (a keyframe) and DELTA frames are checked by the codec of the FORMAT
    # relayed; a JPEG is no frame of a video stream, nor a video frame one of an MJPEG stream.
    assert guestmessages.refusal(p.Message(p.MsgType.DATA, key), None, True, codec) is None
    assert guestmessages.refusal(p.Message(p.MsgType.DATA, delta, delta=True), None, True,
                                 codec) is None
    jpeg = p.Message(p.MsgType.DATA, b"\xff\xd8\xff\xe0" + b"j" * 8)
    assert guestmessages.refusal(jpeg, None, True, codec).startswith("DATA that is not a")
    assert guestmessages.refusal(p.Message(p.MsgType.DATA, key), None, True) == \
        "DATA that is not a JPEG"
    assert guestmessages.refusal(p.Message(p.MsgType.DATA, jpeg.payload, delta=True), None,
                                 True) == "a delta frame in an MJPEG stream"


def test_a_format_names_a_codec_the_host_offers():
    fmt = p.Message(p.MsgType.FORMAT, p.format_msg(640, 480, p.CODEC_H264)[p.HEADER_SIZE:])
    assert guestmessages.refusal(fmt, None, False, host_codecs=(1, 3)) is None
    assert guestmessages.refusal(fmt, None, False, host_codecs=(1, 2)) == \
        "FORMAT with codec 3, which the host does not offer"
    h265 = p.Message(p.MsgType.FORMAT, p.format_msg(640, 480, 5)[p.HEADER_SIZE:])
    assert guestmessages.refusal(h265, None, False, host_codecs=(1, 5)) == \
        "FORMAT with codec 5: not one this service streams"


def test_frame_parts_go_only_in_an_mjpeg_stream():
    held = fp.Assembler().apply(entries(1, (0, 8, b"\x00\x00\x00\x01\x09\x10xx")))
    msg = p.Message(p.MsgType.DATA, b"", held)
    assert guestmessages.refusal(msg, None, True, p.CODEC_H264) == \
        "frame parts in a stream that is not MJPEG"
