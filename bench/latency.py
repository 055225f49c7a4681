"""Latency from an X drawing request to the whole frame on the port, and a host that stops or slows.

The painter draws a marker square whose colour encodes its step number and records time.monotonic()
just before each step's requests. The bench's Drain records time.monotonic() when each DATA message's
last byte is read off the pty and keeps the JPEG; afterwards each JPEG is decoded at 1/8 scale (PIL
draft mode: DC coefficients only) and its marker read. A step's latency is the time from its request
to the first frame showing it or a later step (a later one includes it). Both processes run on this
machine, so their monotonic clocks agree.
"""

from __future__ import annotations

import bisect
import io
import time
from dataclasses import dataclass

from common import Frame, cpu_seconds, painter_sends, session
from content import MARKER_AT, MARKER_SIZE, MARKER_VALUES, marker_value
from PIL import Image

# case: (painter mode, steps per second, seconds of steps measured)
CASES = {
    "64x64": ("marker", 20.0, 12.0),
    "whole screen": ("fullmarker", 60.0, 5.0),
}
TARGET_P95_MS = {"64x64": 25.0, "whole screen": 40.0}
MIN_CHANGES = 100  # fewer measured changes than this is no measurement
LATENCY_ENGINES = ("worker", "relayed")
SETTLE_S = 1.5  # after the first frame, before steps count
TAIL_TIMEOUT_S = 3.0  # how long the last step may take to show once the painter stopped
QUIET_S = 0.5  # a video stream with no frame for this long after the painter stopped is complete

BLOCK_S = 3.0
AFTER_RESUME_FRAMES = 30  # frames read after the resume before the run ends
TARGET_CATCH_UP_MS = 100.0
THROTTLE_BPS = 4 * 1024 * 1024
THROTTLE_WINDOW_S = 5.0
THROTTLE_KB_RATIO = 0.9  # KB/frame at least this share of the unthrottled run's: quality kept
THROTTLE_FPS_RATIO = 0.9  # fps at most this share of the unthrottled run's: the throttle binds


