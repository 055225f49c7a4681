"""The relay's cost per 1080p-sized frame on the REAL virtio stream port vs a pty, in one TCG guest.

    .venv/bin/python bench/vm_relay.py [--deb PATH] [--seconds 10] [--fps 20] [--modes counted,bare]
                                       [--rounds 2]

A measurement, not a test (as root). Reuses the VM suite (tests/vm): the cached Debian 12 image,
QEMU with its own SPICE server and the stream port (-snapshot), the guest agent. Installs the
project's .deb (the newest dist/spice-streamd_*_all.deb, built with `.ci/dev deb` if there is none),
stops and masks spice-streamd so the port is free, then runs bench/vm_relay_guest.py in the guest
with the guest's python3 and the installed modules: the real PortRelay + WorkerChannel and a fake
worker sending ~290 KB frames, once on the virtio port and once on a pty drained by another process.

No SPICE client is connected: QEMU's SPICE server reads the stream port whenever the port is open
and no frame is queued for a client (libspice-server's stream device), so the guest's writes are not
held up by a client's pace; the pty's reader is likewise "as fast as it can".

Modes: "counted" wraps os.write in the guest (calls, EAGAINs, bytes per write, wall time per frame);
"bare" runs without the wrapper (its own per-call cost stays out of the CPU figures) and takes the
write() syscall count from /proc/self/task/TID/io instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.vm.image import ensure_image  # noqa: E402
from tests.vm.qemu import VM, GuestError  # noqa: E402
from tests.vm.run import LOG_ROOT, find_deb  # noqa: E402

GUEST_SCRIPT = Path(__file__).resolve().parent / "vm_relay_guest.py"
UNIT = "spice-streamd.service"
# The modules whose code runs in the measurement: a .deb that differs from the tree is reported.
RELAY_MODULES = ["spice_streamd/portrelay.py", "spice_streamd/portwriter.py",
                 "spice_streamd/workerchannel.py", "spice_streamd/guestmessages.py",
                 "spice_stream_common/protocol.py", "spice_stream_common/frameparts.py"]


def pick_deb(explicit: str | None, say) -> Path:
    if explicit:
        return find_deb(explicit, False, say)
    try:
        return find_deb(None, False, say)
    except SystemExit:
        pass
    say("no .deb in dist/: building one with .ci/dev deb")
    res = subprocess.run([str(ROOT / ".ci" / "dev"), "deb"], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"vm_relay: .ci/dev deb failed:\n{res.stdout}{res.stderr}")
    return Path(res.stdout.strip().splitlines()[-1])


def stale_modules(deb: Path) -> list[str]:
    """Relay modules whose copy in the .deb differs from this tree's."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        site = Path(tmp) / "usr/lib/python3/dist-packages"
        return [m for m in RELAY_MODULES
                if not (site / m).is_file()
                or (site / m).read_bytes() != (ROOT / "service" / m).read_bytes()]


# -- the table --------------------------------------------------------------------------------------

def pool(runs: list[dict]) -> dict:
    """Runs of one (port, mode) summed: per-frame figures over all their frames."""
    out = {"kind": runs[0]["kind"], "counted": runs[0]["counted"], "round": "all"}
    for key in ("frames_received", "frames", "dropped"):
        out[key] = sum(r[key] for r in runs)
    out["cpu_ns"] = {k: sum(r["cpu_ns"][k] for r in runs) for k in runs[0]["cpu_ns"]}
    out["writer_io"] = {k: sum(r["writer_io"].get(k, 0) for r in runs) for k in ("syscw", "wchar")}
    if all(r.get("writes") for r in runs):
        walls = [r["writes"]["wall_ms"]["mean"] * r["frames"] for r in runs if r["writes"]["wall_ms"]]
        out["writes"] = {k: sum(r["writes"][k] for r in runs) for k in ("calls", "ok", "eagain", "bytes")}
        out["writes"]["wall_ms"] = {"mean": sum(walls) / max(out["frames"], 1)} if walls else None
    return out


