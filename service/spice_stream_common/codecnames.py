"""SPICE's video codecs by id and name, and a preference list of them as the configuration writes
it (the service checks it, the worker uses it)."""

from __future__ import annotations

import enum


class Codec(enum.IntEnum):
    """SpiceVideoCodecType (spice/enums.h): what START_STOP lists and FORMAT names."""

    MJPEG = 1
    VP8 = 2
    H264 = 3
    VP9 = 4
    H265 = 5

    @property
    def label(self) -> str:
        return self.name.lower()


def parse_preference(text: str) -> tuple[Codec, ...]:
    """A preference list as written in the configuration ("h264 vp8 mjpeg", commas or spaces);
    ValueError names what is not a codec. MJPEG is added at the end when missing: the host always
    accepts it, and a stream must have some codec."""
    names = [w for w in text.replace(",", " ").split() if w]
    known = {c.label: c for c in Codec}
    unknown = [w for w in names if w.lower() not in known]
    if unknown:
        raise ValueError(f"unknown codec {unknown[0]!r} (known: {', '.join(known)})")
    chosen: list[Codec] = []
    for w in names:
        c = known[w.lower()]
        if c not in chosen:
            chosen.append(c)
    if Codec.MJPEG not in chosen:
        chosen.append(Codec.MJPEG)
    return tuple(chosen)
