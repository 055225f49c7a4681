"""The demo: the whole chain on one machine with no VM and no system bus, from a source checkout.

It starts a private bus with our policy, polkitd, a mocked logind seat, an Xvfb display with something
moving on it, the service, a helper registered for that display as an unprivileged user, and a stand-in
host on a pty that asks for MJPEG; streams for a few seconds, prints what happened and writes the last
frame it received as a PNG.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_USER = "spice-test-a"
WIDTH, HEIGHT = 1024, 768


def _checkout_support():
    """The private stand-ins live with the tests; the demo needs a source checkout to find them."""
    if not (REPO / "tests" / "support" / "bus.py").exists():
        sys.exit("spice-streamd demo: run it from a source checkout: sudo .ci/dev demo")
    sys.path.insert(0, str(REPO))
    from tests.support import bus, hostpeer, xserver

    return bus, hostpeer, xserver


class Animation(threading.Thread):
    """Draws a desktop-like picture and moves a few things on it, about 30 times a second."""

    def __init__(self, painter) -> None:
        super().__init__(name="demo-animation", daemon=True)
        self.painter = painter
        self.stop_event = threading.Event()

    def run(self) -> None:
        p = self.painter
        p.fill(0, 0, WIDTH, HEIGHT, (32, 74, 135))  # desktop
        p.fill(0, 0, WIDTH, 28, (46, 52, 54))  # top bar
        p.fill(80, 90, 560, 400, (238, 238, 236))  # a window
        p.fill(80, 90, 560, 30, (186, 189, 182))
        t0 = time.monotonic()
        x_prev = None
        while not self.stop_event.wait(1 / 30):
            t = time.monotonic() - t0
            x = int(120 + 440 * (0.5 + 0.5 * math.sin(t * 1.5)))
            if x_prev is not None:
                p.fill(x_prev, 200, 60, 60, (238, 238, 236))
            hue = int(127 + 127 * math.sin(t * 2))
            p.fill(x, 200, 60, 60, (hue, 80, 255 - hue))
            x_prev = x
            bar = int(200 * (t % 4) / 4)
            p.fill(700, 600, 200, 20, (85, 87, 83))
            p.fill(700, 600, bar, 20, (115, 210, 22))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="spice-streamd demo", description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="how long to stream (default 6)")
    ap.add_argument("--output", default=str(REPO / "demo-output"), help="where to write last-frame.png")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("spice-streamd demo: run as root (sudo .ci/dev demo): it starts polkitd and switches uids")

    bus, hostpeer, xserver = _checkout_support()
    from PIL import Image

    from spice_stream_common import protocol as p

    say = print
    say("spice-streamd demo: private bus, polkitd, logind stand-in, Xvfb, service, helper, stand-in host")
    stack = bus.Stack(authorized=(DEMO_USER,))
    server = pty = peer = painter = anim = None
    try:
        uid = stack.uid(DEMO_USER)
        server = xserver.start_xvfb(WIDTH, HEIGHT, owner_uid=uid, server_uid=uid)
        painter = xserver.Painter(server)
        anim = Animation(painter)
        anim.start()
        pty = hostpeer.RawPty()
        peer = hostpeer.HostPeer(pty.master)
        say(f"  display {server.display} ({WIDTH}x{HEIGHT}) owned by {DEMO_USER} (uid {uid}); "
            f"stand-in device {pty.path}")

        svc = stack.service(device=pty.path)
        say(f"  service pid {svc.proc.pid} on {stack.bus.address}")
        stack.helper(DEMO_USER, "a", display=server.display, xauthority=server.xauthority)
        bus.wait_until(lambda: stack.prop("Sessions"), timeout=20, what="the helper's registration")
        for vt, s_uid, display in stack.prop("Sessions"):
            say(f"  registered: VT {vt}, uid {s_uid}, display {display} (active VT {stack.prop('ActiveVT')})")
        peer.wait_count(p.MsgType.CAPABILITIES, 1, timeout=20)
        peer.start()  # what libspice-server does when a client connects: ask for MJPEG
        bus.wait_until(lambda: stack.prop("Streaming"), timeout=20, what="the worker to stream")
        worker = stack.prop("WorkerPID")
        with open(f"/proc/{worker}/status") as f:
            w_uid = next(line.split()[1] for line in f if line.startswith("Uid:"))
        say(f"  worker pid {worker} runs as uid {w_uid}, streaming VT {stack.prop('StreamingVT')}")

        start = time.monotonic()
        first_frames = len(peer.of_type(p.MsgType.DATA))
        tty = sys.stdout.isatty()  # a progress line redrawn in place, or one line a second in a log
        while (elapsed := time.monotonic() - start) < args.seconds:
            n = len(peer.of_type(p.MsgType.DATA)) - first_frames
            line = (f"  streaming {elapsed:4.1f}/{args.seconds:.0f} s: {n} frames, "
                    f"{n / max(elapsed, 0.01):5.1f} fps, {peer.raw_bytes / 1e6:6.2f} MB received")
            sys.stdout.write("\r" + line if tty else line + "\n")
            sys.stdout.flush()
            time.sleep(0.25 if tty else 1.0)
        if tty:
            sys.stdout.write("\n")
        frames = peer.of_type(p.MsgType.DATA)
        formats = [p.decode_format(m.payload) for m in peer.of_type(p.MsgType.FORMAT)]
        n = len(frames) - first_frames
        size = sum(len(m.payload) for m in frames)
        os.makedirs(args.output, exist_ok=True)
        out = os.path.join(args.output, "last-frame.png")
        Image.open(io.BytesIO(frames[-1].payload)).save(out)
        os.chmod(out, 0o644)
        say(f"  host saw: {len(formats)} FORMAT ({formats[-1].width}x{formats[-1].height} MJPEG), "
            f"{len(frames)} frames, {size / max(len(frames), 1) / 1024:.0f} KB per frame, "
            f"{len(peer.of_type(p.MsgType.CURSOR_SET))} cursor images, "
            f"{len(peer.violations)} protocol violations")
        say(f"done: {n} frames in {args.seconds:.0f} s ({n / args.seconds:.1f} fps); last frame: {out}")
        return 0 if frames and not peer.violations else 1
    finally:
        if anim is not None:
            anim.stop_event.set()
            anim.join(2)
        stack.close()
        if peer is not None:
            peer.close()
        if pty is not None:
            pty.close()
        if painter is not None:
            painter.close()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
