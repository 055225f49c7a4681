"""Benchmark: the real worker vs a naive GetImage+full-JPEG baseline on Xvfb 1920x1080.

Run: .venv/bin/python bench/run.py   (as root or any user; takes about four minutes)

Parts (--parts, default all): cpu (CPU per frame of each engine and workload, the table), profile (where a
1080p frame's time goes, and libjpeg-turbo's floor on the same frames), latency (X request to frame on the
port), port (a host that stops reading, and one that reads slowly), codecs (MJPEG, H.264, VP8 and VP9
through the installed pipeline: bytes and CPU per frame).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import floor  # noqa: E402
import latency  # noqa: E402
import videocodecs  # noqa: E402
from common import (  # noqa: E402
    RELAY_STATS,
    cpu_seconds,
    peak_rss_mb,
    relay_stats,
    session,
    start_painter,
    stop,
)

from tests.support.xserver import start_xvfb  # noqa: E402

# The targets, as ratios against the baseline measured in the same run where they are ratios.
TARGET_FULL_FPS = 60
TARGET_FULL_FPS_RATIO = 2.0
TARGET_FULL_CPU_RATIO = 0.45
TARGET_REGION_CPU_RATIO = 0.15
TARGET_TYPING_WORKER_MS = 1.0
TARGET_POINTER_NEW_FRAMES = 0
TARGET_IDLE_CPU_PCT = 1.0
TARGET_WORKER_RSS_MB = 60
TARGET_RELAY_MS_PER_FRAME = 1.0

# Which engines run each workload, and the painter's mode and steps per second for it.
WORKLOADS = {
    "full": (("worker", "relayed", "baseline"), "full", 100.0),
    "region": (("worker", "relayed", "baseline"), "region", 100.0),
    "typing": (("worker", "relayed"), "typing", 30.0),
    "pointer": (("worker", "relayed"), "pointer", 60.0),
    "idle": (("worker", "baseline"), "static", None),
}
PARTS = ("cpu", "profile", "latency", "port", "codecs")


@dataclass
class Result:
    engine: str
    workload: str
    fps: float
    frames: int  # DATA messages in the window
    new_frames: int  # frames whose JPEG differs from the one before (the baseline re-encodes)
    cursor_moves: int  # CURSOR_MOVE messages in the window
    cpu_ms_per_frame: float
    engine_ms_per_frame: float  # every process of the engine (relayed: service + worker)
    worker_ms_per_frame: float  # the worker process alone (baseline: its one process)
    service_ms_per_frame: float  # relayed only: the service's supervisor and relay
    port_write_ms_per_frame: float  # relayed only: of the service's, its writev() calls to the port
    port_writes_per_frame: float
    relay_main_ms_per_frame: float  # relayed only: its main thread (worker socket, parse, check)
    relay_writer_ms_per_frame: float  # relayed only: the port writer thread (writes, waits)
    x_ms_per_frame: float
    kb_per_frame: float
    cpu_pct: float  # engine + X, percent of one core
    worker_pct: float  # the worker alone, percent of one core
    others_pct: float  # painter + this bench's drain, percent of one core
    peak_rss_mb: float  # the worker's VmHWM (baseline: its process)


NO_RELAY = {"write_cpu_s": 0.0, "writes": 0, "main_cpu_s": 0.0, "writer_cpu_s": 0.0}


def measure(engine: str, workload: str, server, args) -> Result:
    _, mode, rate = WORKLOADS[workload]
    with session(engine, mode, server, args, rate=rate) as s:
        time.sleep(args.warmup)  # let the first full frame and the painter's pace settle
        s.check_alive()
        w0 = relay_stats(s.proc) if engine == "relayed" else NO_RELAY
        f0, b0, n0 = s.drain.snapshot()
        m0 = s.drain.cursor_moves
        c0, x0, t0 = [cpu_seconds(p) for p in s.pids], cpu_seconds(server.pid), time.monotonic()
        o0 = cpu_seconds(s.painter.pid) + cpu_seconds(os.getpid())
        time.sleep(args.seconds)  # the measuring window
        f1, b1, n1 = s.drain.snapshot()
        m1 = s.drain.cursor_moves
        c1, x1, t1 = [cpu_seconds(p) for p in s.pids], cpu_seconds(server.pid), time.monotonic()
        o1 = cpu_seconds(s.painter.pid) + cpu_seconds(os.getpid())
        w1 = relay_stats(s.proc) if engine == "relayed" else NO_RELAY
        s.check_alive()
        rss = peak_rss_mb(s.worker_pid)
    elapsed = t1 - t0
    frames = f1 - f0
    per = max(frames, 1)
    used = [b - a for a, b in zip(c0, c1, strict=True)]
    engine_s = sum(used)
    return Result(
        engine=engine,
        workload=workload,
        fps=frames / elapsed,
        frames=frames,
        new_frames=n1 - n0,
        cursor_moves=m1 - m0,
        cpu_ms_per_frame=1000 * (engine_s + (x1 - x0)) / per,
        engine_ms_per_frame=1000 * engine_s / per,
        worker_ms_per_frame=1000 * used[-1] / per,
        service_ms_per_frame=1000 * used[0] / per if len(used) > 1 else 0.0,
        port_write_ms_per_frame=1000 * (w1["write_cpu_s"] - w0["write_cpu_s"]) / per,
        port_writes_per_frame=(w1["writes"] - w0["writes"]) / per,
        relay_main_ms_per_frame=1000 * (w1["main_cpu_s"] - w0["main_cpu_s"]) / per,
        relay_writer_ms_per_frame=1000 * (w1["writer_cpu_s"] - w0["writer_cpu_s"]) / per,
        x_ms_per_frame=1000 * (x1 - x0) / per,
        kb_per_frame=(b1 - b0) / per / 1024,
        cpu_pct=100 * (engine_s + (x1 - x0)) / elapsed,
        worker_pct=100 * used[-1] / elapsed,
        others_pct=100 * (o1 - o0) / elapsed,
        peak_rss_mb=rss,
    )


@dataclass
class Unwatched:
    pipeline_pct: float  # service + worker, percent of one core
    x_pct: float  # the X server, percent of one core (the painter's own share included)
    frames: int  # DATA messages on the port meanwhile


def unwatched(server, args) -> Unwatched:
    """The installed pipeline while the whole screen animates and no host has asked for a stream
    (no client connected yet): what a session costs before anyone watches it."""
    _, mode, rate = WORKLOADS["full"]
    with session("relayed", mode, server, args, rate=rate, watched=False) as s:
        time.sleep(args.warmup)  # the worker connects and reads the screen's first damage
        c0, x0, t0 = sum(map(cpu_seconds, s.pids)), cpu_seconds(server.pid), time.monotonic()
        time.sleep(args.seconds)
        c1, x1, t1 = sum(map(cpu_seconds, s.pids)), cpu_seconds(server.pid), time.monotonic()
        s.check_alive()
        frames = s.drain.snapshot()[0]
    return Unwatched(100 * (c1 - c0) / (t1 - t0), 100 * (x1 - x0) / (t1 - t0), frames)


def painter_only(workload: str, server, seconds: float) -> float:
    """X server CPU% caused by the painter alone (no capture), to read the others against."""
    _, mode, rate = WORKLOADS[workload]
    painter = start_painter(server, mode, rate)
    try:
        time.sleep(1.0)  # its pace settles
        x0, t0 = cpu_seconds(server.pid), time.monotonic()
        time.sleep(seconds)
        return 100 * (cpu_seconds(server.pid) - x0) / (time.monotonic() - t0)
    finally:
        stop(painter)


def print_table(results: dict[tuple[str, str], Result], painter_x: dict[str, float], args,
                width: int, height: int) -> None:
    print(f"Xvfb {width}x{height}, quality {args.quality}, fps cap {args.fps}, "
          f"the median of {args.rounds} runs of {args.seconds:g}s (engines taking turns); "
          "CPU = engine processes + Xvfb process (/proc stat); "
          "relayed = service (supervisor + port relay) + worker; 'new' = frames whose JPEG differs "
          "from the one before")
    head = (f"{'engine':9s} {'workload':8s} {'fps':>6s} {'new':>5s} {'CPU ms/frame':>13s} "
            f"{'(worker':>8s} {'service':>8s} {'+ X)':>6s} {'KB/frame':>9s} {'CPU % core':>11s} "
            f"{'X% by painter':>14s} {'others %':>9s} {'peak RSS MB':>12s}")
    print(head)
    print("-" * len(head))
    for (engine, workload), r in results.items():
        print(f"{engine:9s} {workload:8s} {r.fps:6.1f} {r.new_frames:5d} {r.cpu_ms_per_frame:13.1f} "
              f"{r.worker_ms_per_frame:8.2f} {r.service_ms_per_frame:8.2f} {r.x_ms_per_frame:6.1f} "
              f"{r.kb_per_frame:9.1f} {r.cpu_pct:11.1f} {painter_x[workload]:14.1f} "
              f"{r.others_pct:9.1f} {r.peak_rss_mb:12.1f}")


WORKLOAD_NAMES = {"full": "whole screen", "region": "region 480x270"}


def median_run(runs: list[Result]) -> Result:
    """The run whose CPU per frame is the median (the lower middle of an even count)."""
    return sorted(runs, key=lambda r: r.cpu_ms_per_frame)[(len(runs) - 1) // 2]


def round_ratios(runs: dict[tuple[str, str], list[Result]], workload: str) -> str:
    """Relayed against baseline round by round (each pair measured back to back)."""
    pairs = zip(runs[("relayed", workload)], runs[("baseline", workload)], strict=True)
    return " ".join(f"x{r.cpu_ms_per_frame / max(b.cpu_ms_per_frame, 1e-9):.2f}" for r, b in pairs)


def unwatched_check(u: Unwatched, painter_x_pct: float) -> tuple[str, bool]:
    return (f"unwatched (no host has asked for a stream), whole screen animating: service + worker "
            f"{u.pipeline_pct:.2f}% of a core, X {u.x_pct - painter_x_pct:+.1f}% beside the painter's "
            f"own {painter_x_pct:.1f}%, {u.frames} frames on the port (< {TARGET_IDLE_CPU_PCT}%, "
            f"no frame)", u.pipeline_pct < TARGET_IDLE_CPU_PCT and u.frames == 0)


def cpu_checks(results: dict[tuple[str, str], Result],
               runs: dict[tuple[str, str], list[Result]]) -> list[tuple[str, bool]]:
    # Ratios are the whole pipeline as installed (relayed: service + worker + X) against the
    # baseline's same workload, from the median runs; each round's own ratio follows, and the
    # worker writing the pty itself is shown next to them.
    b_full = results[("baseline", "full")]
    r_full, w_full = results[("relayed", "full")], results[("worker", "full")]
    checks = []
    fps_ratio = r_full.fps / max(b_full.fps, 1e-9)
    fps_ok = r_full.fps >= TARGET_FULL_FPS * 0.97 or fps_ratio >= TARGET_FULL_FPS_RATIO
    checks.append((f"full: fps {r_full.fps:.1f} relayed (the cap {TARGET_FULL_FPS}, less 3% for "
                   f"timer slack) or x{fps_ratio:.2f} baseline (>= x{TARGET_FULL_FPS_RATIO})", fps_ok))
    for workload, target in (("full", TARGET_FULL_CPU_RATIO), ("region", TARGET_REGION_CPU_RATIO)):
        base = results[("baseline", workload)].cpu_ms_per_frame
        ratio = results[("relayed", workload)].cpu_ms_per_frame / max(base, 1e-9)
        direct = results[("worker", workload)].cpu_ms_per_frame / max(base, 1e-9)
        checks.append((f"{WORKLOAD_NAMES.get(workload, workload)}: CPU/frame x{ratio:.2f} baseline "
                       f"relayed (<= x{target}; round by round {round_ratios(runs, workload)}; "
                       f"the worker writing the pty itself x{direct:.2f})", ratio <= target))
    r_typ, w_typ = results[("relayed", "typing")], results[("worker", "typing")]
    typ_runs = " ".join(f"{r.worker_ms_per_frame:.2f}" for r in runs[("relayed", "typing")])
    checks.append((f"typing: worker {r_typ.worker_ms_per_frame:.2f} ms CPU per frame relayed "
                   f"(<= {TARGET_TYPING_WORKER_MS} ms; the runs {typ_runs}; "
                   f"{w_typ.worker_ms_per_frame:.2f} ms writing the "
                   f"pty itself), {r_typ.kb_per_frame:.0f} KB per frame",
                   r_typ.worker_ms_per_frame <= TARGET_TYPING_WORKER_MS))
    pointer = [results[(e, "pointer")] for e in WORKLOADS["pointer"][0]]
    new = sum(r.new_frames for r in pointer)
    moved = all(r.cursor_moves > 0 for r in pointer)  # else the workload did not run
    checks.append(("pointer motion alone (XTest, 60 Hz): " + "; ".join(
        f"{r.engine} {r.new_frames} new of {r.frames} frames sent ({r.cursor_moves} CURSOR_MOVE), "
        f"the worker at {r.worker_pct:.1f}% of a core" for r in pointer)
        + f" (new frames <= {TARGET_POINTER_NEW_FRAMES}, and the pointer seen moving)",
        new <= TARGET_POINTER_NEW_FRAMES and moved))
    w_idle = results[("worker", "idle")]
    checks.append((f"idle: {w_idle.cpu_pct:.2f}% of a core (< {TARGET_IDLE_CPU_PCT}%)",
                   w_idle.cpu_pct < TARGET_IDLE_CPU_PCT))
    relay_ratio = r_full.cpu_ms_per_frame / max(b_full.cpu_ms_per_frame, 1e-9)
    cpu_ratio = w_full.cpu_ms_per_frame / max(b_full.cpu_ms_per_frame, 1e-9)
    checks.append((f"relay: service {r_full.service_ms_per_frame:.2f} ms per 1080p frame "
                   f"(<= {TARGET_RELAY_MS_PER_FRAME} ms): main thread (worker socket, parse, check) "
                   f"{r_full.relay_main_ms_per_frame:.2f} ms, port writer thread "
                   f"{r_full.relay_writer_ms_per_frame:.2f} ms of which "
                   f"{r_full.port_write_ms_per_frame:.2f} ms in {r_full.port_writes_per_frame:.0f} "
                   f"writev()s to the pty (a real virtio port took 9 per frame and never made the "
                   f"writer wait: bench/vm_relay.py); whole pipeline (service + worker + X) "
                   f"x{relay_ratio:.2f} baseline, direct write x{cpu_ratio:.2f}",
                   r_full.service_ms_per_frame <= TARGET_RELAY_MS_PER_FRAME))
    rss = max(r.peak_rss_mb for (e, _), r in results.items() if e != "baseline")
    checks.append((f"worker peak RSS {rss:.0f} MB at 1080p, any workload, direct or relayed "
                   f"(< {TARGET_WORKER_RSS_MB} MB)", rss < TARGET_WORKER_RSS_MB))
    return checks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="measuring window per CPU run")
    ap.add_argument("--rounds", type=int, default=3,
                    help="CPU runs per engine and workload, the engines taking turns; the table "
                         "shows the median run")
    ap.add_argument("--warmup", type=float, default=3.0,
                    help="seconds before each window (an MJPEG frame goes again 0.5 and 2 s after it)")
    ap.add_argument("--fps", type=int, default=60)
    ap.add_argument("--quality", type=int, default=80)
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma-separated, of {', '.join(PARTS)} (default all)")
    ap.add_argument("--codecs", default=",".join(videocodecs.CODECS),
                    help="the codecs part's codecs, comma-separated (MJPEG, the reference, always)")
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if unknown := set(parts) - set(PARTS):
        ap.error(f"unknown parts: {', '.join(sorted(unknown))}")
    codecs = {c for c in args.codecs.split(",") if c} | {"mjpeg"}
    if unknown := codecs - set(videocodecs.CODECS):
        ap.error(f"unknown codecs: {', '.join(sorted(unknown))}")
    args.codecs = tuple(c for c in videocodecs.CODECS if c in codecs)
    width, height = (int(v) for v in args.size.split("x"))
    started = time.monotonic()
    server = start_xvfb(width, height)
    results: dict[tuple[str, str], Result] = {}
    runs: dict[tuple[str, str], list[Result]] = {}
    painter_x: dict[str, float] = {}
    prof = lat = port = quiet = None
    codec_checks: list[tuple[str, bool]] = []
    try:
        if "cpu" in parts:
            for workload, (engines, _, _) in WORKLOADS.items():
                painter_x[workload] = painter_only(workload, server, min(args.seconds, 3.0))
                # The host's speed drifts (it is shared): the engines take turns, round after
                # round, so a slow spell falls on all of them, and the median run is shown.
                for _ in range(args.rounds):
                    for engine in engines:
                        r = measure(engine, workload, server, args)
                        runs.setdefault((engine, workload), []).append(r)
                        print(f"  measured {engine:8s} {workload:7s}: {r.fps:5.1f} fps, "
                              f"{r.cpu_ms_per_frame:5.1f} ms/frame", flush=True)
            results = {key: median_run(rs) for key, rs in runs.items()}
            quiet = unwatched(server, args)
            print("  measured the pipeline unwatched", flush=True)
        if "profile" in parts:
            prof = floor.profile(server, args)
            print("  measured the 1080p frame profile and the floor", flush=True)
        if "latency" in parts:
            lat = latency.latencies(server, args)
        if "port" in parts:
            port = latency.blocked_port(server, args, results.get(("relayed", "full")))
        if "codecs" in parts:
            codec_checks = videocodecs.run(server, args)
    finally:
        server.stop()
        if os.path.exists(RELAY_STATS):
            os.remove(RELAY_STATS)

    checks: list[tuple[str, bool]] = []
    if results:
        print()
        print_table(results, painter_x, args, width, height)
        checks += cpu_checks(results, runs)
        if quiet is not None:
            checks.append(unwatched_check(quiet, painter_x["full"]))
    if prof is not None:
        print()
        floor.print_profile(prof, results.get(("worker", "full")))
    if lat is not None:
        print()
        latency.print_latencies(lat)
        checks += latency.latency_checks(lat)
    if port is not None:
        print()
        latency.print_port(port)
        checks += latency.port_checks(port)
    checks += codec_checks
    print()
    for text, ok in checks:
        print(f"  [{'PASS' if ok else 'MISS'}] {text}")
    print(f"\n(bench took {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