def row(run: dict) -> dict:
    frames = max(run["frames"], 1)
    cpu = run["cpu_ns"]
    out = {
        "port": run["kind"], "mode": "counted" if run["counted"] else "bare", "round": run["round"],
        "frames": f"{run['frames_received']}/{run['frames']}/{run['dropped']}",
        "main": cpu["main"] / 1e6 / frames, "writer": cpu["writer"] / 1e6 / frames,
        "other": cpu["other"] / 1e6 / frames,
        "calls": run["writer_io"].get("syscw", 0) / frames,
    }
    out["total"] = out["main"] + out["writer"] + out["other"]
    w = run.get("writes")
    if w:
        out.update(calls=w["calls"] / frames, ok=w["ok"] / frames, eagain=w["eagain"] / frames,
                   per_write=w["bytes"] / max(w["ok"], 1),
                   wall=w["wall_ms"]["mean"] if w["wall_ms"] else None)
    return out


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = [("port", "port", "<6", "s"), ("mode", "mode", "<7", "s"), ("round", "round", ">5", ""),
           ("frames recv/written/dropped", "frames", ">27", "s"),
           ("write()/frame", "calls", ">13", ".1f"), ("ok writes/frame", "ok", ">15", ".1f"),
           ("EAGAIN/frame", "eagain", ">12", ".1f"), ("bytes/ok write", "per_write", ">14", ".0f"),
           ("main ms/frame", "main", ">13", ".2f"), ("writer ms/frame", "writer", ">15", ".2f"),
           ("service ms/frame", "total", ">16", ".2f"), ("frame write wall ms", "wall", ">19", ".2f")]


def print_table(runs: list[dict]) -> None:
    groups: dict[tuple[str, bool], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["kind"], r["counted"]), []).append(r)
    pooled = {key: row(pool(group)) for key, group in groups.items()}
    rows = sorted((row(r) for r in runs),
                  key=lambda r: (r["mode"] != "counted", r["port"] != "virtio", r["round"]))
    print("  ".join(format(title, align) for title, _, align, _ in COLUMNS))
    print("  ".join("-" * int(align[1:]) for _, _, align, _ in COLUMNS))
    last = None
    for r in rows:
        key = (r["port"], r["mode"] == "counted")
        if last is not None and key != last and len(groups[last]) > 1:
            print_row(pooled[last])
        last = key
        print_row(r)
    if last is not None and len(groups[last]) > 1:
        print_row(pooled[last])
    print()
    for counted in (True, False):
        mode = "counted" if counted else "bare"
        v, t = groups.get(("virtio", counted)), groups.get(("pty", counted))
        if not (v and t):
            continue
        pv, pt = pooled[("virtio", counted)], pooled[("pty", counted)]
        per_round = [row(a)["total"] / row(b)["total"] for a, b in zip(v, t, strict=False)]
        print(f"ratio virtio/pty of the service total ({mode}, all rounds): "
              f"{pv['total'] / pt['total']:.2f}  ({pv['total']:.2f} / {pt['total']:.2f} ms per frame); "
              f"writer alone {pv['writer'] / pt['writer']:.2f}, main alone {pv['main'] / pt['main']:.2f}"
              + (f"; per round {', '.join(f'{x:.2f}' for x in per_round)}" if len(per_round) > 1 else ""))
    others = [r["other"] for r in rows if r["other"]]
    if others:
        print(f"(service total includes other threads of the process: up to {max(others):.2f} ms/frame)")


def print_row(r: dict) -> None:
    print("  ".join(format(fmt(r.get(key), spec), align) for _, key, align, spec in COLUMNS))


def print_notes(data: dict) -> None:
    for run in data["runs"]:
        frames = max(run["frames"], 1)
        parts = [f"{run['kind']}/{'counted' if run['counted'] else 'bare'} #{run['round']}: "
                 f"{run['seconds']:.1f} s, worker sent {run['worker'].get('sent')} "
                 f"({run['worker'].get('late')} late)"]
        if run["drainer"]:
            d = run["drainer"]
            parts.append(f"pty reader {d.get('bytes')} B in {d.get('reads')} reads, "
                         f"{1e3 * d.get('cpu_s', 0) / frames:.2f} ms CPU/frame")
        parts.append(f"host caps {run['host_caps']} codecs {run['host_codecs']}"
                     f"{', PAUSED at end' if run['paused_at_end'] else ''}")
        w = run.get("writes")
        if w:
            parts.append(f"max write {w['max']} B, commonest {w['common'][:3]}")
            if w["wall_ms"]:
                parts.append("frame write wall ms median {median:.2f} max {max:.2f}"
                             .format(**w["wall_ms"]))
        print("  " + "; ".join(parts))
        sw, system = run.get("switches"), run.get("system")
        if sw and system:
            cpu = system["cpu_ms"]
            busy = {k: cpu[k] / frames for k in ("user", "system", "irq", "softirq") if cpu[k]}
            print("      per frame: ctx switches main {}/{} writer {}/{} (voluntary/not); whole guest "
                  "CPU ms {} (idle {:.1f}); interrupts {}".format(
                      round(sw["main"]["voluntary"] / frames, 1),
                      round(sw["main"]["nonvoluntary"] / frames, 1),
                      round(sw["writer"]["voluntary"] / frames, 1),
                      round(sw["writer"]["nonvoluntary"] / frames, 1),
                      {k: round(v, 1) for k, v in busy.items()}, cpu["idle"] / frames,
                      {k: round(v / frames, 1) for k, v in list(system["irqs"].items())[:4]}))


