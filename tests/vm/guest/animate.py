#!/usr/bin/python3
"""Runs INSIDE the VM in a graphical session (Wayland: WAYLAND_DISPLAY and XDG_RUNTIME_DIR; X11:
DISPLAY and XAUTHORITY): a GTK 3 window of 480x270 whose yellow square moves on every frame of the
toolkit's frame clock, for SECONDS seconds; prints JSON with how many frames it painted. With
COUNT_FILE, it also writes "frames monotonic-seconds" there every 0.2 s (replaced whole), so the
host can count the frames painted within its own measuring window.

No cairo drawing of its own: PyGObject hands a "draw" handler its cairo context only with
python3-gi-cairo, which the guests lack (the handler was never called: 0 frames). The square is a
widget with a CSS background, moved in a Gtk.Fixed; the frame clock's after-paint counts the frames.

    animate.py SECONDS [COUNT_FILE]
"""

import json
import os
import sys
import time

import gi

gi.require_version("Gtk", "3.0")
from gi.repository import GLib, Gtk  # noqa: E402

W, H, SIDE = 480, 270, 60
CSS = b"""
window, fixed { background-color: #1a3380; }
#square { background-color: #ffcc1a; }
"""


def main(argv):
    seconds = float(argv[1])
    painted = {"n": 0, "first": None}
    provider = Gtk.CssProvider()
    provider.load_from_data(CSS)
    win = Gtk.Window(title="spice-streamd VM suite: animation")
    win.set_default_size(W, H)
    Gtk.StyleContext.add_provider_for_screen(win.get_screen(), provider,
                                             Gtk.STYLE_PROVIDER_PRIORITY_APPLICATION)
    fixed = Gtk.Fixed()
    square = Gtk.EventBox()
    square.set_name("square")
    square.set_size_request(SIDE, SIDE)
    fixed.put(square, 0, 0)
    win.add(fixed)
    ticks = {"n": 0}

    def tick(_widget, _clock):
        n = ticks["n"] = ticks["n"] + 1
        fixed.move(square, (n * 7) % (W - SIDE), (n * 3) % (H - SIDE))
        return True

    def after_paint(_clock):
        painted["n"] += 1
        if painted["first"] is None:
            painted["first"] = time.monotonic()

    def realized(_widget):
        win.get_frame_clock().connect("after-paint", after_paint)

    win.connect("realize", realized)
    win.connect("destroy", Gtk.main_quit)
    fixed.add_tick_callback(tick)
    win.show_all()
    t0 = time.monotonic()
    GLib.timeout_add(int(seconds * 1000), Gtk.main_quit)
    if len(argv) > 2:
        path = argv[2]

        def write_count():
            with open(path + ".new", "w") as f:
                f.write(f"{painted['n']} {time.monotonic():.3f}\n")
            os.replace(path + ".new", path)
            return True

        write_count()
        GLib.timeout_add(200, write_count)
    Gtk.main()
    elapsed = time.monotonic() - (painted["first"] or t0)
    print(json.dumps({"frames": painted["n"], "seconds": round(elapsed, 2),
                      "fps": round(painted["n"] / elapsed, 1) if elapsed > 0 else 0}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
