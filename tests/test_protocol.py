"""The stream-device protocol: builders match stream-device.h, the parser survives any input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spice_stream_common import protocol as p


def test_header_layout_matches_stream_device_h():
    # u8 version, u8 padding, u16 type, u32 size, little-endian: 8 bytes.
    assert p.header(p.MsgType.DATA, 0x01020304) == bytes([1, 0, 3, 0, 4, 3, 2, 1])


def test_format_is_twelve_bytes():
    msg = p.format_msg(1920, 1080)
    assert len(msg) == 8 + 12
    assert struct.unpack("<BBHI", msg[:8]) == (1, 0, 2, 12)
    assert p.decode_format(msg[8:]) == p.Format(1920, 1080, p.CODEC_MJPEG)


def test_cursor_set_bounds_and_layout():
    msg = p.cursor_set(2, 3, 1, 9, b"\xff" * 24)
    assert struct.unpack("<HHHHB3x", msg[8:20]) == (2, 3, 1, 2, p.CursorType.ALPHA)  # hotspot clamped
    with pytest.raises(p.MessageError):
        p.cursor_set(1025, 1, 0, 0, b"\0" * 4100)
    with pytest.raises(p.MessageError):
        p.cursor_set(2, 2, 0, 0, b"\0" * 15)
    with pytest.raises(p.MessageError):
        p.cursor_set(1, 1, 0, 0, b"\0" * 4, cursor_type=1)  # MONO is not allowed on the stream device


def test_data_header_bounds():
    assert p.data_header(5)[2:] == struct.pack("<HI", 3, 5)
    with pytest.raises(p.MessageError):
        p.data_header(p.DATA_MAX_BYTES + 1)
    with pytest.raises(p.MessageError):
        p.data_header(0)


def test_device_display_info_is_nul_terminated():
    msg = p.device_display_info(0, 1, "pci/0000/02.0")
    sid, did, alen = struct.unpack("<III", msg[8:20])
    assert (sid, did, alen) == (0, 1, len("pci/0000/02.0") + 1)
    assert msg[20:] == b"pci/0000/02.0\0"


def test_capabilities_bitmap():
    assert p.capabilities({p.Capability.QUALITY_INDICATOR}) == p.encode(1, b"\x01")
    assert p.has_cap(b"\x01", p.Capability.QUALITY_INDICATOR)
    assert not p.has_cap(b"", p.Capability.QUALITY_INDICATOR)


def test_parser_splits_host_messages():
    stream = p.capabilities(b"") + p.start_stop([1, 3]) + p.notify_error(7, "bad")
    msgs = p.Parser().feed(stream)
    assert [m.type for m in msgs] == [1, 4, 5]
    assert p.decode_start_stop(msgs[1].payload) == p.StartStop((1, 3))
    assert p.decode_notify_error(msgs[2].payload) == p.NotifyError(7, "bad")


def test_parser_reports_garbage_once_and_resyncs():
    parser = p.Parser()
    out = parser.feed(b"\xde\xad\xbe\xef" * 10 + p.start_stop([1]))
    assert isinstance(out[0], p.Violation) and out[0].discarded == 40
    assert out[1] == p.Message(4, b"\x01\x01")
    assert len(out) == 2


def test_parser_refuses_oversized_message_without_buffering_it():
    parser = p.Parser()
    out = parser.feed(p.header(p.MsgType.NOTIFY_ERROR, 1 << 30) + b"x" * 100)
    assert any(isinstance(m, p.Violation) and "exceeds" in m.reason for m in out)
    assert parser.buffered < p.HEADER_SIZE


def test_parser_refuses_guest_types_from_host():
    out = p.Parser().feed(p.format_msg(10, 10))
    assert isinstance(out[0], p.Violation) and "unexpected message type 2" in out[0].reason


def test_start_stop_count_mismatch_is_an_error():
    with pytest.raises(p.MessageError):
        p.decode_start_stop(b"\x03\x01")
    with pytest.raises(p.MessageError):
        p.decode_start_stop(b"")


@st.composite
def split_points(draw, data: bytes):
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    pieces, last = [], 0
    for c in cuts + [len(data)]:
        pieces.append(data[last:c])
        last = c
    return pieces


host_message = st.one_of(
    st.lists(st.integers(0, 255), max_size=20).map(p.start_stop),
    st.binary(max_size=40).map(p.capabilities),
    st.tuples(st.integers(0, 2**32 - 1), st.text(max_size=30)).map(lambda t: p.notify_error(*t)),
)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_valid_stream_any_split_gives_the_same_messages(data):
    msgs = data.draw(st.lists(host_message, max_size=6))
    stream = b"".join(msgs)
    parser = p.Parser()
    out = []
    for piece in data.draw(split_points(stream)):
        out += parser.feed(piece)
    assert [encode_back(m) for m in out] == msgs
    assert parser.buffered == 0


def encode_back(m):
    assert isinstance(m, p.Message)
    return p.encode(m.type, m.payload)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000), st.data())
def test_any_bytes_any_split_never_crash_and_stay_bounded(blob, data):
    parser = p.Parser()
    for piece in data.draw(split_points(blob)):
        for item in parser.feed(piece):
            assert isinstance(item, p.Message | p.Violation)
            if isinstance(item, p.Message):
                assert len(item.payload) <= p.HOST_TO_GUEST_LIMITS[item.type]
        assert parser.buffered <= parser.max_buffer


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), host_message)
def test_garbage_then_valid_message_is_recovered(garbage, msg):
    # Whatever came before, a valid message that follows a clean boundary is never lost for good:
    # after at most one false header, the parser is back in step for the message after it.
    parser = p.Parser()
    out = parser.feed(garbage + msg + msg + msg)
    messages = [m for m in out if isinstance(m, p.Message)]
    assert p.encode(messages[-1].type, messages[-1].payload) == msg or parser.buffered > 0


def test_a_mebibyte_of_noise_costs_a_search_not_a_step_per_byte():
    # A hostile or broken host can send noise at the port's speed: resynchronising byte by byte kept
    # the worker at 94-98% of a core (about 1.2 s of CPU per MiB); a search on the version byte takes
    # milliseconds. The bound is generous for a loaded machine and still far below byte-by-byte.
    import random
    import time

    noise = random.Random(8).randbytes(1 << 20)
    parser = p.Parser()
    out = []
    t0 = time.process_time()
    for i in range(0, len(noise), 65536):
        out += parser.feed(noise[i:i + 65536])
        assert parser.buffered <= parser.max_buffer
    cpu = time.process_time() - t0
    assert cpu < 0.3, f"1 MiB of noise took {cpu:.2f} s of CPU"
    violations = [m for m in out if isinstance(m, p.Violation)]
    assert violations, "noise must be reported"
    # Still in step: after a clean boundary the next message is found (a false header in the noise
    # may swallow what follows it, so send the message until it comes through, as a host would).
    found = []
    for _ in range(3):
        found += [m for m in parser.feed(p.start_stop([1])) if isinstance(m, p.Message)]
        if found:
            break
    assert found == [p.Message(p.MsgType.START_STOP, b"\x01\x01")]


def test_cursor_set_counts_the_mask_as_the_host_does():
    # libspice-server 0.15.1: 32 bits a pixel for ALPHA, 24 + 1 for COLOR24, 32 + 1 for COLOR32.
    assert p.cursor_data_size(1, 1, p.CursorType.COLOR32) == 5
    assert p.cursor_data_size(3, 3, p.CursorType.COLOR24) == 29
    assert p.cursor_data_size(2, 2, p.CursorType.ALPHA) == 16
    msg = p.cursor_set(1, 1, 0, 0, bytes(5), p.CursorType.COLOR32)
    assert p.decode_cursor_set(msg[p.HEADER_SIZE:]).data == bytes(5)
    with pytest.raises(p.MessageError, match="the host needs 5"):
        p.decode_cursor_set(p.CURSOR_SET_HEADER.pack(1, 1, 0, 0, p.CursorType.COLOR32) + bytes(4))
    with pytest.raises(p.MessageError):
        p.cursor_set(1, 1, 0, 0, bytes(4), p.CursorType.COLOR32)


def test_a_well_formed_oversized_message_is_skipped_whole_when_asked():
    # The worker's channel: a frame larger than its FORMAT allows is dropped as it comes, never
    # buffered, and the message after it is parsed as it is (no resynchronising through its bytes).
    parser = p.Parser(p.GUEST_TO_HOST_LIMITS, skip_oversized=True)
    parser.set_limit(p.MsgType.DATA, 1000)
    frame = p.encode(p.MsgType.DATA, b"\x01\x00\x07\x00" * 10_000)  # looks like headers inside
    stream = frame + p.cursor_move(3, 4)
    got = []
    for i in range(0, len(stream), 4096):
        got += parser.feed(stream[i : i + 4096])
        assert parser.buffered <= 4096
    assert got == [p.Violation("message type 3 of 40000 bytes exceeds 1000", len(frame), p.MsgType.DATA),
                   p.Message(p.MsgType.CURSOR_MOVE, p.CURSOR_MOVE.pack(3, 4))]


def test_a_limit_set_between_two_messages_of_one_read_judges_the_second():
    parser = p.Parser(p.GUEST_TO_HOST_LIMITS, skip_oversized=True)
    parser.push(p.format_msg(8, 8) + p.encode(p.MsgType.DATA, bytes(100)))
    assert parser.next().type == p.MsgType.FORMAT
    parser.set_limit(p.MsgType.DATA, 50)
    assert isinstance(parser.next(), p.Violation)
    assert parser.next() is None


def test_drop_forgets_a_half_message_and_stays_in_step():
    parser = p.Parser(p.GUEST_TO_HOST_LIMITS)
    frame = p.encode(p.MsgType.DATA, b"\x01\x00\x07\x00" * 50_000)
    parser.feed(p.cursor_move(1, 1) + frame[:150_000])
    assert parser.buffered >= 100_000
    parser.drop()
    assert parser.buffered == 0
    assert parser.feed(frame[150_000:] + p.cursor_move(5, 6)) == [
        p.Message(p.MsgType.CURSOR_MOVE, p.CURSOR_MOVE.pack(5, 6))]
