"""Display and Xauthority parsing: well-formed files, and hostile inputs refused with a named error."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spice_streamd.errors import InvalidArgument
from spice_streamd.xauthority import (
    FAMILY_INTERNET,
    FAMILY_LOCAL,
    FAMILY_WILD,
    MAX_XAUTHORITY_BYTES,
    display_number,
    parse_xauthority,
    require_cookie_for,
)


def entry(family: int, address: bytes, number: bytes, name: bytes, data: bytes) -> bytes:
    out = struct.pack(">H", family)
    for field in (address, number, name, data):
        out += struct.pack(">H", len(field)) + field
    return out


COOKIE = bytes(range(16))


@pytest.mark.parametrize("display,number", [(":0", 0), (":1", 1), (":12.0", 12), (":9999.99", 9999)])
def test_local_displays_accepted(display, number):
    assert display_number(display) == number


@pytest.mark.parametrize("display", ["", "host:0", ":0; rm", ":", ":a", "0", ":12345", ":0.123",
                                     "unix:0", ":0\n", " :0", ":0 ", "localhost:10.0", "x" * 10000])
def test_other_displays_refused(display):
    with pytest.raises(InvalidArgument, match="not a local X display"):
        display_number(display)


def test_parse_round_trip():
    data = entry(FAMILY_LOCAL, b"host", b"0", b"MIT-MAGIC-COOKIE-1", COOKIE) + \
        entry(FAMILY_WILD, b"", b"5", b"MIT-MAGIC-COOKIE-1", COOKIE)
    entries = parse_xauthority(data)
    assert [(e.family, e.number) for e in entries] == [(FAMILY_LOCAL, b"0"), (FAMILY_WILD, b"5")]
    assert entries[0].data == COOKIE


def test_cookie_for_display_found():
    data = entry(FAMILY_LOCAL, b"h", b"3", b"MIT-MAGIC-COOKIE-1", COOKIE)
    assert require_cookie_for(data, ":3.0").number == b"3"


@pytest.mark.parametrize("data,match", [
    (b"", "empty"),
    (entry(FAMILY_LOCAL, b"h", b"4", b"MIT-MAGIC-COOKIE-1", COOKIE), "no cookie for local display :3"),
    (entry(FAMILY_INTERNET, b"\x7f\0\0\1", b"3", b"MIT-MAGIC-COOKIE-1", COOKIE), "no cookie"),
    (entry(FAMILY_LOCAL, b"h", b"3", b"", COOKIE), "no cookie"),
    (entry(FAMILY_LOCAL, b"h", b"3", b"MIT-MAGIC-COOKIE-1", b""), "no cookie"),
    (entry(FAMILY_LOCAL, b"h", b"3", b"MIT-MAGIC-COOKIE-1", COOKIE)[:-1], "truncated"),
    (b"\x01", "truncated"),
    (b"\x01\x00\xff\xff", "truncated"),
    (b"#!/bin/sh\necho hello\n", "truncated|no cookie"),
    (b"\0" * (MAX_XAUTHORITY_BYTES + 1), "larger than"),
])
def test_hostile_files_refused(data, match):
    with pytest.raises(InvalidArgument, match=match):
        require_cookie_for(data, ":3")


@given(st.binary(max_size=2048))
def test_parser_never_raises_anything_else(data):
    try:
        parse_xauthority(data)
    except InvalidArgument:
        pass


@given(st.lists(st.tuples(st.integers(0, 65535), st.binary(max_size=40), st.binary(max_size=6),
                          st.binary(max_size=20), st.binary(max_size=40)), max_size=20))
def test_parser_reads_back_what_was_written(fields):
    data = b"".join(entry(*f) for f in fields)
    assert [(e.family, e.address, e.number, e.name, e.data) for e in parse_xauthority(data)] == fields
