"""codecs: the preference list as configured, what a registry offers (stand-in registries: a guest
with a VA-API encoder, one without GStreamer's -ugly, none at all), and the choice for an offer."""

from __future__ import annotations

import pytest

from spice_stream_common.codecnames import Codec, parse_preference
from spice_stream_worker import codecs

BASE = {"appsrc", "videoconvert", "appsink"}


def registry(*elements: str):
    """A stand-in for Gst.ElementFactory.find over these elements."""
    have = set(elements)
    return lambda name: object() if name in have else None


def test_preference_is_read_in_order_with_mjpeg_last_when_left_out():
    assert parse_preference("h264 vp8") == (Codec.H264, Codec.VP8, Codec.MJPEG)
    assert parse_preference("VP9, mjpeg,h264") == (Codec.VP9, Codec.MJPEG, Codec.H264)
    assert parse_preference("vp8 vp8") == (Codec.VP8, Codec.MJPEG)
    assert parse_preference("") == (Codec.MJPEG,)


def test_an_unknown_codec_is_named():
    with pytest.raises(ValueError, match="unknown codec 'av1'"):
        parse_preference("h264 av1")


def test_a_hardware_encoder_is_chosen_before_software_when_it_registers():
    found = codecs.probe(registry(*BASE, "vah264enc", "h264parse", "x264enc", "vp8enc"))
    assert found.encoders[Codec.H264].element == "vah264enc"
    assert found.encoders[Codec.H264].hardware
    assert found.encoders[Codec.VP8].element == "vp8enc"
    assert found.missing == {Codec.VP9: "install gstreamer1.0-plugins-good"}
    assert found.summary() == ("encodes mjpeg (Pillow), h264 (vah264enc, hardware), vp8 (vp8enc); "
                               "not vp9 (install gstreamer1.0-plugins-good)")


def test_a_hardware_h264_encoder_without_h264parse_is_not_used():
    """Its output is made Annex-B by h264parse; without it, x264enc (or nothing)."""
    found = codecs.probe(registry(*BASE, "vah264enc", "x264enc"))
    assert found.encoders[Codec.H264].element == "x264enc"
    found = codecs.probe(registry(*BASE, "vah264enc"))
    assert Codec.H264 not in found.encoders
    assert found.missing[Codec.H264] == "install gstreamer1.0-plugins-ugly"


def test_without_the_base_elements_or_gstreamer_only_mjpeg():
    found = codecs.probe(registry("x264enc", "vp8enc", "appsink"))
    assert found.encoders == {}
    assert set(found.missing.values()) == {"install gstreamer1.0-plugins-base"}
    none = codecs.probe(None)
    assert none.encoders == {} and none.can(Codec.MJPEG) and not none.can(Codec.H264)
    assert "no GStreamer" in none.summary()


@pytest.mark.parametrize("preference, offered, expected", [
    ("h264 vp8", (1, 2, 3), Codec.H264),
    ("h264 vp8", (1, 2), Codec.VP8),  # a client that cannot decode H.264 joined
    ("h264 vp8", (1,), Codec.MJPEG),
    ("vp9 h264", (1, 3, 4), Codec.H264),  # VP9 offered, but this guest cannot encode it
    ("mjpeg h264", (1, 3), Codec.MJPEG),  # the order is the preference's, not the host's
    ("h264", (3,), Codec.H264),
    ("h264", (2,), None),  # nothing this guest can send
    ("h264", (), None),  # the last client left
])
def test_the_first_preferred_codec_the_host_offers_and_the_guest_encodes(preference, offered, expected):
    found = codecs.probe(registry(*BASE, "x264enc", "vp8enc"))
    assert codecs.choose(parse_preference(preference), offered, found) == expected


def test_codec_ids_are_spice_s():
    # spice/enums.h, SpiceVideoCodecType
    assert [(c.label, int(c)) for c in Codec] == [("mjpeg", 1), ("vp8", 2), ("h264", 3),
                                                    ("vp9", 4), ("h265", 5)]
