"""Which codec the stream uses: what this guest can encode (GStreamer's registry, looked at once),
and the choice for what the host offers."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from spice_stream_common.codecnames import Codec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One GStreamer encoder for a codec: its element, whether it is a hardware one, and what
    Debian package brings it."""

    element: str
    hardware: bool
    package: str


# Tried in this order; the first one the registry has is used. Hardware first: VA-API's encoders
# (gstreamer1.0-plugins-bad, rank none) register only where a VA device that encodes exists (a
# vGPU guest), and cost no guest CPU there. libspice-server's own encoder tunes x264enc and vp8enc
# the same way (server/gstreamer-encoder.c).
CANDIDATES: dict[Codec, tuple[Candidate, ...]] = {
    Codec.H264: (Candidate("vah264lpenc", True, "gstreamer1.0-plugins-bad"),
                 Candidate("vah264enc", True, "gstreamer1.0-plugins-bad"),
                 Candidate("x264enc", False, "gstreamer1.0-plugins-ugly")),
    Codec.VP8: (Candidate("vavp8enc", True, "gstreamer1.0-plugins-bad"),
                Candidate("vp8enc", False, "gstreamer1.0-plugins-good")),
    Codec.VP9: (Candidate("vavp9enc", True, "gstreamer1.0-plugins-bad"),
                Candidate("vp9enc", False, "gstreamer1.0-plugins-good")),
}
# What every video encoder's pipeline needs besides the encoder itself.
COMMON_ELEMENTS = (("appsrc", "gstreamer1.0-plugins-base"), ("videoconvert", "gstreamer1.0-plugins-base"),
                   ("appsink", "gstreamer1.0-plugins-base"))
# A hardware H.264 encoder's output is made Annex-B, one access unit a buffer, by h264parse.
H264_PARSER = ("h264parse", "gstreamer1.0-plugins-bad")

@dataclass(frozen=True)
class Encodable:
    """What this guest can encode: each video codec's chosen encoder, and for the others why not
    (the Debian package to install)."""

    encoders: dict[Codec, Candidate]
    missing: dict[Codec, str]

    def can(self, codec: Codec) -> bool:
        return codec == Codec.MJPEG or codec in self.encoders

    def summary(self) -> str:
        """One log line: each codec and its encoder, or what it lacks."""
        parts = ["mjpeg (Pillow)"]
        for codec in CANDIDATES:
            if codec in self.encoders:
                c = self.encoders[codec]
                parts.append(f"{codec.label} ({c.element}{', hardware' if c.hardware else ''})")
        lacking = [f"{codec.label} ({why})" for codec, why in self.missing.items()]
        return "encodes " + ", ".join(parts) + (f"; not {', '.join(lacking)}" if lacking else "")


def probe(find: Callable[[str], object | None] | None) -> Encodable:
    """The encoders the registry has (`find`: Gst.ElementFactory.find, or a stand-in; None:
    GStreamer could not be loaded, MJPEG only)."""
    if find is None:
        return Encodable({}, {c: "no GStreamer: python3-gi and gir1.2-gst-plugins-base-1.0"
                              for c in CANDIDATES})
    lacking_common = [pkg for element, pkg in COMMON_ELEMENTS if find(element) is None]
    encoders: dict[Codec, Candidate] = {}
    missing: dict[Codec, str] = {}
    for codec, candidates in CANDIDATES.items():
        if lacking_common:
            missing[codec] = f"install {lacking_common[0]}"
            continue
        found = next((c for c in candidates if find(c.element) is not None
                      and (codec != Codec.H264 or not c.hardware or find(H264_PARSER[0]) is not None)),
                     None)
        if found is not None:
            encoders[codec] = found
        else:
            missing[codec] = f"install {candidates[-1].package}"
    return Encodable(encoders, missing)


def choose(preference: Sequence[Codec], offered: Iterable[int], encodable: Encodable) -> Codec | None:
    """The first codec of `preference` that the host offers (START_STOP's list: what every
    connected client decodes) and this guest encodes; MJPEG if it is offered and nothing before
    it is; None when the host offers nothing this guest can send."""
    offer = set(offered)
    for codec in preference:
        if codec in offer and encodable.can(codec):
            return codec
    return Codec.MJPEG if Codec.MJPEG in offer else None
