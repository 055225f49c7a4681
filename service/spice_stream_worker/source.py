"""The one small interface every capture source gives the streamer and the worker's loop:
what changed (damage, size, cursor, pointer), the pixels, the cursor image, a file to wait on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .cursor import CursorImage
from .geometry import Rect


@dataclass
class Changes:
    """What poll() saw since the last poll."""

    damage: list[Rect] = field(default_factory=list)
    resized: bool = False
    cursor_changed: bool = False
    pointer_moved: bool = False

    def __bool__(self) -> bool:
        return bool(self.damage or self.resized or self.cursor_changed or self.pointer_moved)


@dataclass
class Frame:
    """The screen's framebuffer: BGRX, 4 bytes per pixel, rows `stride` bytes apart.

    `pixels` may be a view of shared memory: it is valid until the next grab() or close().
    `changed` lists what the last grab() found changed (None: the whole frame, unchecked;
    empty: the damage held no new pixels).
    """

    width: int
    height: int
    stride: int
    pixels: memoryview
    changed: list[Rect] | None = None

    def packed(self) -> bytes:
        """The pixels with rows width * 4 bytes apart, copied (GStreamer keeps a buffer while it
        works on it; these pixels may change under it)."""
        row = self.width * 4
        if self.stride == row:
            return bytes(self.pixels[:row * self.height])
        return b"".join(bytes(self.pixels[y * self.stride:y * self.stride + row])
                        for y in range(self.height))


class CaptureSource(Protocol):
    """A screen to stream. The worker's loop waits on fileno(), calls poll() when it is readable
    (or when needs_poll() says events are queued already), and the streamer calls grab() for
    the pixels of a frame, pointer_position() and cursor_image() when poll() said they changed."""

    @property
    def size(self) -> tuple[int, int]: ...

    @property
    def live(self) -> bool:
        """Whether there is a current picture to send. A source that can lose its picture for a
        while (the screen cast closed on the lock screen, between two streams) says False then:
        the streamer sends no frame (to the service only NO_PICTURE, its heartbeat), and poll()
        reports `resized` when a picture is back. X11's is always True."""
        ...

    def describe(self) -> str:
        """One phrase for the worker's start line (what it captures and how)."""
        ...

    def fileno(self) -> int: ...

    def needs_poll(self) -> bool: ...

    def poll(self) -> Changes: ...

    def grab(self, rects: list[Rect] | None = None) -> Frame: ...

    def pointer_position(self) -> tuple[int, int]: ...

    def cursor_image(self) -> CursorImage | None: ...

    def close(self) -> None: ...
