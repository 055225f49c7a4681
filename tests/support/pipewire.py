"""A real PipeWire daemon and WirePlumber, with a session bus of their own, in a private runtime
directory; and producers of real video nodes in it, whose picture a test draws (what mutter does for a
screen cast, from the PipeWire side).

A producer (`python -m tests.support.pipewire produce NAME WIDTH HEIGHT`) sends its picture at 30 fps
through `videotestsrc ! compositor ! pipewiresink` (a Video/Source node named NAME), the same picture
again and again until told otherwise on stdin: `fill R G B`, `rect X Y W H R G B`. Its node id is
read with pw-dump.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from .dbusdaemon import DBusDaemon
from .waiting import stop_process, wait_until

SESSION_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def available() -> str | None:
    """Why a real PipeWire cannot run here, or None."""
    for prog in ("pipewire", "wireplumber", "pw-dump", "dbus-daemon"):
        if shutil.which(prog) is None:
            return f"{prog} is not installed (Debian: pipewire, pipewire-bin, wireplumber, dbus-daemon)"
    return None


class PipeWire:
    """pipewire + wireplumber + a session dbus-daemon in a private XDG_RUNTIME_DIR."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="spice-pw-")
        os.chmod(self.dir, 0o700)
        self.procs: list[subprocess.Popen] = []
        self.bus: DBusDaemon | None = None
        try:
            self.bus = DBusDaemon(SESSION_BUS_CONFIG, prefix="spice-pw-bus-")
            self.env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "XDG_RUNTIME_DIR": self.dir,
                "DBUS_SESSION_BUS_ADDRESS": self.bus.address,
                "HOME": self.dir,
                "XDG_CONFIG_HOME": os.path.join(self.dir, "config"),
                "XDG_STATE_HOME": os.path.join(self.dir, "state"),
                "XDG_DATA_HOME": os.path.join(self.dir, "data"),
                "PIPEWIRE_LOG_SYSTEMD": "false",
            }
            self._log = open(os.path.join(self.dir, "daemons.log"), "wb")
            self._start(["pipewire"])
            wait_until(lambda: os.path.exists(os.path.join(self.dir, "pipewire-0")),
                       timeout=15, what="the PipeWire socket")
            self._start(["wireplumber"])
            wait_until(self._session_manager_ready, timeout=20, what="WirePlumber on PipeWire")
        except BaseException:
            self.stop()
            raise

    def _start(self, argv: list[str]) -> None:
        proc = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=self._log,
                                stderr=subprocess.STDOUT)
        self.procs.append(proc)

    def dump(self) -> list[dict]:
        out = subprocess.run(["pw-dump"], env=self.env, capture_output=True, timeout=15, check=False)
        if out.returncode != 0:
            return []
        try:
            return json.loads(out.stdout or b"[]")
        except ValueError:
            return []

    def _session_manager_ready(self) -> bool:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {self.log()}")
        return any(o.get("type") == "PipeWire:Interface:Client"
                   and "WirePlumber" in str(o.get("info", {}).get("props", {}).get(
                       "application.name", "")) for o in self.dump())

    def node_id(self, name: str) -> int | None:
        for o in self.dump():
            props = o.get("info", {}).get("props", {}) if o.get("info") else {}
            if o.get("type") == "PipeWire:Interface:Node" and props.get("node.name") == name:
                return o["id"]
        return None

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "daemons.log"), "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def producer(self, name: str, width: int, height: int) -> Producer:
        return Producer(self, name, width, height)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)
        self.procs = []
        if self.bus is not None:
            self.bus.stop()
            self.bus = None
        if getattr(self, "_log", None):
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Producer:
    """A real video node: `videotestsrc ! compositor ! pipewiresink` in a child process, drawn on
    through stdin (the change is in the frames that follow the answer)."""

    def __init__(self, pw: PipeWire, name: str, width: int, height: int) -> None:
        self.name, self.width, self.height = name, width, height
        env = dict(os.environ)
        env.update(pw.env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.pipewire", "produce", name, str(width),
             str(height)], env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        try:
            line = self.proc.stdout.readline()
            if line.strip() != b"playing":
                raise RuntimeError(f"producer {name} did not start: {self.proc.stderr.read()!r}")
            self.node = wait_until(lambda: pw.node_id(name), timeout=10,
                                   what=f"PipeWire node {name}")
        except BaseException:
            self.stop()
            raise

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer.strip() == b"ok", answer

    def fill(self, rgb: tuple[int, int, int]) -> None:
        self.send("fill {} {} {}".format(*rgb))

    def rect(self, x: int, y: int, w: int, h: int, rgb: tuple[int, int, int]) -> None:
        self.send(f"rect {x} {y} {w} {h} {rgb[0]} {rgb[1]} {rgb[2]}")

    def pause(self) -> None:
        """No more frames (mutter sends none while nothing is painted)."""
        self.send("pause")

    def stop(self) -> None:
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        stop_process(self.proc)
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


