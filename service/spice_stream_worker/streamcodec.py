"""The stream's codec and its encoder: chosen on each START_STOP from the preference, the host's
offer and what this guest encodes; the JPEG tile encoder for MJPEG, one video encoder per frame
size for the others; MJPEG again when a video encoder fails."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from spice_stream_common.codecnames import Codec
from spice_stream_common.exitcodes import DisplayUnavailable

from . import codecs
from .codecs import Encodable
from .encoder import JpegEncoder
from .geometry import Rect
from .source import Frame
from .videoencoder import Settings, VideoEncoder, VideoEncoderError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoded:
    """A frame as it goes out: its pieces (a JPEG's header, bands and end; one access unit for a
    video codec) and whether a decoder needs nothing before it (every JPEG; a keyframe)."""

    parts: tuple[bytes, ...]
    key: bool


def probe_registry() -> Encodable:
    """What this guest's GStreamer can encode (MJPEG only without it), said in one log line."""
    try:
        from .gstreamer import Media

        media = Media("video encoding")
        found = codecs.probe(media.Gst.ElementFactory.find)
    except DisplayUnavailable as exc:
        log.info("video codecs: none (%s): MJPEG only", exc)
        return codecs.probe(None)
    log.info("video codecs: %s", found.summary())
    return found


VideoFactory = Callable[[Codec, codecs.Candidate, int, int, Settings], VideoEncoder]


class StreamCodec:
    """Owns the video encoder it makes (close() closes it). `preference` is the configured order;
    with MJPEG alone, GStreamer is never loaded."""

    def __init__(self, jpeg: JpegEncoder, preference: tuple[Codec, ...] = (Codec.MJPEG,),
                 settings: Settings | None = None,
                 probe: Callable[[], Encodable] = probe_registry,
                 video: VideoFactory = VideoEncoder) -> None:
        self.jpeg = jpeg
        self.preference = preference
        self.settings = settings or Settings()
        self._probe = probe
        self._video_factory = video
        self._encodable: Encodable | None = None
        self._broken: set[Codec] = set()  # failed in this worker: not chosen again
        self._video: VideoEncoder | None = None
        self._key_wanted = True
        self.codec: Codec | None = None

    def encodable(self) -> Encodable:
        if self._encodable is None:
            wants_video = any(c != Codec.MJPEG for c in self.preference)
            self._encodable = self._probe() if wants_video else codecs.probe(None)
        return self._encodable

    def choose(self, offered: tuple[int, ...]) -> Codec | None:
        """The codec for this offer (None: nothing this guest can send); the next frame is a
        keyframe whatever it is (a client that just joined needs one)."""
        usable = self.encodable()
        if self._broken:
            usable = Encodable({c: e for c, e in usable.encoders.items() if c not in self._broken},
                               usable.missing)
        chosen = codecs.choose(self.preference, offered, usable)
        if chosen != self.codec:
            self._close_video()
        self.codec = chosen
        self._key_wanted = True
        return chosen

    def want_keyframe(self) -> None:
        """The next frame is a keyframe (the service lost a frame of the chain)."""
        self._key_wanted = True

    @property
    def video(self) -> bool:
        """Whether frames depend on the ones before them (a video codec)."""
        return self.codec not in (None, Codec.MJPEG)

    def encode(self, frame: Frame, changed: list[Rect] | None) -> Encoded:
        """The frame in the chosen codec: for MJPEG the tiles of `changed` re-encoded (None:
        whole), for a video codec the whole frame (for H.264 converted where it changed).
        VideoEncoderError: the video encoder failed (logged); the codec is given up for this
        worker and choose() must be asked again."""
        if not self.video:
            return Encoded(self.jpeg.encode_parts(frame, changed), True)
        assert self.codec is not None
        try:
            if self._video is None or self._video.size != (frame.width, frame.height):
                self._close_video()
                candidate = self.encodable().encoders[self.codec]
                self._video = self._video_factory(self.codec, candidate, frame.width,
                                                  frame.height, self.settings)
                log.info("encoding %s with %s at %dx%d", self.codec.label, candidate.element,
                         frame.width, frame.height)
            unit, key = self._video.encode(frame, keyframe=self._key_wanted, changed=changed)
        except (VideoEncoderError, DisplayUnavailable) as exc:
            log.error("%s: %s: streaming without it", self.codec.label, exc)
            self._broken.add(self.codec)
            self._close_video()
            raise VideoEncoderError(str(exc)) from None
        self._key_wanted = False
        return Encoded((unit,), key)

    def _close_video(self) -> None:
        if self._video is not None:
            self._video.close()
            self._video = None

    def close(self) -> None:
        self._close_video()
