"""Bench painter process: animates a desktop-like picture on the X display named by $DISPLAY.

Modes: full (whole screen scrolls), region (a 480x270 region scrolls), static, typing (a few glyphs per
step, like someone typing), pointer (the pointer moves through XTest, nothing is drawn), marker (a 64x64
square whose colour is the step number) and fullmarker (whole screen scrolls, plus the marker).
The marker modes record time.monotonic() just before each step's requests and, on SIGTERM, print
{"sends": [[step, t], ...]} on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from content import (  # noqa: E402
    GLYPH_H,
    GLYPH_W,
    MARKER_AT,
    MARKER_SIZE,
    WORDS,
    FixedRate,
    desktop,
    join_cells,
    marker_pixel,
    text_cells,
    to_bgrx,
)
from Xlib import X  # noqa: E402
from Xlib import display as xdisplay  # noqa: E402
from Xlib.ext import xtest  # noqa: E402

# typing: an editor area of TYPE_COLS x TYPE_ROWS cells, TYPE_CHUNK glyphs per step
TYPE_AT = (240, 300)
TYPE_COLS, TYPE_ROWS, TYPE_LINE = 99, 18, 20
TYPE_CHUNK = 3


def upload(disp, pixmap, gc, width: int, height: int, bgrx: bytes, x: int = 0, y0: int = 0) -> None:
    rows_per = max(1, (disp.display.info.max_request_length * 4 - 64) // (width * 4))
    for y in range(0, height, rows_per):
        rows = min(rows_per, height - y)
        pixmap.put_image(gc, x, y0 + y, width, rows, X.ZPixmap, 24,
                         0, bgrx[y * width * 4:(y + rows) * width * 4])


def typing_chunks() -> list[list[bytes]]:
    """Two screenfuls of different text, as TYPE_CHUNK-glyph images: a second pass changes pixels."""
    rng = random.Random(7)
    texts = []
    for _ in range(2):
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < TYPE_COLS * TYPE_ROWS:
            words.append(rng.choice(WORDS))
        text = " ".join(words)[:TYPE_COLS * TYPE_ROWS]
        cells = text_cells(text)
        texts.append([join_cells(cells[i:i + TYPE_CHUNK]) for i in range(0, len(cells), TYPE_CHUNK)])
    return texts


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["full", "region", "static", "typing", "pointer", "marker",
                                     "fullmarker"])
    ap.add_argument("--rate", type=float, default=100.0, help="animation steps per second")
    ap.add_argument("--region", default="480x270+720+405")
    args = ap.parse_args()
    stopping = False

    def on_term(*_: object) -> None:
        nonlocal stopping
        stopping = True

    if args.mode in MARKER_AT:
        signal.signal(signal.SIGTERM, on_term)
    disp = xdisplay.Display()
    screen = disp.screen()
    root = screen.root
    geom = root.get_geometry()
    width, height = geom.width, geom.height
    gc = root.create_gc(subwindow_mode=X.IncludeInferiors)
    # Twice as wide as the screen so a horizontal scroll can wrap without a seam.
    src = desktop(width, height)
    pix = root.create_pixmap(2 * width, height, screen.root_depth)
    upload(disp, pix, gc, width, height, to_bgrx(src))
    pix.copy_area(gc, pix, 0, 0, width, height, width, 0)
    root.copy_area(gc, pix, 0, 0, width, height, 0, 0)
    mark_gc = root.create_gc(foreground=marker_pixel(0))
    mx, my = MARKER_AT.get(args.mode, (0, 0))
    if args.mode in MARKER_AT:
        root.fill_rectangle(mark_gc, mx, my, MARKER_SIZE, MARKER_SIZE)
    chunks = typing_chunks() if args.mode == "typing" else []
    if chunks:
        edit_gc = root.create_gc(foreground=0xFAFAFA)
        root.fill_rectangle(edit_gc, TYPE_AT[0] - 8, TYPE_AT[1] - 8, TYPE_COLS * GLYPH_W + 16,
                            TYPE_ROWS * TYPE_LINE + 16)
    disp.sync()
    print("ready", flush=True)
    if args.mode == "static":
        sys.stdin.read()
        return 0
    size, _, pos = args.region.partition("+")
    rw, rh = (int(v) for v in size.split("x"))
    rx, ry = (int(v) for v in pos.split("+"))
    step = 0
    sends: list[tuple[int, float]] = []
    pace = FixedRate(args.rate)
    while not stopping:
        step += 1
        offset = (step * 7) % width
        if args.mode == "full":
            root.copy_area(gc, pix, offset, 0, width, height, 0, 0)
            disp.sync()
        elif args.mode == "region":
            root.copy_area(gc, pix, rx + offset, ry, rw, rh, rx, ry)
            disp.sync()
        elif args.mode == "typing":
            per_screen = TYPE_COLS * TYPE_ROWS // TYPE_CHUNK
            index = (step - 1) % per_screen
            chunk = chunks[(step - 1) // per_screen % 2][index]
            col = index * TYPE_CHUNK % TYPE_COLS
            row = index * TYPE_CHUNK // TYPE_COLS
            root.put_image(gc, TYPE_AT[0] + col * GLYPH_W, TYPE_AT[1] + row * TYPE_LINE,
                           len(chunk) // (4 * GLYPH_H), GLYPH_H, X.ZPixmap, 24, 0, chunk)
            disp.sync()
        elif args.mode == "pointer":
            angle = step * 2 * math.pi / 120
            xtest.fake_input(disp, X.MotionNotify, x=int(width / 2 + 300 * math.cos(angle)),
                             y=int(height / 2 + 200 * math.sin(angle)))
            disp.sync()
        elif args.mode == "marker":
            sends.append((step, time.monotonic()))
            mark_gc.change(foreground=marker_pixel(step))
            root.fill_rectangle(mark_gc, mx, my, MARKER_SIZE, MARKER_SIZE)
            disp.flush()
        else:  # fullmarker: the scroll and the marker as one change (no capture sees one alone)
            sends.append((step, time.monotonic()))
            disp.grab_server()
            root.copy_area(gc, pix, offset, 0, width, height, 0, 0)
            mark_gc.change(foreground=marker_pixel(step))
            root.fill_rectangle(mark_gc, mx, my, MARKER_SIZE, MARKER_SIZE)
            disp.ungrab_server()
            disp.flush()
        pace.wait()
    disp.sync()
    print(json.dumps({"sends": sends}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
