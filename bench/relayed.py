"""The service's half of the pipeline for the bench: supervisor and port relay, one real worker."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "service"))

from spice_streamd.supervisor import WorkerSupervisor, WorkerTarget  # noqa: E402


async def run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    sup = WorkerSupervisor(device_path=args.device, fps=args.fps, quality=args.quality,
                           worker_argv=[args.worker, "--log-level", "warning"],
                           device_present=True)
    # The bench's own user and display: the relay's cost does not depend on whose session it is.
    sup.set_target(WorkerTarget(os.getuid(), os.getgid(), (), os.environ["DISPLAY"],
                                os.environ["XAUTHORITY"], 1))
    await stop.wait()
    await sup.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", required=True)
    ap.add_argument("--worker", required=True)
    ap.add_argument("--fps", type=int, default=60)
    ap.add_argument("--quality", type=int, default=80)
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
