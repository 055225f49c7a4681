#!/usr/bin/python3
"""Runs INSIDE the guest (Debian's python3, the installed .deb's modules): the relay's cost per frame.

    vm_relay_guest.py [--seconds S] [--fps N] [--frame-bytes B] [--ports virtio,pty]
                      [--modes counted,bare] [--rounds N]

For each port (the real virtio stream port, then a pty whose master a separate process drains as fast
as it can) and each mode ("counted": os.writev wrapped to count calls, EAGAINs, bytes per write and the
wall time per frame; "bare": no wrapper, the writer thread's write() syscalls from /proc's syscw), the
service's real PortRelay + WorkerChannel run on an asyncio loop, wired as the supervisor wires them,
and a forked fake worker sends FORMAT then ~290 KB DATA messages at `fps` for `seconds`.

CPU is per thread (/proc/self/task/TID/schedstat, ns), measured from the worker's first message until
every frame it sent has been written or replaced by a newer one. Prints one JSON document on stdout;
the relay's own log lines go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import socket
import sys
import threading
import time

from spice_stream_common import protocol as p
from spice_streamd import guestmessages
from spice_streamd.portrelay import PortRelay
from spice_streamd.workerchannel import WorkerChannel, socket_pair

VIRTIO_PORT = "/dev/virtio-ports/org.spice-space.stream.0"
WRITER_THREAD = "stream port writer"  # PortWriter's thread
DRAIN_TIMEOUT_S = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- per-thread figures from /proc ---------------------------------------------------------------------

def task_cpu_ns(tid: int) -> int:
    """CPU time of one of our threads in ns: schedstat's run time, else utime+stime (ticks)."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // CLK_TCK


def task_io(tid: int) -> dict[str, int]:
    """syscw (write syscalls, EAGAIN ones included) and wchar (bytes written) of one thread."""
    out = {}
    with open(f"/proc/self/task/{tid}/io") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("syscw", "wchar"):
                out[key] = int(value)
    return out


