"""Where the worker's time per whole-screen frame goes, step by step, and the floor on the same frames.

In this process, while the painter scrolls the whole screen ('full' workload): for each of PROFILE_FRAMES
frames, the worker's capture (Screen.grab(None)), the BGRX->RGB unpack (Image.frombytes into a reused
image, as the worker does), the JPEG save (Pillow, quality, 4:2:0, no optimize), and the worker's own
JpegEncoder(quality).encode(frame, None) for comparison. The raw frames go to a temp file, which
floor.c (built here with gcc against libturbojpeg) then encodes with tjCompress2 alone: the floor.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from common import HERE, ROOT, start_painter, stop
from PIL import Image, features

PROFILE_FRAMES = 60
SKIP_FRAMES = 3  # the first captures and encodes pay for allocations


@dataclass
class Step:
    wall_ms: float = 0.0
    cpu_ms: float = 0.0  # this thread's CPU (the capture's copy itself is the X server's)
    kb: float = 0.0


@dataclass
class Profile:
    frames: int
    shm: bool
    quality: int
    steps: dict[str, Step] = field(default_factory=dict)
    floor: Step | None = None
    floor_error: str = ""


class _Timer:
    def __init__(self, step: Step) -> None:
        self.step = step

    def __enter__(self) -> None:
        self.w0, self.c0 = time.perf_counter(), time.thread_time()

    def __exit__(self, *exc: object) -> None:
        self.step.wall_ms += 1000 * (time.perf_counter() - self.w0)
        self.step.cpu_ms += 1000 * (time.thread_time() - self.c0)


def build_floor(tmp: str) -> str:
    """Compile floor.c into tmp; returns the binary's path (RuntimeError with the reason if not)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("no gcc")
    exe = os.path.join(tmp, "floor")
    proc = subprocess.run([gcc, "-O2", "-Wall", "-o", exe, os.path.join(HERE, "floor.c"), "-lturbojpeg"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("cannot build floor.c (Debian: apt-get install libturbojpeg0-dev): "
                           + " ".join(proc.stderr.split())[:300])
    return exe


def run_floor(exe: str, raw: str, width: int, height: int, count: int, quality: int) -> Step:
    proc = subprocess.run([exe, raw, str(width), str(height), str(count), str(quality)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"floor exited with {proc.returncode}: {proc.stderr.strip()[:300]}")
    words = proc.stdout.split()
    values = dict(zip(words[::2], words[1::2], strict=True))
    if int(values["frames"]) != count:
        raise RuntimeError(f"floor encoded {values['frames']} frames of {count}")
    return Step(float(values["wall_ms"]), float(values["cpu_ms"]), float(values["kb"]))


def profile(server, args) -> Profile:
    if os.path.join(ROOT, "service") not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, "service"))
    from spice_stream_worker.encoder import JpegEncoder
    from spice_stream_worker.sources.x11 import Screen

    saved = {k: os.environ.get(k) for k in ("DISPLAY", "XAUTHORITY")}
    os.environ.update(server.env())
    painter = start_painter(server, "full", 100.0)
    tmp = tempfile.mkdtemp(prefix="spice-bench-floor-")
    try:
        screen = Screen(server.display)
        try:
            encoder = JpegEncoder(args.quality)
            names = ("capture", "unpack", "save", "encoder")
            steps = {n: Step() for n in names}
            scratch = {n: Step() for n in names}
            image: Image.Image | None = None
            raw = os.path.join(tmp, "frames.bgrx")
            with open(raw, "wb") as out:
                for i in range(SKIP_FRAMES + PROFILE_FRAMES):
                    into = steps if i >= SKIP_FRAMES else scratch
                    with _Timer(into["capture"]):
                        frame = screen.grab(None)
                    size = (frame.width, frame.height)
                    pixels = frame.pixels[:frame.stride * frame.height]
                    with _Timer(into["unpack"]):
                        if image is None or image.size != size:
                            image = Image.new("RGB", size)
                        try:
                            image.frombytes(pixels, "raw", ("BGRX", frame.stride, 1))
                        except TypeError:  # Pillow before 10 takes only bytes (Debian 12: 9.4)
                            image.frombytes(bytes(pixels), "raw", ("BGRX", frame.stride, 1))
                    buf = io.BytesIO()
                    with _Timer(into["save"]):
                        image.save(buf, "JPEG", quality=args.quality, subsampling=2, optimize=False)
                    into["save"].kb += len(buf.getvalue()) / 1024
                    with _Timer(into["encoder"]):
                        jpeg = encoder.encode(frame, None)
                    into["encoder"].kb += len(jpeg) / 1024
                    if i >= SKIP_FRAMES:
                        if frame.stride != frame.width * 4:
                            raise RuntimeError("the floor needs frames without row padding")
                        out.write(pixels)
            shm = screen.uses_shm
        finally:
            screen.close()
        for s in steps.values():
            s.wall_ms /= PROFILE_FRAMES
            s.cpu_ms /= PROFILE_FRAMES
            s.kb /= PROFILE_FRAMES
        prof = Profile(PROFILE_FRAMES, shm, args.quality, steps)
        try:
            exe = build_floor(tmp)
            prof.floor = run_floor(exe, raw, size[0], size[1], PROFILE_FRAMES, args.quality)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            prof.floor_error = str(exc)
        return prof
    finally:
        stop(painter)
        shutil.rmtree(tmp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def print_profile(prof: Profile, worker_full) -> None:
    """worker_full: the worker's 'full' row of the CPU table (None if that part did not run)."""
    print(f"Where a whole-screen frame's time goes: in-process, {prof.frames} frames of the 'full' "
          "workload; ms per frame, wall and this thread's CPU")
    rows = [
        ("capture", f"Screen.grab(None), {'MIT-SHM' if prof.shm else 'GetImage'}"),
        ("unpack", "BGRX -> RGB, Image.frombytes raw ('BGRX', stride, 1)"),
        ("save", f"Pillow JPEG save, q{prof.quality} 4:2:0 (libjpeg-turbo "
                 f"{features.version('libjpeg_turbo')})"),
    ]
    head = f"  {'step':9s} {'what':66s} {'wall ms':>8s} {'CPU ms':>7s} {'KB':>6s}"
    print(head)
    print("  " + "-" * (len(head) - 2))
    steps = prof.steps
    for name, what in rows:
        s = steps[name]
        kb = f"{s.kb:6.1f}" if s.kb else ""
        print(f"  {name:9s} {what:66s} {s.wall_ms:8.2f} {s.cpu_ms:7.2f} {kb:>6s}".rstrip())
    total = Step(sum(steps[n].wall_ms for n, _ in rows), sum(steps[n].cpu_ms for n, _ in rows))
    print(f"  {'sum':9s} {'':66s} {total.wall_ms:8.2f} {total.cpu_ms:7.2f}")
    e = steps["encoder"]
    print(f"  {'encoder':9s} {'the worker JpegEncoder.encode(frame, None): unpack + save':66s} "
          f"{e.wall_ms:8.2f} {e.cpu_ms:7.2f} {e.kb:6.1f}")
    if prof.floor is not None:
        f = prof.floor
        print(f"  {'floor':9s} {'libjpeg-turbo alone (floor.c): tjCompress2 from BGRX, same frames':66s} "
              f"{f.wall_ms:8.2f} {f.cpu_ms:7.2f} {f.kb:6.1f}")
        over = (steps["capture"].wall_ms + e.wall_ms) / max(f.wall_ms, 1e-9)
        line = f"  capture + the worker's encode = x{over:.1f} the floor (wall)"
        if worker_full is not None:
            per = worker_full.worker_ms_per_frame
            line += (f"; the worker process in the CPU table: {per:.2f} ms CPU per whole-screen frame, "
                     f"x{per / max(f.cpu_ms, 1e-9):.1f} the floor's CPU")
        print(line)
    else:
        print(f"  floor     not measured: {prof.floor_error}")