def read_marker(jpeg: bytes, at: tuple[int, int]) -> int | None:
    """The marker value (step % MARKER_VALUES) in a frame, None if the square is not a marker."""
    img = Image.open(io.BytesIO(jpeg))
    full_w = img.size[0]
    img.draft("RGB", (img.size[0] // 8, img.size[1] // 8))
    scale = full_w / img.size[0]
    cx = int((at[0] + MARKER_SIZE / 2) / scale)
    cy = int((at[1] + MARKER_SIZE / 2) / scale)
    values = {marker_value(img.getpixel((x, y))[:3]) for x in (cx - 1, cx) for y in (cy - 1, cy)}
    return values.pop() if len(values) == 1 else None


class Steps:
    """The painter's steps, to turn a marker value seen at a given time into its step number."""

    def __init__(self, sends: list[tuple[int, float]]) -> None:
        self.seqs = [s for s, _ in sends]
        self.times = [t for _, t in sends]

    def last_before(self, t: float) -> int:
        k = bisect.bisect_right(self.times, t) - 1
        return self.seqs[k] if k >= 0 else 0  # step 0 is drawn before the painter is ready

    def step_of(self, value: int | None, t: float) -> int | None:
        """The latest step sent before t that draws `value` (None: unreadable or not drawn yet)."""
        if value is None:
            return None
        last = self.last_before(t)
        seq = last - (last - value) % MARKER_VALUES
        return seq if seq >= 0 else None


@dataclass
class Latency:
    engine: str
    case: str
    rate: float
    changes: int
    shown: int  # steps some frame showed as the latest (the others were overtaken by a later step)
    unseen: int  # steps no frame showed, even overtaken
    unreadable: int  # frames in the window without a readable marker
    lat_ms: list[float]

    def pct(self, q: float) -> float:
        if not self.lat_ms:
            return float("nan")
        s = sorted(self.lat_ms)
        return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def frame_markers(codec: int, frames: list[Frame], at: tuple[int, int],
                  size: tuple[int, int]) -> tuple[list[int | None], list[str]]:
    """Each frame's marker value, and what a video decoder said went wrong: a JPEG read alone, a
    video codec's frames decoded in order from the first (videodecode)."""
    if codec == 1:
        return [read_marker(f.jpeg, at) for f in frames], []
    from videodecode import decode_markers

    decoded = decode_markers(codec, [f.jpeg for f in frames], *size, at)
    return decoded.markers, decoded.errors


def latencies_of(frames: list[Frame], markers: list[int | None], steps: Steps,
                 window: list[tuple[int, float]]) -> tuple[list[float], int, int, int]:
    """(latencies ms, steps shown, steps unseen, unreadable frames) of the window's steps."""
    lat: list[float] = []
    shown: set[int] = set()
    unreadable = 0
    i = 0
    first = window[0][1] if window else float("inf")
    for f, marker in zip(frames, markers, strict=True):
        if f.done_at < first:
            continue
        seq = steps.step_of(marker, f.done_at)
        if seq is None:
            unreadable += 1
            continue
        shown.add(seq)
        while i < len(window) and window[i][0] <= seq:
            lat.append(1000 * (f.done_at - window[i][1]))
            i += 1
    wanted = {s for s, _ in window}
    return lat, len(shown & wanted), len(window) - i, unreadable


def wait_for_step(drain, steps: Steps, at: tuple[int, int], target: int, start: int,
                  timeout: float) -> bool:
    """Until a kept frame from index `start` on shows step `target` or later; False on timeout."""
    deadline = time.monotonic() + timeout
    i = start
    while drain.wait_kept(i, max(0.0, deadline - time.monotonic())):
        f = drain.kept[i]
        seq = steps.step_of(read_marker(f.jpeg, at), f.done_at)
        if seq is not None and seq >= target:
            return True
        i += 1
    return False


def one_latency(engine: str, case: str, server, args, codec: str = "mjpeg") -> Latency:
    """codec (relayed only): the service's `codecs` key, the host offering every codec."""
    mode, rate, seconds = CASES[case]
    at = MARKER_AT[mode]
    with session(engine, mode, server, args, rate=rate, keep=True, codecs=codec) as s:
        time.sleep(SETTLE_S)
        t0 = time.monotonic()
        time.sleep(seconds)  # the painter steps on; these steps are measured
        t1 = time.monotonic()
        sends = painter_sends(s.painter)
        steps = Steps(sends)
        if codec == "mjpeg":
            start = bisect.bisect_left([f.done_at for f in s.drain.kept], t1)
            wait_for_step(s.drain, steps, at, sends[-1][0], start, TAIL_TIMEOUT_S)
        else:
            # Frames are decoded only afterwards: the tail is in once the stream goes quiet.
            s.drain.wait_quiet(QUIET_S, TAIL_TIMEOUT_S)
        s.check_alive()
        frames = list(s.drain.kept)
        stream_codec = s.drain.codec
    markers, _ = frame_markers(stream_codec, frames, at, frame_size(args))
    window = [(q, t) for q, t in sends if t0 <= t <= t1]
    lat, shown, unseen, unreadable = latencies_of(frames, markers, steps, window)
    return Latency(engine if codec == "mjpeg" else f"{engine} {codec}", case, rate, len(window),
                   shown, unseen, unreadable, lat)


def frame_size(args) -> tuple[int, int]:
    w, h = args.size.split("x")
    return int(w), int(h)


def latencies(server, args) -> list[Latency]:
    out = []
    for case in CASES:
        for engine in LATENCY_ENGINES:
            r = one_latency(engine, case, server, args)
            out.append(r)
            print(f"  measured latency {engine:8s} {case}: p95 {r.pct(0.95):.1f} ms", flush=True)
    return out


def print_latencies(results: list[Latency]) -> None:
    print("Latency: painter's time.monotonic() before the X request -> the DATA message's last byte read "
          "on the pty; a change counts as shown by the first frame with its step or a later one")
    head = (f"  {'engine':9s} {'change':13s} {'steps/s':>7s} {'changes':>7s} {'shown':>6s} "
            f"{'unseen':>6s} {'unreadable':>10s} {'p50 ms':>7s} {'p95 ms':>7s} {'max ms':>7s}")
    print(head)
    print("  " + "-" * (len(head) - 2))
    for r in results:
        mx = max(r.lat_ms) if r.lat_ms else float("nan")
        print(f"  {r.engine:9s} {r.case:13s} {r.rate:7.0f} {r.changes:7d} {r.shown:6d} {r.unseen:6d} "
              f"{r.unreadable:10d} {r.pct(0.5):7.1f} {r.pct(0.95):7.1f} {mx:7.1f}")


def latency_checks(results: list[Latency]) -> list[tuple[str, bool]]:
    checks = []
    for case, target in TARGET_P95_MS.items():
        relayed = next(r for r in results if r.engine == "relayed" and r.case == case)
        direct = next(r for r in results if r.engine == "worker" and r.case == case)
        ok = relayed.pct(0.95) <= target and relayed.unseen == 0 and relayed.changes >= MIN_CHANGES
        checks.append((f"latency {case} relayed: p95 {relayed.pct(0.95):.1f} ms, p50 "
                       f"{relayed.pct(0.5):.1f} ms over {relayed.changes} changes, {relayed.unseen} unseen "
                       f"(p95 <= {target:g} ms; direct to the pty p95 {direct.pct(0.95):.1f} ms)", ok))
    return checks


# ---- the host stops reading, or reads slowly (relayed only: the service owns the port) ----------


@dataclass
class Port:
    block_s: float
    worker_pct_blocked: float  # the worker's CPU while the host did not read (after the 0.25 s pause)
    frames_while_blocked: int
    stale_after_resume: int | None  # frames completed after the resume showing an older picture
    catch_up_ms: float | None  # resume -> a frame showing the painter's step at the resume
    throttled_fps: float
    throttled_kb: float
    throttled_mbps: float
    reference_fps: float
    reference_kb: float
    reference_measured_here: bool


def blocked(server, args, codec: str = "mjpeg") -> tuple[float, int, int | None, float | None]:
    """(the worker's CPU % while blocked, frames completed while blocked, stale frames after the
    resume, ms from the resume to the current picture); `codec` as in one_latency."""
    mode = "fullmarker"
    at = MARKER_AT[mode]
    with session("relayed", mode, server, args, rate=60.0, keep=True, codecs=codec) as s:
        time.sleep(SETTLE_S)
        t_block = s.drain.pause()
        # The worker's CPU is measured from 0.5 s into the block: the relay pauses it after 0.25 s
        # without progress, and this figure shows whether it did.
        time.sleep(0.5)
        c0, tc0 = cpu_seconds(s.worker_pid), time.monotonic()
        time.sleep(BLOCK_S - 0.5)  # the host does not read for BLOCK_S in all
        c1, tc1 = cpu_seconds(s.worker_pid), time.monotonic()
        count_at_resume = s.drain.snapshot()[0]
        t_resume = s.drain.resume()
        s.drain.wait_frames(count_at_resume + AFTER_RESUME_FRAMES, 5.0)
        sends = painter_sends(s.painter)
        s.check_alive()
        frames = list(s.drain.kept)
        stream_codec = s.drain.codec
    markers, errors = frame_markers(stream_codec, frames, at, frame_size(args))
    if errors:
        # A delta frame lost or cut: the decoder says so (and its picture is not to be trusted).
        print(f"  {codec}: the decoder: {'; '.join(errors[:3])}", flush=True)
        return float("nan"), 0, None, None
    steps = Steps(sends)
    during = sum(1 for f in frames if t_block + 0.1 <= f.done_at < t_resume)
    current = steps.last_before(t_resume)
    stale = 0
    for f, marker in zip(frames, markers, strict=True):
        if f.done_at < t_resume:
            continue
        seq = steps.step_of(marker, f.done_at)
        if seq is not None and seq >= current:
            return 100 * (c1 - c0) / (tc1 - tc0), during, stale, 1000 * (f.done_at - t_resume)
        stale += 1
    return 100 * (c1 - c0) / (tc1 - tc0), during, None, None


def rate_run(server, args, read_rate: float | None) -> tuple[float, float]:
    """(fps, KB per frame) of relayed on the 'full' workload, the host reading at read_rate B/s."""
    with session("relayed", "full", server, args, rate=100.0, read_rate=read_rate) as s:
        time.sleep(args.warmup)
        f0, b0, _ = s.drain.snapshot()
        t0 = time.monotonic()
        time.sleep(THROTTLE_WINDOW_S)
        f1, b1, _ = s.drain.snapshot()
        t1 = time.monotonic()
        s.check_alive()
    frames = f1 - f0
    return frames / (t1 - t0), (b1 - b0) / max(frames, 1) / 1024


def blocked_port(server, args, reference=None) -> Port:
    """reference: the CPU table's relayed 'full' row, the unthrottled run (measured here if None)."""
    pct, during, stale, catch_up = blocked(server, args)
    caught = "never" if catch_up is None else f"{catch_up:.1f} ms"
    print(f"  measured the blocked port: current picture {caught} after the resume", flush=True)
    fps, kb = rate_run(server, args, THROTTLE_BPS)
    if reference is not None:
        ref_fps, ref_kb = reference.fps, reference.kb_per_frame
    else:
        ref_fps, ref_kb = rate_run(server, args, None)
    print(f"  measured the throttled port: {fps:.1f} fps", flush=True)
    return Port(BLOCK_S, pct, during, stale, catch_up, fps, kb, fps * kb / 1024, ref_fps, ref_kb,
                reference is None)


def print_port(r: Port) -> None:
    print(f"Port blocked (relayed, whole screen scrolling with a marker at 60 steps/s): the host stops "
          f"reading for {r.block_s:g} s, then reads again")
    catch = "never" if r.catch_up_ms is None else f"{r.catch_up_ms:.1f} ms"
    print(f"  worker CPU while blocked {r.worker_pct_blocked:.1f}% of a core, {r.frames_while_blocked} "
          f"frames completed while blocked; after the resume {r.stale_after_resume} stale frames, "
          f"then the picture of the resume's moment {catch} after it")
    ref = "measured here" if r.reference_measured_here else "the table's relayed full row"
    print(f"Port throttled (relayed, 'full' workload, host reads {THROTTLE_BPS / 2**20:g} MB/s): "
          f"{r.throttled_fps:.1f} fps, {r.throttled_kb:.1f} KB/frame ({r.throttled_mbps:.2f} MB/s taken); "
          f"unthrottled ({ref}) {r.reference_fps:.1f} fps, {r.reference_kb:.1f} KB/frame")


def port_checks(r: Port) -> list[tuple[str, bool]]:
    ok = r.catch_up_ms is not None and r.catch_up_ms <= TARGET_CATCH_UP_MS
    catch = "never" if r.catch_up_ms is None else f"{r.catch_up_ms:.1f} ms"
    checks = [(f"port blocked {r.block_s:g} s: current picture {catch} after the host reads again "
               f"(<= {TARGET_CATCH_UP_MS:g} ms), {r.stale_after_resume} stale frames first", ok)]
    kb_ratio = r.throttled_kb / max(r.reference_kb, 1e-9)
    fps_ratio = r.throttled_fps / max(r.reference_fps, 1e-9)
    checks.append((f"port throttled to {THROTTLE_BPS / 2**20:g} MB/s: fps x{fps_ratio:.2f} "
                   f"(<= x{THROTTLE_FPS_RATIO}), KB/frame x{kb_ratio:.2f} (>= x{THROTTLE_KB_RATIO}) "
                   "of the unthrottled run: frame rate gives way, not quality",
                   fps_ratio <= THROTTLE_FPS_RATIO and kb_ratio >= THROTTLE_KB_RATIO))
    return checks