def task_switches(tid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/self/task/{tid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.endswith("ctxt_switches"):
                out[key.split("_")[0]] = int(value)
    return out


def system_snapshot() -> dict:
    """The whole guest: /proc/stat's cpu line (ticks) and /proc/interrupts' counts per source."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    stat = dict(zip(("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"),
                    values, strict=True))
    irqs = {}
    with open("/proc/interrupts") as f:
        ncpu = len(f.readline().split())
        for line in f:
            parts = line.split()
            if not parts:
                continue
            counts = [int(v) for v in parts[1:1 + ncpu] if v.isdigit()]
            irqs[" ".join([parts[0], *parts[1 + ncpu:]])] = sum(counts)
    return {"stat": stat, "irqs": irqs}


def system_delta(a: dict, b: dict) -> dict:
    ticks = {k: (b["stat"][k] - a["stat"][k]) * 1000 // CLK_TCK for k in a["stat"]}
    irqs = {k: v - a["irqs"].get(k, 0) for k, v in b["irqs"].items() if v - a["irqs"].get(k, 0)}
    return {"cpu_ms": ticks, "irqs": dict(sorted(irqs.items(), key=lambda kv: -kv[1])[:6])}


def cpu_snapshot() -> dict[int, int]:
    snap = {}
    for name in os.listdir("/proc/self/task"):
        try:
            snap[int(name)] = task_cpu_ns(int(name))
        except OSError:
            pass  # a thread that ended between listdir and open
    return snap


def port_holders(path: str) -> list[str]:
    """Processes (pid and name) that have `path` open."""
    real = os.path.realpath(path)
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == real:
                    with open(f"/proc/{pid}/comm") as f:
                        found.append(f"{pid} {f.read().strip()}")
                    break
        except OSError:
            continue
    return found


# -- os.writev, counted (only the writer thread's calls) ----------------------------------------------

class WriteCounter:
    """Wraps os.writev for the writer thread: calls, EAGAINs, bytes per write, wall time per message.

    PortWriter writes what is left of the message it is on (its pieces from the offset), so a call
    whose length is what is left of the previous one continues it; when nothing is left, the next
    call starts a new message."""

    def __init__(self, tid: int) -> None:
        self.tid = tid
        self.calls = 0
        self.ok = 0
        self.eagain = 0
        self.bytes = 0
        self.sizes: collections.Counter[int] = collections.Counter()
        self.left = 0
        self.msg_start = 0.0
        self.msg_len = 0
        self.data_walls: list[float] = []
        self._real = os.writev

    def install(self) -> None:
        os.writev = self.writev  # type: ignore[assignment]

    def uninstall(self) -> None:
        os.writev = self._real  # type: ignore[assignment]

    def writev(self, fd: int, pieces) -> int:
        if threading.get_native_id() != self.tid:
            return self._real(fd, pieces)
        length = sum(len(piece) for piece in pieces)
        if self.left == 0:
            self.msg_start = time.monotonic()
            self.msg_len = length
        self.calls += 1
        try:
            n = self._real(fd, pieces)
        except BlockingIOError:
            self.eagain += 1
            self.left = length
            raise
        except InterruptedError:
            self.left = length
            raise
        self.ok += 1
        self.bytes += n
        self.sizes[n] += 1
        self.left = length - n
        if self.left == 0 and self.msg_len > p.HEADER_SIZE + 1024:  # a DATA message, not FORMAT
            self.data_walls.append(time.monotonic() - self.msg_start)
        return n


# -- the processes around the relay ---------------------------------------------------------------------

def _send_result(fd: int, result: dict) -> None:
    os.write(fd, json.dumps(result).encode())
    os.close(fd)


def fake_worker(sock: socket.socket, go_r: int, frame: bytes, fps: float, seconds: float,
                result_w: int) -> None:
    """The forked worker: waits for the go, sends FORMAT, then DATA at `fps` (never in a burst to
    catch up: a late frame moves the schedule), closes its socket."""
    sent = late = 0
    if os.read(go_r, 1) == b"g":
        sock.sendall(p.format_msg(1920, 1080))
        count = round(fps * seconds)
        period = 1.0 / fps
        due = time.monotonic()
        for _ in range(count):
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            elif now - due > period / 2:
                late += 1
                due = now
            sock.sendall(frame)
            sent += 1
            due += period
    sock.close()
    _send_result(result_w, {"sent": sent, "late": late, "cpu_s": time.process_time()})


def drainer(master: int, result_w: int) -> None:
    """The forked pty reader: reads the master as fast as it can until the slave side is gone."""
    total = reads = 0
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: every slave fd is closed
            break
        if not chunk:
            break
        total += len(chunk)
        reads += 1
    _send_result(result_w, {"bytes": total, "reads": reads, "cpu_s": time.process_time()})


def fork_child(target, *args, close: tuple[int, ...] = ()) -> tuple[int, int]:
    """(pid, read end of its result pipe). Forked before any thread or loop of ours exists."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            for fd in close:
                os.close(fd)
            target(*args, w)
        except BaseException:
            logging.exception("child failed")
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def reap(pid: int, result_r: int) -> dict:
    chunks = []
    while chunk := os.read(result_r, 65536):
        chunks.append(chunk)
    os.close(result_r)
    _, status = os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks) or b"{}")
    result["exit"] = os.waitstatus_to_exitcode(status)
    return result


# -- one measured run -----------------------------------------------------------------------------------

