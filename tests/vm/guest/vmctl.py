#!/usr/bin/python3
"""Runs INSIDE the VM (Debian's python3; Xlib and PIL are spice-streamd's own dependencies).

    vmctl.py shot DISPLAY OUT.png        screenshot of the X screen (needs XAUTHORITY), prints w h
    vmctl.py procs                       JSON: processes of the project (not this one), with ids
    vmctl.py xauth DISPLAY VT            the -auth file of the X server of DISPLAY (or on VT)
    vmctl.py watch VT UID TIMEOUT READY  wait for the switch to VT, time the properties; JSON
    vmctl.py status PID                  JSON: Uid, Gid, Groups of /proc/PID/status and its cmdline
"""

import json
import os
import sys
import time

BUS = "org.spice_space.StreamingAgent1"
PATH = "/org/spice_space/StreamingAgent1"
PATTERNS = ("spice-streamd", "spice_streamd", "spice-stream-worker", "spice_stream_worker",
            "spice-stream-helper", "spice_stream_helper")


def status_of(pid):
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("Name", "Uid", "Gid", "Groups", "PPid", "CapEff", "CapPrm", "NoNewPrivs"):
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


def watch(vt, uid, timeout, ready):
    """Times, from the kernel's VT switch to `vt` (/sys/class/tty/tty0/active, polled every 5 ms),
    until logind's seat0 ActiveSession changes ("logind") and the service's properties follow
    ("active_vt", "worker_uid", "streaming"). Started before the switch; touches `ready` when
    listening.

    Each time is when the PropertiesChanged signal saying so reached this watcher (dbus-next, the
    service's own dependency), not when a poll happened to see it: polling with busctl cost up to
    a second per round under TCG, and every poll is a call the service answers, competing with
    the switch it measures. WorkerPID is only invalidated in the signal: it is read on change."""
    import asyncio

    from dbus_next import BusType, Message, MessageType
    from dbus_next.aio import MessageBus

    props_if = "org.freedesktop.DBus.Properties"
    seat = "/org/freedesktop/login1/seat/seat0"
    rules = [f"type='signal',sender='org.freedesktop.login1',path='{seat}',"
             f"interface='{props_if}',member='PropertiesChanged'",
             f"type='signal',sender='{BUS}',path='{PATH}',interface='{props_if}',"
             "member='PropertiesChanged'"]

    async def get_all(bus, dest, path, iface):
        reply = await bus.call(Message(destination=dest, path=path, interface=props_if,
                                       member="GetAll", signature="s", body=[iface]))
        if reply.message_type != MessageType.METHOD_RETURN:
            return {}
        return {k: v.value for k, v in reply.body[0].items()}

    async def run():
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        for rule in rules:
            await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                   interface="org.freedesktop.DBus", member="AddMatch",
                                   signature="s", body=[rule]))
        # Unique names: a signal's sender is the owner's unique name, not the well-known one.
        owners = {}
        for name in ("org.freedesktop.login1", BUS):
            reply = await bus.call(Message(destination="org.freedesktop.DBus",
                                           path="/org/freedesktop/DBus",
                                           interface="org.freedesktop.DBus", member="GetNameOwner",
                                           signature="s", body=[name]))
            owners[reply.body[0] if reply.body else name] = name
        before = (await get_all(bus, "org.freedesktop.login1", seat,
                                "org.freedesktop.login1.Seat")).get("ActiveSession", ["", ""])[0]
        state = await get_all(bus, BUS, PATH, BUS)
        stamps = {}  # key -> absolute monotonic time it was first seen
        changed = asyncio.Event()
        pending_pid = []
        pending_logind = []

        def on_message(msg):
            if msg.message_type != MessageType.SIGNAL or msg.member != "PropertiesChanged":
                return
            now = time.monotonic()
            who = owners.get(msg.sender)
            iface, values, invalidated = msg.body
            if who == "org.freedesktop.login1" and "ActiveSession" in values:
                if values["ActiveSession"].value[0] not in ("", before):
                    stamps.setdefault("logind", now)
            elif who == "org.freedesktop.login1" and "ActiveSession" in invalidated:
                pending_logind.append(now)
            elif who == BUS and iface == BUS:
                state.update({k: v.value for k, v in values.items()})
                if "WorkerPID" in invalidated:
                    pending_pid.append(now)
                evaluate(now)
            changed.set()

        def evaluate(now):
            if state.get("ActiveVT") == vt:
                stamps.setdefault("active_vt", now)
            if state.get("Streaming") and state.get("StreamingVT") == vt:
                stamps.setdefault("streaming", now)
            pid = state.get("WorkerPID") or 0
            st = status_of(pid) if pid else None
            if st and int(st["Uid"][0]) in uid and state.get("WorkerState") == "running":
                stamps.setdefault("worker_uid", now)

        bus.add_message_handler(on_message)
        with open(ready, "w"):
            pass
        active = "/sys/class/tty/tty0/active"
        t_start = time.monotonic()
        while True:
            with open(active) as f:
                if f.read().strip() == f"tty{vt}":
                    break
            if time.monotonic() - t_start > timeout:
                return {"error": f"the VT never became {vt}"}
            await asyncio.sleep(0.005)
        t0 = time.monotonic()
        reads = 0
        while time.monotonic() - t0 < timeout and len(stamps) < 4:
            try:
                await asyncio.wait_for(changed.wait(), 1.0)
            except TimeoutError:
                pass
            changed.clear()
            if pending_logind and "logind" not in stamps:
                when = pending_logind[0]
                pending_logind.clear()
                now_active = (await get_all(bus, "org.freedesktop.login1", seat,
                                            "org.freedesktop.login1.Seat")).get("ActiveSession")
                if now_active and now_active[0] not in ("", before):
                    stamps["logind"] = when
            if pending_pid or "worker_uid" not in stamps:
                # WorkerPID changes are only invalidated: read it (stamped with the signal's time
                # when one said so, else now: a 1 s safety net for a missed signal).
                when = pending_pid[0] if pending_pid else time.monotonic()
                pending_pid.clear()
                state.update(await get_all(bus, BUS, PATH, BUS))
                reads += 1
                evaluate(when)
        bus.disconnect()
        seen = {k: round(v - t0, 3) for k, v in stamps.items()}
        plain = {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool, list))}
        return {"seen": seen, "reads": reads, "props": plain}

    print(json.dumps(asyncio.run(run()), default=str))


def main(argv):
    cmd = argv[1]
    if cmd == "shot":
        shot(argv[2], argv[3])
    elif cmd == "procs":
        print(json.dumps(procs()))
    elif cmd == "xauth":
        return xauth(argv[2], argv[3])
    elif cmd == "watch":
        # uid: one, or several separated by commas (a Wayland session's worker, or the display's
        # scanout reader covering for it while its screen cast is being created again).
        watch(int(argv[2]), {int(u) for u in argv[3].split(",")}, float(argv[4]), argv[5])
    elif cmd == "status":
        print(json.dumps(status_of(int(argv[2]))))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
