"""The service's half of the pipeline for the bench: supervisor and port relay, one real worker."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "service"))

from spice_streamd import heap  # noqa: E402
from spice_streamd.supervisor import WorkerSupervisor, WorkerTarget  # noqa: E402


class WriteMeter:
    """CPU spent in os.writev, which in this process only the relay calls (its port writes)."""

    def __init__(self) -> None:
        self.cpu_s = 0.0
        self.calls = 0
        self._writev = os.writev
        os.writev = self.writev  # type: ignore[assignment]

    def writev(self, fd: int, pieces) -> int:
        t0 = time.thread_time()
        try:
            return self._writev(fd, pieces)
        finally:
            self.cpu_s += time.thread_time() - t0
            self.calls += 1


# BENCH_LOG=info shows what the relay and the worker say (the bench's figures stay quiet otherwise).
LOG_LEVEL = os.environ.get("BENCH_LOG", "warning").upper()
PORT_WRITER_THREAD = "stream port writer"  # portwriter.PortWriter's thread


def thread_cpu_s(thread: threading.Thread) -> float:
    """user + system CPU of one of this process's threads (a new port writer starts at 0)."""
    with open(f"/proc/self/task/{thread.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    meter = WriteMeter()
    heap.keep_frame_buffers()  # as the service's main() does

    def report() -> None:  # SIGUSR1: the bench reads these at the ends of its window
        with open(args.stats + ".tmp", "w") as f:
            json.dump({"write_cpu_s": meter.cpu_s, "writes": meter.calls,
                       "main_cpu_s": thread_cpu_s(threading.main_thread()),
                       "writer_cpu_s": sum(thread_cpu_s(t) for t in threading.enumerate()
                                           if t.name == PORT_WRITER_THREAD)}, f)
        os.replace(args.stats + ".tmp", args.stats)

    loop.add_signal_handler(signal.SIGUSR1, report)
    sup = WorkerSupervisor(device_path=args.device, fps=args.fps, quality=args.quality,
                           codecs=args.codecs,
                           worker_argv=[args.worker, "--log-level", LOG_LEVEL.lower()],
                           device_present=True)
    # The bench's own user and display: the relay's cost does not depend on whose session it is.
    sup.set_target(WorkerTarget(os.getuid(), os.getgid(), (), os.environ["DISPLAY"],
                                os.environ["XAUTHORITY"], 1))
    await stop.wait()
    await sup.close()


def main() -> None:
    logging.basicConfig(level=LOG_LEVEL, stream=sys.stderr, format="relayed %(name)s: %(message)s")
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", required=True)
    ap.add_argument("--worker", required=True)
    ap.add_argument("--fps", type=int, default=60)
    ap.add_argument("--quality", type=int, default=80)
    ap.add_argument("--stats", required=True, help="where SIGUSR1 writes the port-write figures")
    ap.add_argument("--codecs", default="mjpeg", help="the service's codecs key")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