async def measure(path: str, ours: socket.socket, go_w: int, counted: bool) -> dict:
    relay = PortRelay(path)
    relay.start()
    if not relay.is_open:
        relay.stop("could not open")
        raise RuntimeError(f"cannot open {path} (see the log above)")
    writer = next(t for t in threading.enumerate() if t.name == WRITER_THREAD)
    writer_tid = writer.native_id
    main_tid = threading.get_native_id()
    closed = asyncio.Event()
    delivered = {"data": 0, "other": 0}

    def deliver(msg: p.Message) -> None:
        delivered["data" if msg.type == p.MsgType.DATA else "other"] += 1
        relay.submit(msg)

    channel = WorkerChannel(
        ours, label="fake worker",
        check=lambda msg: guestmessages.refusal(msg, relay.host_caps, relay.format_sent),
        deliver=deliver, on_closed=closed.set)
    relay.attach(channel.send)
    counter = WriteCounter(writer_tid) if counted else None
    if counter:
        counter.install()
    try:
        sw0 = {t: task_switches(t) for t in (main_tid, writer_tid)}
        sys0 = system_snapshot()
        cpu0, io0, t0 = cpu_snapshot(), task_io(writer_tid), time.monotonic()
        os.write(go_w, b"g")
        await asyncio.wait_for(closed.wait(), DRAIN_TIMEOUT_S + 60)
        # The tail: the last frame may still be on its way to the port. Polled, but only for
        # the length of one frame's write, after the worker is done.
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while relay.frames + relay.dropped_frames < delivered["data"]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path}: frames not written within {DRAIN_TIMEOUT_S:g} s: "
                                   f"{relay.frames} written, {relay.dropped_frames} dropped, "
                                   f"{delivered['data']} received")
            await asyncio.sleep(0.002)
        cpu1, io1, t1 = cpu_snapshot(), task_io(writer_tid), time.monotonic()
        sys1 = system_snapshot()
        sw1 = {t: task_switches(t) for t in (main_tid, writer_tid)}
    finally:
        if counter:
            counter.uninstall()
    result = {
        "port": path, "counted": counted, "seconds": t1 - t0,
        "frames_received": delivered["data"], "frames": relay.frames,
        "dropped": relay.dropped_frames, "bytes": relay.bytes,
        "cpu_ns": {
            "main": cpu1.get(main_tid, 0) - cpu0.get(main_tid, 0),
            "writer": cpu1.get(writer_tid, 0) - cpu0.get(writer_tid, 0),
            "other": sum(v - cpu0.get(tid, 0) for tid, v in cpu1.items()
                         if tid not in (main_tid, writer_tid)),
        },
        "threads": {str(t.native_id): t.name for t in threading.enumerate()},
        "writer_io": {k: io1[k] - io0[k] for k in io1},
        "switches": {name: {k: sw1[t][k] - sw0[t][k] for k in sw1[t]}
                     for name, t in (("main", main_tid), ("writer", writer_tid))},
        "system": system_delta(sys0, sys1),
        "host_caps": relay.host_caps.hex() if relay.host_caps is not None else None,
        "host_codecs": list(relay.host_codecs) if relay.host_codecs is not None else None,
        "paused_at_end": relay.paused, "opens": relay.opens,
    }
    if counter:
        walls = sorted(counter.data_walls)
        result["writes"] = {
            "calls": counter.calls, "ok": counter.ok, "eagain": counter.eagain,
            "bytes": counter.bytes, "max": max(counter.sizes, default=0),
            "common": counter.sizes.most_common(4),
            "wall_ms": {"mean": 1e3 * sum(walls) / len(walls), "median": 1e3 * walls[len(walls) // 2],
                        "max": 1e3 * walls[-1]} if walls else None,
        }
    relay.detach()
    relay.stop("bench run done")
    await asyncio.sleep(0)  # let the closed channel's callbacks run
    return result


def run_one(kind: str, counted: bool, frame: bytes, fps: float, seconds: float) -> dict:
    slave = master = None
    drain = None
    if kind == "virtio":
        holders = port_holders(VIRTIO_PORT)
        if holders:
            raise RuntimeError(f"{VIRTIO_PORT} is held by {holders}")
        path = VIRTIO_PORT
    else:
        master, slave = os.openpty()
        path = os.ttyname(slave)
        drain = fork_child(drainer, master, close=(slave,))
        os.close(master)
    ours, theirs = socket_pair()
    go_r, go_w = os.pipe()
    worker = fork_child(fake_worker, theirs, go_r, frame, fps, seconds,
                        close=(ours.fileno(), go_w, *((slave,) if slave is not None else ())))
    theirs.close()
    os.close(go_r)
    try:
        result = asyncio.run(measure(path, ours, go_w, counted))
    finally:
        os.close(go_w)  # a worker still waiting for the go reads EOF and exits
        worker_result = reap(*worker)
        if slave is not None:
            os.close(slave)  # the drainer reads EIO once no slave fd is left
        drain_result = reap(*drain) if drain else None
    result["kind"] = kind
    result["worker"] = worker_result
    result["drainer"] = drain_result
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--fps", type=float, default=20.0)
    ap.add_argument("--frame-bytes", type=int, default=290_000, help="random bytes in each JPEG")
    ap.add_argument("--ports", default="virtio,pty")
    ap.add_argument("--modes", default="counted,bare")
    ap.add_argument("--rounds", type=int, default=2, help="every (mode, port) run this many times, "
                    "interleaved")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(relativeCreated)8.0f ms %(name)s: %(message)s")
    jpeg = b"\xff\xd8" + os.urandom(args.frame_bytes) + b"\xff\xd9"
    frame = p.data_header(len(jpeg)) + jpeg
    runs = []
    for round_no in range(1, args.rounds + 1):
        for mode in args.modes.split(","):
            for kind in args.ports.split(","):
                logging.info("-- round %d: %s, %s", round_no, kind, mode)
                runs.append(run_one(kind, mode == "counted", frame, args.fps, args.seconds))
                runs[-1]["round"] = round_no
    print(json.dumps({
        "uname": os.uname().release, "python": sys.version.split()[0],
        "cpus": os.cpu_count(), "frame_message_bytes": len(frame),
        "fps": args.fps, "seconds": args.seconds, "runs": runs,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
