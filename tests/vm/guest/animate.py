#!/usr/bin/python3
"""Runs INSIDE the VM in a graphical session (Wayland: WAYLAND_DISPLAY and XDG_RUNTIME_DIR; X11:
DISPLAY and XAUTHORITY): a GTK 3 window of 480x270 whose square moves every frame the toolkit's
frame clock gives, for SECONDS seconds; prints JSON with how many frames it painted.

    animate.py SECONDS
"""

import json
import sys
import time

import gi

gi.require_version("Gtk", "3.0")
from gi.repository import GLib, Gtk  # noqa: E402

W, H = 480, 270


def main(argv):
    seconds = float(argv[1])
    drawn = {"n": 0, "first": None}
    win = Gtk.Window(title="spice-streamd VM suite: animation")
    win.set_default_size(W, H)
    area = Gtk.DrawingArea()
    win.add(area)

    def draw(_w, cr):
        n = drawn["n"]
        drawn["n"] += 1
        if drawn["first"] is None:
            drawn["first"] = time.monotonic()
        cr.set_source_rgb(0.1, 0.2, 0.5)
        cr.paint()
        x = (n * 7) % (W - 60)
        y = (n * 3) % (H - 60)
        cr.set_source_rgb(1.0, 0.8, 0.1)
        cr.rectangle(x, y, 60, 60)
        cr.fill()
        return False

    def tick(widget, _clock):
        widget.queue_draw()
        return True

    area.connect("draw", draw)
    area.add_tick_callback(tick)
    win.connect("destroy", Gtk.main_quit)
    win.show_all()
    t0 = time.monotonic()
    GLib.timeout_add(int(seconds * 1000), Gtk.main_quit)
    Gtk.main()
    elapsed = time.monotonic() - (drawn["first"] or t0)
    print(json.dumps({"frames": drawn["n"], "seconds": round(elapsed, 2),
                      "fps": round(drawn["n"] / elapsed, 1) if elapsed > 0 else 0}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
