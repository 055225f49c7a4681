#!/usr/bin/python3
"""Runs INSIDE the VM as the Wayland session's user (DBUS_SESSION_BUS_ADDRESS set): mutter's
org.gnome.Mutter.DisplayConfig, as GNOME's Settings uses it.

    displayconfig.py state         JSON: serial, the primary monitor's connector, its current and
                                   available sizes
    displayconfig.py apply WxH     the primary monitor in the first mode of that size (temporary:
                                   ApplyMonitorsConfig method 1), prints the mode id
"""

import json
import sys

from gi.repository import Gio, GLib

NAME = "org.gnome.Mutter.DisplayConfig"
PATH = "/org/gnome/Mutter/DisplayConfig"


def call(bus, method, args=None, reply=None):
    res = bus.call_sync(NAME, PATH, NAME, method, args, GLib.VariantType(reply) if reply else None,
                        Gio.DBusCallFlags.NONE, 30000, None)
    return res.unpack() if res is not None else None


def state(bus):
    serial, monitors, logical, _props = call(bus, "GetCurrentState", None,
                                             "(ua((ssss)a(siiddada{sv})a{sv})a(iiduba(ssss)a{sv})a{sv})")
    primary = next((lm for lm in logical if lm[4]), logical[0] if logical else None)
    connector = primary[5][0][0] if primary else monitors[0][0][0]
    mon = next(m for m in monitors if m[0][0] == connector)
    modes = [{"id": m[0], "width": m[1], "height": m[2], "refresh": m[3],
              "current": bool(m[6].get("is-current")), "preferred": bool(m[6].get("is-preferred"))}
             for m in mon[1]]
    current = next((m for m in modes if m["current"]), None)
    return {"serial": serial, "connector": connector, "current": current,
            "scale": primary[2] if primary else 1.0,
            "sizes": sorted({(m["width"], m["height"]) for m in modes})}, mon


def main(argv):
    bus = Gio.bus_get_sync(Gio.BusType.SESSION, None)
    st, mon = state(bus)
    if argv[1] == "state":
        print(json.dumps(st))
        return 0
    if argv[1] == "apply":
        w, h = (int(x) for x in argv[2].split("x"))
        mode = next((m for m in mon[1] if (m[1], m[2]) == (w, h)), None)
        if mode is None:
            print(f"no {w}x{h} mode on {st['connector']}: {st['sizes']}", file=sys.stderr)
            return 1
        config = [(0, 0, st["scale"], 0, True, [(st["connector"], mode[0], {})])]
        call(bus, "ApplyMonitorsConfig",
             GLib.Variant("(uua(iiduba(ssa{sv}))a{sv})", (st["serial"], 1, config, {})))
        print(mode[0])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
