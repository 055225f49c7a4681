"""What every bench run shares: the host's end of the pty (Drain), the painter, the engines, /proc figures."""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tests.support.waiting import stop_process, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV_BIN = os.path.join(ROOT, ".venv", "bin")
PYTHON = os.path.join(VENV_BIN, "python")
WORKER = os.path.join(VENV_BIN, "spice-stream-worker")
HEADER = struct.Struct("<BBHI")
MSG_FORMAT = 2
MSG_DATA = 3
MSG_CURSOR_MOVE = 7
START_STOP_MJPEG = bytes.fromhex("01000400020000000101")  # v1, START_STOP, 1 codec: MJPEG
# v1, START_STOP, 4 codecs: MJPEG, VP8, H.264, VP9 (a host whose clients decode them all)
START_STOP_ALL = HEADER.pack(1, 0, 4, 5) + bytes([4, 1, 2, 3, 4])
TICK = os.sysconf("SC_CLK_TCK")
# In a directory of this run's own (mkdtemp: a new name, mode 0700): the bench runs as root and a
# guessable name in /tmp is one another user could plant first (a symlink root would write through).
_STATS_DIR = tempfile.mkdtemp(prefix="spice-bench-")
atexit.register(shutil.rmtree, _STATS_DIR, ignore_errors=True)
RELAY_STATS = os.path.join(_STATS_DIR, "relay.json")
FIRST_FRAME_TIMEOUT_S = 15.0
READ_CHUNK = 1 << 20


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Frame:
    done_at: float  # time.monotonic() when its last byte was read off the pty
    jpeg: bytes