# -- the run ----------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--deb", help="the .deb to install (default: newest dist/*.deb, else build one)")
    ap.add_argument("--seconds", type=float, default=10.0, help="how long the fake worker sends")
    ap.add_argument("--fps", type=float, default=20.0)
    ap.add_argument("--frame-bytes", type=int, default=290_000)
    ap.add_argument("--modes", default="counted,bare", help="counted,bare or one of them")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each (port, mode), interleaved")
    ap.add_argument("--logdir", help=f"default: a new one under {LOG_ROOT}")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("vm_relay: run as root (QEMU, the image cache, 9p shares)", file=sys.stderr)
        return 2

    t_start = time.monotonic()
    logdir = Path(args.logdir) if args.logdir else LOG_ROOT / f"relay-{time.strftime('%Y%m%d-%H%M%S')}"
    share, results = logdir / "share", logdir / "results"
    share.mkdir(parents=True, exist_ok=True)
    results.mkdir(exist_ok=True)
    timings: list[tuple[str, float]] = []

    def say(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def phase(name: str, t0: float) -> None:
        timings.append((name, time.monotonic() - t0))

    def on_term(*_):
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, on_term)
    say(f"logs: {logdir}")
    t0 = time.monotonic()
    deb = pick_deb(args.deb, say)
    stale = stale_modules(deb)
    say(f"deb: {deb}" + (f" (NOTE: differs from the tree in {stale})" if stale else
                          " (relay modules identical to the tree)"))
    shutil.copy(deb, share / deb.name)
    shutil.copy(GUEST_SCRIPT, share / GUEST_SCRIPT.name)
    image = ensure_image(log=lambda s: say(f"   {s}"))
    phase("deb + image", t0)

    vm = VM(image, logdir, share, results, log=lambda s: say(f"   {s}"))
    try:
        t0 = time.monotonic()
        vm.start()
        vm.wait_agent(300)
        phase("boot to guest agent", t0)
        t0 = time.monotonic()
        vm.sh("systemctl is-system-running --wait", timeout=180)
        vm.sh("mountpoint -q /mnt/share").check()
        vm.sh(f"apt-get install -y /mnt/share/{deb.name}", timeout=600,
              env={"DEBIAN_FRONTEND": "noninteractive"}).check()
        # Masked: neither udev's SYSTEMD_WANTS, D-Bus activation nor Restart= brings it back.
        vm.sh(f"systemctl mask --now {UNIT}").check()
        state = vm.sh(f"systemctl is-active {UNIT}", quiet=True).out.strip()
        if state not in ("inactive", "failed"):
            raise GuestError(f"{UNIT} is {state} after mask --now")
        phase("install .deb, mask the service", t0)

        kvm = vm.qmp.command("query-kvm")
        uname = vm.sh("uname -r", quiet=True).check().out.strip()
        say(f"guest kernel {uname}; accelerator: {'KVM' if vm.kvm else 'TCG'} "
            f"(QMP query-kvm: {kvm}); {vm.cpus} vCPUs, {vm.memory_mb} MB")

        t0 = time.monotonic()
        n_runs = 2 * len(args.modes.split(",")) * args.rounds
        res = vm.sh(f"/usr/bin/python3 /mnt/share/{GUEST_SCRIPT.name} --seconds {args.seconds:g} "
                    f"--fps {args.fps:g} --frame-bytes {args.frame_bytes} --modes {args.modes} "
                    f"--rounds {args.rounds}",
                    timeout=n_runs * (args.seconds + 60) + 60)
        phase("guest measurement", t0)
        (logdir / "guest-stderr.txt").write_text(res.err)
        (logdir / "guest-result.json").write_text(res.out)
        print("guest log (the relay's lines):")
        for line in res.err.rstrip().splitlines():
            print(f"  {line}")
        res.check()
        data = json.loads(res.out)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        vm.stop()

    print()
    print(f"guest: Linux {data['uname']} (uname -r), Python {data['python']}, {data['cpus']} vCPUs, "
          f"{'KVM' if vm.kvm else 'TCG (no usable KVM: the guest is emulated)'}; "
          f"DATA message {data['frame_message_bytes']} B at {data['fps']:g} fps for "
          f"{data['seconds']:g} s per run; no SPICE client connected")
    print()
    print_table(data["runs"])
    print()
    print("notes:")
    print_notes(data)
    print()
    print("timings: " + ", ".join(f"{name} {secs:.0f} s" for name, secs in timings)
          + f"; total {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