def bgrx(rgb: tuple[int, int, int]) -> bytes:
    """A pixel as the source gives it."""
    return bytes((rgb[2], rgb[1], rgb[0], 255))


def produce(name: str, width: int, height: int) -> None:
    import threading

    import gi

    gi.require_version("Gst", "1.0")
    from gi.repository import GLib, Gst

    Gst.init(None)
    # Sources whose buffers come from downstream pools, composed: appsrc's own buffers crash
    # pipewiresink 0.3.65 (gst_buffer_extract into a buffer with no memory: SIGSEGV), and a probe
    # cannot write into a buffer Python holds a reference to (not writable). The background is one
    # solid colour; the rectangle is a second solid source placed on it, invisible until drawn.
    caps = "video/x-raw,format=BGRx,framerate=30/1"
    pipeline = Gst.parse_launch(
        f"compositor name=mix background=black ! {caps},width={width},height={height} ! "
        f"pipewiresink mode=provide client-name={name} "
        f'stream-properties="props,media.class=Video/Source,node.name={name}" '
        f"videotestsrc name=bg is-live=true pattern=solid-color foreground-color={argb((40, 40, 40))} ! "
        f"{caps},width={width},height={height} ! mix.sink_0 "
        f"videotestsrc name=fg is-live=true pattern=solid-color ! {caps},width=16,height=16 ! "
        f"mix.sink_1")
    mix = pipeline.get_by_name("mix")
    bg, fg = pipeline.get_by_name("bg"), pipeline.get_by_name("fg")
    rect_pad = mix.get_static_pad("sink_1")
    rect_pad.set_property("alpha", 0.0)

    def commands() -> None:
        for line in sys.stdin:
            words = line.split()
            if words[0] == "fill":
                bg.set_property("foreground-color", argb(tuple(map(int, words[1:4]))))
            elif words[0] == "rect":
                x, y, w, h, r, g, b = map(int, words[1:8])
                fg.set_property("foreground-color", argb((r, g, b)))
                for prop, value in (("xpos", x), ("ypos", y), ("width", w), ("height", h)):
                    rect_pad.set_property(prop, value)
                rect_pad.set_property("alpha", 1.0)
            elif words[0] == "pause":  # as mutter on a static screen: no frame until painted
                pipeline.set_state(Gst.State.PAUSED)
            sys.stdout.write("ok\n")
            sys.stdout.flush()
        GLib.idle_add(loop.quit)

    loop = GLib.MainLoop()
    pipeline.set_state(Gst.State.PLAYING)
    print("playing", flush=True)
    threading.Thread(target=commands, daemon=True).start()
    loop.run()
    pipeline.set_state(Gst.State.NULL)


def argb(rgb: tuple[int, int, int]) -> int:
    return 0xFF000000 | rgb[0] << 16 | rgb[1] << 8 | rgb[2]


if __name__ == "__main__":
    if sys.argv[1] == "produce":
        produce(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
