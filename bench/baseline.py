"""Naive baseline like the reference C++ agent: GetImage of the whole screen + full JPEG, fixed fps."""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys

from PIL import Image
from Xlib import X
from Xlib import display as xdisplay

from spice_stream_common import protocol as p

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from content import FixedRate  # noqa: E402


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", required=True, help="pty (raw) where DATA messages go")
    ap.add_argument("--fps", type=int, default=60)
    ap.add_argument("--quality", type=int, default=80)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fd = os.open(args.device, os.O_WRONLY | os.O_NOCTTY)
    disp = xdisplay.Display()
    root = disp.screen().root
    geom = root.get_geometry()
    width, height = geom.width, geom.height
    write_all(fd, p.format_msg(width, height))
    pace = FixedRate(args.fps)
    while True:
        # Whether or not anything changed: capture everything, encode everything.
        image = root.get_image(0, 0, width, height, X.ZPixmap, 0xFFFFFFFF)
        rgb = Image.frombuffer("RGB", (width, height), image.data, "raw", "BGRX", width * 4, 1)
        out = io.BytesIO()
        rgb.save(out, "JPEG", quality=args.quality, subsampling=2)
        jpeg = out.getvalue()
        write_all(fd, p.data_header(len(jpeg)) + jpeg)
        pace.wait()


if __name__ == "__main__":
    sys.exit(main())
