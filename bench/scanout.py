"""Benchmark: the scanout reader's CPU per look (spice_stream_worker.sources.scanout), against a naive
reader that reads and compares the whole framebuffer at every look, in the same run.

Run: .venv/bin/python bench/scanout.py   [--size 1024x768] [--looks 300] [--rounds 3]

No DRM device is involved: the framebuffers are memfd buffers behind a stand-in for kms.Card, and the
service's grant is a function call. What the kernel's ioctls and the grant's round trip cost (a few
per look, one per second or per flip) is measured in the VM (tests/vm/README.md), not here; what this
measures is the reader's own work per look, the part that scales with the picture.

Workloads (one look per step, the screen changed before each look as said):
  still    nothing changes;
  console  a 8x2-pixel cursor blinks every 5th look (fbcon);
  box      a 256x128 box is painted in place at each look (QXL: mutter draws into its one buffer);
  flip     the box moves and the picture goes to the other of two buffers at each look (virtio-gpu:
           mutter flips between buffers).
Each look is the reader's poll() and, when it found a change, grab() of what changed, as the
worker's loop does (the JPEG encode after that is the same for any source and is left out).
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "service"))

from spice_stream_common import kms  # noqa: E402
from spice_stream_worker.damage import compare_frames  # noqa: E402
from spice_stream_worker.sources.scanout import Scanout  # noqa: E402

XR24 = kms.fourcc("XR24")
CRTC_ID = 40
BOX = (256, 128)  # 8 bands of 48 at 768 rows: an edit, under the reader's repaint share (a quarter)


class Buffer:
    """One framebuffer's memory (a memfd) and its GETFB2 answer."""

    def __init__(self, fb_id: int, width: int, height: int) -> None:
        self.meta = kms.Framebuffer(fb_id, width, height, XR24, width * 4, 0, 0, 0)
        self.fd = os.memfd_create(f"fb{fb_id}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, width * height * 4)
        self.map = mmap.mmap(self.fd, width * height * 4)
        # A desktop-like picture: bands of colour, not one value (a compare of equal bytes would
        # be too cheap to say anything).
        row = bytes((x * 7) & 0xFF for x in range(width * 4))
        for y in range(height):
            self.map[y * width * 4:(y + 1) * width * 4] = row[y % 64:] + row[:y % 64]

    def paint(self, x: int, y: int, w: int, h: int, value: int) -> None:
        stride = self.meta.width * 4
        line = bytes((value + i) & 0xFF for i in range(w * 4))
        for r in range(y, y + h):
            self.map[r * stride + x * 4:r * stride + (x + w) * 4] = line

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class Card:
    """The part of kms.Card the reader uses, over Buffers: one CRTC, no cursor plane."""

    path = "/dev/dri/bench"

    def __init__(self, width: int, height: int) -> None:
        self.size = (width, height)
        self.buffers = {fb_id: Buffer(fb_id, width, height) for fb_id in (71, 72)}
        self.shown = 71

    def crtcs(self) -> list[kms.Crtc]:
        return [self.crtc(CRTC_ID)]

    def crtc(self, crtc_id: int) -> kms.Crtc:
        return kms.Crtc(CRTC_ID, self.shown, 0, 0, *self.size, 60)

    def planes(self) -> list[kms.Plane]:
        return []

    def framebuffer(self, fb_id: int, handle: bool = True) -> kms.Framebuffer:
        return self.buffers[fb_id].meta

    def buffer_offset(self, handle: int, what: str = "") -> int:
        return handle << 20

    def map(self, fb: kms.Framebuffer, handle: int, offset: int | None = None) -> mmap.mmap:
        return mmap.mmap(self.buffers[fb.fb_id].fd, fb.pitch * fb.height, flags=mmap.MAP_SHARED,
                         prot=mmap.PROT_READ)

    def close_handle(self, handle: int) -> None:
        pass

    def close(self) -> None:
        for b in self.buffers.values():
            b.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Naive:
    """Reads the whole framebuffer at each look and compares it with the picture held."""

    def __init__(self, card: Card) -> None:
        self.card = card
        self.held: bytearray | None = None

    def look(self) -> int:
        w, h = self.card.size
        pixels = self.card.buffers[self.card.shown].map[:w * h * 4]
        if self.held is None:
            self.held = bytearray(pixels)
            return 1
        return len(compare_frames(self.held, pixels, w, h))


def change(workload: str, card: Card, step: int) -> None:
    """What changes on the screen before look `step`."""
    w, h = card.size
    bw, bh = BOX
    if workload == "console" and step % 5 == 0:
        card.buffers[card.shown].paint(8, h - 20, 8, 2, 0xFF * (step // 5 % 2))
    elif workload == "box":
        card.buffers[card.shown].paint(w // 3, h // 3, bw, bh, step)
    elif workload == "flip":
        card.shown = 72 if card.shown == 71 else 71
        x = (step * 8) % (w - bw)
        card.buffers[card.shown].paint(x, h // 3, bw, bh, step)


def measure(workload: str, engine: str, size: tuple[int, int], looks: int) -> tuple[float, int]:
    """CPU ms per look over `looks` looks after a warm-up, and how many looks found a change."""
    card = Card(*size)
    clock = Clock()
    try:
        if engine == "reader":
            src = Scanout(card, lambda fb_id: fb_id, fps=60, clock=clock)
            looker = src
        else:
            naive = Naive(card)
        found = 0
        for step in range(-20, looks):  # 20 looks of warm-up: the first reads whole
            if step == 0:
                t0, found = time.process_time(), 0
            change(workload, card, step)
            clock.now += 0.1
            if engine == "reader":
                changes = looker.poll()
                if changes:
                    looker.grab(changes.damage or None)
                    found += 1
            else:
                found += naive.look() > 0
        cpu = time.process_time() - t0
        if engine == "reader":
            looker.close()  # closes the card too
        else:
            card.close()
        return 1000 * cpu / looks, found
    except BaseException:
        card.close()
        raise


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1024x768", help="WxH (QXL's default mode; virtio-vga's: 1280x800)")
    ap.add_argument("--looks", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each row; the median is shown")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    print(f"scanout reader vs a naive whole-read reader, {size[0]}x{size[1]}, {args.looks} looks, "
          f"median of {args.rounds} rounds (CPU ms per look: poll + grab of what changed)")
    print(f"{'workload':<9} {'reader ms':>10} {'naive ms':>9} {'ratio':>6} {'changes found':>22}")
    for workload in ("still", "console", "box", "flip"):
        rows = {}
        for engine in ("reader", "naive"):
            runs = [measure(workload, engine, size, args.looks) for _ in range(args.rounds)]
            rows[engine] = (statistics.median(r[0] for r in runs), runs[0][1])
        (r_ms, r_found), (n_ms, n_found) = rows["reader"], rows["naive"]
        print(f"{workload:<9} {r_ms:>10.3f} {n_ms:>9.3f} {r_ms / n_ms:>6.2f} "
              f"{f'{r_found} / {n_found} of {args.looks}':>22}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
