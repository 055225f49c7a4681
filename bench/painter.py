"""Bench painter process: animates a desktop-like picture on the X display named by $DISPLAY."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from content import FixedRate, desktop, to_bgrx  # noqa: E402
from Xlib import X  # noqa: E402
from Xlib import display as xdisplay  # noqa: E402


def upload(disp, pixmap, gc, width: int, height: int, bgrx: bytes) -> None:
    rows_per = max(1, (disp.display.info.max_request_length * 4 - 64) // (width * 4))
    for y in range(0, height, rows_per):
        rows = min(rows_per, height - y)
        pixmap.put_image(gc, 0, y, width, rows, X.ZPixmap, 24,
                         0, bgrx[y * width * 4:(y + rows) * width * 4])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["full", "region", "static"])
    ap.add_argument("--rate", type=float, default=100.0, help="animation steps per second")
    ap.add_argument("--region", default="480x270+720+405")
    args = ap.parse_args()
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
    disp.sync()
    print("ready", flush=True)
    if args.mode == "static":
        sys.stdin.read()
        return 0
    size, _, pos = args.region.partition("+")
    rw, rh = (int(v) for v in size.split("x"))
    rx, ry = (int(v) for v in pos.split("+"))
    step = 0
    pace = FixedRate(args.rate)
    while True:
        step += 1
        offset = (step * 7) % width
        if args.mode == "full":
            root.copy_area(gc, pix, offset, 0, width, height, 0, 0)
        else:
            root.copy_area(gc, pix, rx + offset, ry, rw, rh, rx, ry)
        disp.sync()
        pace.wait()


if __name__ == "__main__":
    sys.exit(main())
