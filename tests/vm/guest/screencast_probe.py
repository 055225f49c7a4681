#!/usr/bin/python3
"""Runs INSIDE the VM as the Wayland session's user (XDG_RUNTIME_DIR, DBUS_SESSION_BUS_ADDRESS set):
can mutter's ScreenCast be read from Python with GStreamer's pipewiresrc? (issue 16, the feasibility
probe of the VM suite's scenario P; Debian's python3, python3-gi, GStreamer, gstreamer1.0-pipewire).

    screencast_probe.py OUTDIR [VARIANT...]    run the variants (default: all), JSON on stdout

Each variant is one whole ScreenCast session, as a worker would run it: CreateSession({}),
RecordMonitor("", {"cursor-mode": <u>}), PipeWireStreamAdded(node), Start; then a GStreamer
pipeline `pipewiresrc <how the node is named> ! ... ! appsink` in PLAYING, the first frame saved as
OUTDIR/probe-VARIANT-first.png (waited for up to 25 s; for the first variant up to
PROBE_FIRST_FRAME_TIMEOUT s, to see whether a stream created while gnome-shell still starts gives
frames later), the frames counted each 0.5 s until the screen has settled (no frame for 2 s, at
most 12 s), then over a 3 s window of a static screen. Then the latest frame is saved as
OUTDIR/probe-VARIANT-last.png and OUTDIR/probe-VARIANT.hold is created: the host takes QEMU's
screendump and answers with OUTDIR/probe-VARIANT.dumped (waited for up to 60 s; frames that arrive
meanwhile are counted), so the two pictures are of the same moment. Last the pipeline and the
session are stopped (each step timed). Every time is from CreateSession. Failures are recorded
with their text.
"""

import json
import os
import subprocess
import sys
import time

import gi

gi.require_version("Gst", "1.0")
from gi.repository import Gio, GLib, Gst  # noqa: E402

try:
    gi.require_version("GstVideo", "1.0")
    from gi.repository import GstVideo  # noqa: E402
except (ValueError, ImportError):
    GstVideo = None

MUTTER = "org.gnome.Mutter.ScreenCast"
MUTTER_PATH = "/org/gnome/Mutter/ScreenCast"
SESSION_IFACE = "org.gnome.Mutter.ScreenCast.Session"
STREAM_IFACE = "org.gnome.Mutter.ScreenCast.Stream"
CONVERT = "videoconvert ! video/x-raw,format=BGRx"
SINK = "appsink name=sink sync=false max-buffers=2 drop=true"

# name: (the source and how it finds the node, its other properties, what sits between it and appsink,
# cursor-mode). {node} is the node id PipeWireStreamAdded gave.
VARIANTS = {
    # The worker's pipeline as planned: path, videoconvert, BGRx, no framerate constraint.
    "path": ("pipewiresrc path={node}", "", CONVERT, 1),
    # No videoconvert: does mutter offer BGRx itself? A framerate range; always-copy, do-timestamp.
    "range-copy-ts": ("pipewiresrc path={node}", "always-copy=true do-timestamp=true",
                      "video/x-raw,format=BGRx,framerate=[0/1,60/1]", 1),
    # The cursor hidden: the picture QEMU's screendump holds (QXL's cursor is not in it).
    "no-cursor": ("pipewiresrc path={node}", "", CONVERT, 0),
    # target-object names an object by its name or object.serial, not its id (PipeWire >= 0.3.64):
    # the node's serial, read with pw-dump.
    "target-serial": ("pipewiresrc target-object={serial}", "", CONVERT, 1),
    # The node's id as target-object (not-negotiated on Debian 12: see target-serial).
    "target-object": ("pipewiresrc target-object={node}", "", CONVERT, 1),
    # A fixed framerate (failed to negotiate on GNOME 50): what happens here.
    "fixed-30": ("pipewiresrc path={node}", "",
                 "videoconvert ! video/x-raw,format=BGRx,framerate=30/1", 1),
}