class Drain:
    """The host: reads the pty master in a thread and splits it into messages.

    Counts DATA messages and those whose JPEG differs from the previous one's (the baseline encodes
    an unchanged screen again, to the same bytes). keep=True keeps every frame with the time it was
    complete, for the latency runs to decode afterwards. pause()/resume() stop and restart reading
    (a host that stops reading); rate= reads at most that many bytes per second (a slow host).
    """

    def __init__(self, fd: int, *, keep: bool = False, rate: float | None = None) -> None:
        self.fd = fd
        self.keep = keep
        self.frames = 0
        self.new_frames = 0
        self.frame_bytes = 0
        self.keyframes = 0  # frames a decoder needs nothing before (every JPEG)
        self.keyframe_bytes = 0
        self.codec = 1  # the last FORMAT's
        self.formats: list[float] = []  # when each FORMAT was read
        self.last_frame_at = time.monotonic()
        self.cursor_moves = 0
        self.kept: list[Frame] = []
        self._rate = rate
        self._last: bytes | None = None
        self._cond = threading.Condition()
        self._reading = threading.Event()
        self._reading.set()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = bytearray()
        rate_start, taken = time.monotonic(), 0
        while not self._stop:
            if not self._reading.wait(0.1):
                continue
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if not ready or not self._reading.is_set():
                continue
            try:
                data = os.read(self.fd, READ_CHUNK if self._rate is None else 16384)
            except OSError:
                return
            now = time.monotonic()
            if not data:
                return
            buf += data
            self._split(buf, now)
            if self._rate is not None:
                taken += len(data)
                due = rate_start + taken / self._rate
                if due > now:
                    time.sleep(due - now)  # pacing the reads: this is the slow host

    def _split(self, buf: bytearray, now: float) -> None:
        while len(buf) >= HEADER.size:
            _, _, mtype, size = HEADER.unpack_from(buf)
            if len(buf) < HEADER.size + size:
                return
            if mtype == MSG_DATA:
                jpeg = bytes(buf[HEADER.size:HEADER.size + size])
                with self._cond:
                    self.frames += 1
                    self.last_frame_at = now
                    self.frame_bytes += size
                    if is_keyframe(self.codec, jpeg):
                        self.keyframes += 1
                        self.keyframe_bytes += size
                    if jpeg != self._last:
                        self.new_frames += 1
                    self._last = jpeg
                    if self.keep:
                        self.kept.append(Frame(now, jpeg))
                    self._cond.notify_all()
            elif mtype == MSG_CURSOR_MOVE:
                self.cursor_moves += 1
            elif mtype == MSG_FORMAT and size >= 9:
                with self._cond:
                    self.codec = buf[HEADER.size + 8]
                    self.formats.append(now)
            del buf[:HEADER.size + size]

    def snapshot(self) -> tuple[int, int, int]:
        with self._cond:
            return self.frames, self.frame_bytes, self.new_frames

    def keys(self) -> tuple[int, int]:
        """Keyframes so far, and their bytes."""
        with self._cond:
            return self.keyframes, self.keyframe_bytes


    def wait_frames(self, count: int, timeout: float) -> bool:
        """Until `count` frames have arrived in all; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.frames >= count, timeout)

    def wait_quiet(self, quiet: float, timeout: float) -> bool:
        """Until no frame has come for `quiet` seconds; False if frames still came at `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                left = self.last_frame_at + quiet - time.monotonic()
            if left <= 0:
                return True
            if time.monotonic() + left > deadline:
                return False
            time.sleep(left)  # until the quiet spell would end; a frame meanwhile moves it on

    def keyframe_after(self, t: float, timeout: float) -> float | None:
        """When the first keyframe read after monotonic time `t` (following a FORMAT read after
        it) came, waiting up to `timeout`; None if none did. Needs keep=True."""
        def found() -> float | None:
            if not any(f > t for f in self.formats):
                return None
            start = min(f for f in self.formats if f > t)
            return next((f.done_at for f in self.kept
                         if f.done_at >= start and is_keyframe(self.codec, f.jpeg)), None)

        with self._cond:
            self._cond.wait_for(lambda: found() is not None, timeout)
            return found()

    def wait_kept(self, index: int, timeout: float) -> bool:
        """Until kept[index] exists; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.kept) > index, timeout)

    def pause(self) -> float:
        self._reading.clear()
        return time.monotonic()

    def resume(self) -> float:
        now = time.monotonic()
        self._reading.set()
        return now

    def stop(self) -> None:
        self._stop = True
        self._reading.set()
        self._thread.join(2)


def is_keyframe(codec: int, frame: bytes) -> bool:
    """Whether a frame of this codec needs nothing before it: a JPEG; an H.264 access unit with an
    IDR slice; a VP8 frame whose tag says key (RFC 6386 9.1); a VP9 profile 0 frame whose header
    says key (its frame_type bit)."""
    if codec == 3:
        i = 0
        while (i := frame.find(b"\x00\x00\x01", i)) != -1 and i + 3 < len(frame):
            if frame[i + 3] & 0x1F == 5:
                return True
            i += 3
        return False
    if codec == 2:
        return bool(frame) and not frame[0] & 1
    if codec == 4:
        return bool(frame) and not frame[0] & 0x08 and not frame[0] & 0x04
    return True


def start_painter(server, mode: str, rate: float | None = None) -> subprocess.Popen[str]:
    args = [PYTHON, os.path.join(HERE, "painter.py"), mode]
    if rate is not None:
        args += ["--rate", str(rate)]
    proc = subprocess.Popen(args, env=server.full_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if line.strip() != "ready":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"painter {mode} did not start")
    return proc


def painter_sends(proc: subprocess.Popen[str]) -> list[tuple[int, float]]:
    """Stop a marker painter and return its [(step, monotonic time sent)]."""
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    for line in out.splitlines():
        if line.startswith("{"):
            return [(int(s), float(t)) for s, t in json.loads(line)["sends"]]
    raise RuntimeError(f"painter printed no steps (exit {proc.returncode})")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None:
        stop_process(proc)


def start_engine(engine: str, server, device: str, fps: int, quality: int,
                 codecs: str = "mjpeg") -> subprocess.Popen:
    if engine == "worker":
        args = [WORKER, "--device", device, "--fps", str(fps), "--quality", str(quality),
                "--start-codecs", "1", "--log-level", "warning"]
    elif engine == "relayed":
        # The service's supervisor and relay own the pty; the worker writes to their socket.
        args = [PYTHON, os.path.join(HERE, "relayed.py"), "--device", device, "--worker", WORKER,
                "--fps", str(fps), "--quality", str(quality), "--stats", RELAY_STATS,
                "--codecs", codecs]
    else:
        args = [PYTHON, os.path.join(HERE, "baseline.py"), "--device", device,
                "--fps", str(fps), "--quality", str(quality)]
    env = server.full_env()
    env["PYTHONPATH"] = os.path.join(ROOT, "service")
    return subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL)


def relay_stats(proc: subprocess.Popen) -> dict[str, float]:
    """relayed.py's figures so far (SIGUSR1): CPU in port writes and their count, and the CPU of its
    main thread (worker socket, parse, check) and of the port writer thread."""
    before = os.stat(RELAY_STATS).st_mtime_ns if os.path.exists(RELAY_STATS) else 0
    proc.send_signal(signal.SIGUSR1)
    wait_until(lambda: os.path.exists(RELAY_STATS) and os.stat(RELAY_STATS).st_mtime_ns != before,
               5, "relayed.py's report")
    with open(RELAY_STATS) as f:
        return json.load(f)


@dataclass
class Session:
    """One engine streaming one painter's screen to the bench's pty."""

    engine: str
    painter: subprocess.Popen[str]
    proc: subprocess.Popen
    drain: Drain
    pids: list[int] = field(default_factory=list)  # the engine's: [service, worker] when relayed
    master: int = -1  # the pty's host side: what the host says is written there

    @property
    def worker_pid(self) -> int:
        return self.pids[-1]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.engine} exited with {self.proc.returncode}")


@contextmanager
def session(engine: str, mode: str, server, args, *, rate: float | None = None, keep: bool = False,
            read_rate: float | None = None, watched: bool = True,
            codecs: str = "mjpeg") -> Iterator[Session]:
    """Painter, pty, drain and engine, up to the first frame on the pty; all stopped on exit.
    watched=False (relayed only): the host never asks for a stream, and no frame is waited for.
    codecs (relayed only): the service's key; the host then offers every codec."""
    painter = start_painter(server, mode, rate)
    master, slave = os.openpty()
    tty.setraw(slave)
    tty.setraw(master)
    proc = None
    drain = Drain(master, keep=keep, rate=read_rate)
    try:
        proc = start_engine(engine, server, os.ttyname(slave), args.fps, args.quality, codecs)
        s = Session(engine, painter, proc, drain, [proc.pid], master)
        if engine == "relayed":
            s.pids += wait_until(lambda: children(proc.pid), 10, "the relay's worker")
            if watched:
                # The host asks, through the relay.
                os.write(master, START_STOP_MJPEG if codecs == "mjpeg" else START_STOP_ALL)
        if watched and not drain.wait_frames(1, FIRST_FRAME_TIMEOUT_S):
            s.check_alive()
            raise RuntimeError(f"{engine}: no frame within {FIRST_FRAME_TIMEOUT_S:g} s")
        yield s
    finally:
        stop(proc)
        stop(painter)
        drain.stop()
        os.close(slave)
        os.close(master)
