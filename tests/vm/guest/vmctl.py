#!/usr/bin/python3
"""Runs INSIDE the VM (Debian's python3; Xlib and PIL are spice-streamd's own dependencies).

    vmctl.py props                       the service's properties as JSON (one GetAll through busctl)
    vmctl.py shot DISPLAY OUT.png        screenshot of the X screen (needs XAUTHORITY), prints w h
    vmctl.py procs                       JSON: processes of the project (not this one), with ids
    vmctl.py xauth DISPLAY VT            the -auth file of the X server of DISPLAY (or on VT)
    vmctl.py watch VT UID TIMEOUT READY  wait for the switch to VT, time the properties; JSON
    vmctl.py status PID                  JSON: Uid, Gid, Groups of /proc/PID/status and its cmdline
"""

import json
import os
import subprocess
import sys
import time

BUS = "org.spice_space.StreamingAgent1"
PATH = "/org/spice_space/StreamingAgent1"
PATTERNS = ("spice-streamd", "spice_streamd", "spice-stream-worker", "spice_stream_worker",
            "spice-stream-helper", "spice_stream_helper")


def props():
    out = subprocess.run(
        ["busctl", "--json=short", "call", BUS, PATH, "org.freedesktop.DBus.Properties", "GetAll",
         "s", BUS], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return {"error": out.stderr.strip()}
    data = json.loads(out.stdout)["data"][0]
    return {k: v["data"] for k, v in data.items()}


def status_of(pid):
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("Name", "Uid", "Gid", "Groups", "PPid"):
                    fields[key] = value.split()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            fields["cmdline"] = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        with open(f"/proc/{pid}/cgroup") as f:
            fields["cgroup"] = f.read().strip()
    except OSError:
        return None
    return fields


def procs():
    found = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in (me, os.getppid()):
            continue
        st = status_of(int(name))
        if st and any(p in st["cmdline"] for p in PATTERNS):
            st["pid"] = int(name)
            found.append(st)
    return found


def shot(display, out):
    from PIL import Image
    from Xlib import X
    from Xlib import display as xdisplay

    d = xdisplay.Display(display)
    root = d.screen().root
    geo = root.get_geometry()
    raw = root.get_image(0, 0, geo.width, geo.height, X.ZPixmap, 0xFFFFFFFF)
    img = Image.frombytes("RGB", (geo.width, geo.height), raw.data, "raw", "BGRX")
    tmp = out + ".tmp.png"
    img.save(tmp)
    os.rename(tmp, out)
    print(geo.width, geo.height)


def xauth(display, vt):
    """GDM starts Xorg with -displayfd (no :N on its command line) but always with vtN."""
    num = display.split(":", 1)[1].split(".")[0]
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0")]
        except OSError:
            continue
        if not argv or not os.path.basename(argv[0]).startswith("Xorg") or "-auth" not in argv:
            continue
        if f":{num}" in argv or f"vt{vt}" in argv:
            print(argv[argv.index("-auth") + 1])
            return 0
    return 1


def active_session():
    """logind's seat0 ActiveSession id ("" when it cannot be read)."""
    out = subprocess.run(
        ["busctl", "--json=short", "get-property", "org.freedesktop.login1",
         "/org/freedesktop/login1/seat/seat0", "org.freedesktop.login1.Seat", "ActiveSession"],
        capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return ""
    return json.loads(out.stdout)["data"][0]


def watch(vt, uid, timeout, ready):
    """Times, from the kernel's VT switch to `vt` (/sys/class/tty/tty0/active, polled every 5 ms),
    until logind's seat0 ActiveSession changes ("logind") and the service's properties follow.
    Started before the switch; touches `ready` when polling."""
    active = "/sys/class/tty/tty0/active"
    before = active_session()
    with open(ready, "w"):
        pass
    t_start = time.monotonic()
    while True:
        with open(active) as f:
            if f.read().strip() == f"tty{vt}":
                break
        if time.monotonic() - t_start > timeout:
            print(json.dumps({"error": f"the VT never became {vt}"}))
            return
        time.sleep(0.005)
    t0 = time.monotonic()
    seen = {}
    last = {}
    polls = 0
    while time.monotonic() - t0 < timeout:
        if "logind" not in seen and active_session() not in ("", before):
            seen["logind"] = round(time.monotonic() - t0, 3)
        last = props()
        polls += 1
        now = round(time.monotonic() - t0, 3)
        if last.get("ActiveVT") == vt:
            seen.setdefault("active_vt", now)
        pid = last.get("WorkerPID") or 0
        st = status_of(pid) if pid else None
        if st and int(st["Uid"][0]) == uid and last.get("WorkerState") == "running":
            seen.setdefault("worker_uid", now)
        if last.get("Streaming") and last.get("StreamingVT") == vt:
            seen.setdefault("streaming", now)
        if len(seen) == 4:
            break
        time.sleep(0.02)
    print(json.dumps({"seen": seen, "polls": polls, "props": last}))


def main(argv):
    cmd = argv[1]
    if cmd == "props":
        print(json.dumps(props()))
    elif cmd == "shot":
        shot(argv[2], argv[3])
    elif cmd == "procs":
        print(json.dumps(procs()))
    elif cmd == "xauth":
        return xauth(argv[2], argv[3])
    elif cmd == "watch":
        watch(int(argv[2]), int(argv[3]), float(argv[4]), argv[5])
    elif cmd == "status":
        print(json.dumps(status_of(int(argv[2]))))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