FIRST_FRAME_TIMEOUT = 25.0
SETTLE_MAX = 12.0
STATIC_WINDOW = 3.0
HOLD_TIMEOUT = 60.0


def node_serial(node_id):
    """The object.serial of PipeWire node `node_id` (pw-dump), or None."""
    try:
        out = subprocess.run(["pw-dump", str(node_id)], capture_output=True, text=True, timeout=20)
        for obj in json.loads(out.stdout or "[]"):
            if obj.get("id") == node_id:
                return (obj.get("info", {}).get("props", {}) or {}).get("object.serial")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        pass
    return None


def log(text):
    print(f"[{time.monotonic():.3f}] {text}", file=sys.stderr, flush=True)


class Probe:
    def __init__(self, outdir):
        self.outdir = outdir
        self.bus = Gio.bus_get_sync(Gio.BusType.SESSION, None)
        self.ctx = GLib.MainContext.default()
        self.signals = []
        self.first_variant = None

    def call(self, path, iface, method, args=None, reply=None, timeout_ms=30000):
        res = self.bus.call_sync(MUTTER, path, iface, method, args,
                                 GLib.VariantType(reply) if reply else None,
                                 Gio.DBusCallFlags.NONE, timeout_ms, None)
        return res.unpack() if res is not None else None

    def version(self):
        try:
            return self.call(MUTTER_PATH, "org.freedesktop.DBus.Properties", "Get",
                             GLib.Variant("(ss)", (MUTTER, "Version")), "(v)")[0]
        except GLib.Error as e:
            return f"error: {e.message}"

    def pump(self):
        while self.ctx.pending():
            self.ctx.iteration(False)

    def run(self, name):
        where, props, between, cursor = VARIANTS[name]
        r = {"variant": name, "cursor_mode": cursor, "ok": False}
        node = {}
        closed = []

        def on_added(_c, _s, _p, _i, _sig, params):
            node["id"] = params.unpack()[0]
            node["t"] = time.monotonic() - t0

        def on_closed(*_a):
            closed.append(round(time.monotonic() - t0, 3))

        t0 = time.monotonic()
        r["t0_monotonic"] = round(t0, 3)  # CLOCK_MONOTONIC: the journal's clock
        session = None
        pipeline = None
        try:
            session = self.call(MUTTER_PATH, MUTTER, "CreateSession",
                                GLib.Variant("(a{sv})", ({},)), "(o)")[0]
            r["t_create"] = round(time.monotonic() - t0, 3)
            sub_c = self.bus.signal_subscribe(None, SESSION_IFACE, "Closed", session, None,
                                              Gio.DBusSignalFlags.NONE, on_closed)
            stream = self.call(session, SESSION_IFACE, "RecordMonitor",
                               GLib.Variant("(sa{sv})", ("", {"cursor-mode": GLib.Variant("u", cursor)})),
                               "(o)")[0]
            sub_a = self.bus.signal_subscribe(None, STREAM_IFACE, "PipeWireStreamAdded", stream,
                                              None, Gio.DBusSignalFlags.NONE, on_added)
            self.signals += [sub_c, sub_a]
            self.call(session, SESSION_IFACE, "Start")
            r["t_start"] = round(time.monotonic() - t0, 3)
            deadline = time.monotonic() + 20
            while "id" not in node and not closed and time.monotonic() < deadline:
                self.ctx.iteration(False) or time.sleep(0.01)
            if "id" not in node:
                r["error"] = f"no PipeWireStreamAdded within 20 s (session closed at {closed})"
                return r
            r["node"] = node["id"]
            r["t_node"] = round(node["t"], 3)
            serial = node_serial(node["id"]) if "{serial}" in where else None
            if "{serial}" in where and serial is None:
                r["error"] = f"no object.serial for node {node['id']} in pw-dump"
                return r
            r["serial"] = serial
            desc = (f"{where.format(node=node['id'], serial=serial)} name=src {props} ! {between} ! "
                    f"{SINK}")
            r["pipeline"] = " ".join(desc.split())
            try:
                pipeline = Gst.parse_launch(desc)
            except GLib.Error as e:
                r["error"] = f"parse_launch: {e.message}"
                return r
            sink = pipeline.get_by_name("sink")
            gbus = pipeline.get_bus()
            r["set_state"] = pipeline.set_state(Gst.State.PLAYING).value_nick
            errors = []
            warnings = []
            stamps = []

            def pull(timeout_s):
                """One sample or None; errors and warnings from the bus are recorded."""
                self.pump()
                sample = sink.emit("try-pull-sample", int(timeout_s * Gst.SECOND))
                while True:
                    msg = gbus.pop_filtered(Gst.MessageType.ERROR | Gst.MessageType.WARNING)
                    if msg is None:
                        break
                    if msg.type == Gst.MessageType.ERROR:
                        err, dbg = msg.parse_error()
                        errors.append(f"{msg.src.get_name()}: {err.message} ({dbg})")
                    else:
                        err, dbg = msg.parse_warning()
                        warnings.append(f"{msg.src.get_name()}: {err.message} ({dbg})")
                if sample is not None:
                    buf = sample.get_buffer()
                    stamps.append((time.monotonic() - t0, buf.pts, buf.duration))
                return sample

            first = None
            first_timeout = float(os.environ.get("PROBE_FIRST_FRAME_TIMEOUT", FIRST_FRAME_TIMEOUT)
                                  if name == self.first_variant else FIRST_FRAME_TIMEOUT)
            deadline = time.monotonic() + first_timeout
            while first is None and not errors and not closed and time.monotonic() < deadline:
                first = pull(0.2)
            r["errors"] = errors
            r["warnings"] = warnings
            if first is None:
                why = "; ".join(errors) or (f"session closed at {closed}" if closed
                                            else "no error on the bus")
                r["error"] = f"no frame within {first_timeout:g} s: {why}"
                r["state"] = pipeline.get_state(0)[1].value_nick
                return r
            r["t_first_frame"] = round(stamps[0][0], 3)
            r["caps"] = first.get_caps().to_string()
            src_caps = pipeline.get_by_name("src").get_static_pad("src").get_current_caps()
            r["src_caps"] = src_caps.to_string() if src_caps else None
            r["first_png"] = self.save(first, f"probe-{name}-first.png", r)
            # Frames per 0.5 s until none came for 2 s (the screen-sharing indicator appears in
            # the top bar when a screencast starts: the screen changes once more).
            per_half = []
            settle_t0 = time.monotonic()
            latest = first
            while time.monotonic() - settle_t0 < SETTLE_MAX:
                n = 0
                end = time.monotonic() + 0.5
                while time.monotonic() < end:
                    s = pull(max(0.01, end - time.monotonic()))
                    if s is not None:
                        latest = s
                        n += 1
                per_half.append(n)
                if len(per_half) >= 4 and sum(per_half[-4:]) == 0:
                    break
            r["frames_per_half_second_while_settling"] = per_half
            r["settled"] = len(per_half) >= 4 and sum(per_half[-4:]) == 0
            n = 0
            end = time.monotonic() + STATIC_WINDOW
            while time.monotonic() < end:
                s = pull(max(0.01, end - time.monotonic()))
                if s is not None:
                    latest = s
                    n += 1
            r["static_frames"] = {"seconds": STATIC_WINDOW, "frames": n}
            r["last_png"] = self.save(latest, f"probe-{name}-last.png", r)
            hold = os.path.join(self.outdir, f"probe-{name}.hold")
            dumped = os.path.join(self.outdir, f"probe-{name}.dumped")
            if self.outdir and not os.environ.get("PROBE_NO_HOLD"):
                with open(hold, "w") as f:
                    f.write(str(time.monotonic()))
                n = 0
                end = time.monotonic() + HOLD_TIMEOUT
                while not os.path.exists(dumped) and time.monotonic() < end:
                    if pull(0.05) is not None:
                        n += 1
                r["hold"] = {"answered": os.path.exists(dumped), "frames_meanwhile": n}
            r["frames"] = len(stamps)
            pts = [p for _t, p, _d in stamps[:6]]
            r["pts_first"] = [None if p == Gst.CLOCK_TIME_NONE else p for p in pts]
            r["duration_first"] = [None if d == Gst.CLOCK_TIME_NONE else d
                                   for _t, _p, d in stamps[:3]]
            r["errors"] = errors
            r["warnings"] = warnings
            r["closed"] = closed
            r["ok"] = True
            return r
        except GLib.Error as e:
            r["error"] = f"D-Bus: {e.message}"
            return r
        finally:
            t1 = time.monotonic()
            if pipeline is not None:
                r["null_state"] = pipeline.set_state(Gst.State.NULL).value_nick
                r["t_set_null"] = round(time.monotonic() - t1, 3)
            if session is not None and not closed:
                t1 = time.monotonic()
                try:
                    self.call(session, SESSION_IFACE, "Stop")
                except GLib.Error as e:
                    r["stop_error"] = e.message
                r["t_stop"] = round(time.monotonic() - t1, 3)
            for sub in self.signals:
                self.bus.signal_unsubscribe(sub)
            self.signals = []
            self.pump()
            r["t_total"] = round(time.monotonic() - t0, 3)

    def save(self, sample, name, r):
        from PIL import Image

        caps = sample.get_caps()
        st = caps.get_structure(0)
        w, h = st.get_value("width"), st.get_value("height")
        fmt = st.get_value("format")
        buf = sample.get_buffer()
        ok, info = buf.map(Gst.MapFlags.READ)
        if not ok:
            r.setdefault("save_errors", []).append(f"{name}: buffer.map failed")
            return None
        try:
            data = bytes(info.data)
        finally:
            buf.unmap(info)
        stride = len(data) // h if h else 0
        if GstVideo is not None:
            vinfo = GstVideo.VideoInfo.new_from_caps(caps)
            if vinfo is not None:
                stride = vinfo.stride[0]
        raw = {"BGRx": "BGRX", "BGRA": "BGRA", "RGBx": "RGBX", "RGBA": "RGBA", "xRGB": "XRGB",
               "ARGB": "ARGB", "xBGR": "XBGR", "ABGR": "ABGR"}.get(fmt)
        r.setdefault("frame_info", {})[name] = {"width": w, "height": h, "format": fmt,
                                                "bytes": len(data), "stride": stride}
        if raw is None:
            r.setdefault("save_errors", []).append(f"{name}: format {fmt} not saved")
            return None
        img = Image.frombuffer("RGB", (w, h), data, "raw", raw, stride, 1)
        path = os.path.join(self.outdir, name)
        img.save(path + ".tmp.png")
        os.rename(path + ".tmp.png", path)
        return path


def main(argv):
    outdir = argv[1]
    names = argv[2:] or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}", file=sys.stderr)
        return 2
    Gst.init(None)
    out = {"gst": Gst.version_string(), "pygobject": gi.__version__,
           "env": {k: os.environ.get(k) for k in ("XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS",
                                                  "XDG_SESSION_TYPE", "WAYLAND_DISPLAY")}}
    plugin = Gst.Registry.get().find_plugin("pipewire")
    out["pipewire_plugin"] = plugin.get_version() if plugin else None
    src = Gst.ElementFactory.make("pipewiresrc", None)
    out["pipewiresrc_properties"] = (sorted(p.name for p in src.list_properties())
                                     if src else "pipewiresrc missing")
    try:
        out["pipewire_version"] = subprocess.run(["pipewire", "--version"], capture_output=True,
                                                 text=True).stdout.split()[-1:]
    except OSError as e:
        out["pipewire_version"] = f"error: {e}"
    probe = Probe(outdir)
    out["screencast_version"] = probe.version()
    out["variants"] = []
    probe.first_variant = names[0]
    for name in names:
        log(f"variant {name}")
        res = probe.run(name)
        log(json.dumps(res))
        out["variants"].append(res)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
