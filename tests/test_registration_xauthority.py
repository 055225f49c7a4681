"""Display and Xauthority parsing: well-formed files, and hostile inputs refused with a named error."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spice_stream_common.xauthority import (
    FAMILY_INTERNET,
    FAMILY_LOCAL,
    FAMILY_WILD,
    MAX_XAUTHORITY_BYTES,
    BadXauthority,
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
    with pytest.raises(BadXauthority, match="not a local X display"):
        display_number(display)


def test_parse_round_trip():
    data = entry(FAMILY_LOCAL, b"host", b"0", b"MIT-MAGIC-COOKIE-1", COOKIE) + \
        entry(FAMILY_WILD, b"", b"5", b"MIT-MAGIC-COOKIE-1", COOKIE)
    entries = parse_xauthority(data)
    assert [(e.family, e.number) for e in entries] == [(FAMILY_LOCAL, b"0"), (FAMILY_WILD, b"5")]
    assert entries[0].data == COOKIE


def test_cookie_for_display_found():
    data = entry(FAMILY_LOCAL, b"h", b"3", b"MIT-MAGIC-COOKIE-1", COOKIE)
    assert require_cookie_for(data, ":3.0", hostname=b"h").number == b"3"


def test_gdm_file_with_empty_display_numbers_accepted():
    """GDM's /run/user/UID/gdm/Xauthority: a FamilyWild entry and a host entry, both with an
    empty display number, which libXau takes for any display."""
    wild = entry(FAMILY_WILD, b"", b"", b"MIT-MAGIC-COOKIE-1", COOKIE)
    host = entry(FAMILY_LOCAL, b"guest", b"", b"MIT-MAGIC-COOKIE-1", COOKIE)
    assert require_cookie_for(wild + host, ":0", hostname=b"guest").family == FAMILY_WILD
    assert require_cookie_for(host, ":1024", hostname=b"guest").address == b"guest"


@pytest.mark.parametrize("data", [
    # another host's entry: libXau would not hand it to a client on this one
    entry(FAMILY_LOCAL, b"elsewhere", b"", b"MIT-MAGIC-COOKIE-1", COOKIE),
    entry(FAMILY_LOCAL, b"elsewhere", b"3", b"MIT-MAGIC-COOKIE-1", COOKIE),
    # FamilyLocalHost and network families are not what a local client asks for
    entry(252, b"h", b"3", b"MIT-MAGIC-COOKIE-1", COOKIE),
    entry(FAMILY_INTERNET, b"\x7f\0\0\1", b"", b"MIT-MAGIC-COOKIE-1", COOKIE),
    # a scheme the worker cannot speak
    entry(FAMILY_WILD, b"", b"3", b"XDM-AUTHORIZATION-1", COOKIE),
    # the first match is libXau's answer: an empty cookie there cannot work
    entry(FAMILY_WILD, b"", b"", b"MIT-MAGIC-COOKIE-1", b"")
    + entry(FAMILY_WILD, b"", b"3", b"MIT-MAGIC-COOKIE-1", COOKIE),
])
def test_entries_libxau_would_not_use_refused(data):
    with pytest.raises(BadXauthority, match="no cookie for local display :3 on this host"):
        require_cookie_for(data, ":3", hostname=b"h")


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
    with pytest.raises(BadXauthority, match=match):
        require_cookie_for(data, ":3", hostname=b"h")


@given(st.binary(max_size=2048))
def test_parser_never_raises_anything_else(data):
    try:
        parse_xauthority(data)
    except BadXauthority:
        pass


@given(st.lists(st.tuples(st.integers(0, 65535), st.binary(max_size=40), st.binary(max_size=6),
                          st.binary(max_size=20), st.binary(max_size=40)), max_size=20))
def test_parser_reads_back_what_was_written(fields):
    data = b"".join(entry(*f) for f in fields)
    assert [(e.family, e.address, e.number, e.name, e.data) for e in parse_xauthority(data)] == fields
