"""The port relay against the real libspice-server: a rejected message costs one reopen, after
which the same worker streams to a new client again; the port's bytes are always whole messages."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from spice_streamd.supervisor import WorkerSupervisor, WorkerTarget
from tests.support.spicehost import SpiceHost
from tests.support.waiting import wait_async
from tests.support.xserver import Painter, start_xvfb

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="runs the worker as nobody")]

NOBODY = 65534
WORKER = [sys.executable, "-m", "spice_stream_worker"]


def test_host_error_is_one_reopen_and_streaming_resumes(tmp_path):
    server = start_xvfb(320, 240, owner_uid=NOBODY)
    host = SpiceHost(follow_guest=True)
    painter = Painter(server)
    try:
        painter.fill(0, 0, 160, 240, (220, 30, 30))
        painter.fill(160, 0, 160, 240, (30, 30, 220))
        target = WorkerTarget(uid=NOBODY, gid=NOBODY, groups=(), display=server.display,
                              xauthority=server.xauthority, vt=2)
        pictures = []

        async def run():
            loop = asyncio.get_running_loop()
            sup = WorkerSupervisor(device_path=host.pty_path, fps=30, quality=90,
                                   worker_argv=WORKER)
            try:
                sup.set_target(target)
                await wait_async(lambda: sup.status["state"] == "running", timeout=20,
                                 what="worker running")
                assert host.wait_line(lambda s: s == "PORT opened", 10)
                pictures.append((await loop.run_in_executor(None, host.grab)).image)
                assert host.protocol_errors() == []

                # A garbled message reaches the host (as a torn one would): it rejects it,
                # says NOTIFY_ERROR and ignores the port until the guest reopens it.
                mark = host.mark()
                os.write(sup.relay._fd, b"\x07" * 64)
                await wait_async(lambda: sup.device_opens == 2, timeout=10,
                                 what="the relay reopening the port")
                host.wait_line(lambda s: s == "PORT closed", 10, mark)
                host.wait_line(lambda s: s == "PORT opened", 10, mark)
                errors_after_reopen = len(host.protocol_errors())
                # The same worker serves the next client: FORMAT and a whole frame again.
                pid = sup.status["pid"]
                pictures.append((await loop.run_in_executor(None, host.grab)).image)
                assert sup.status["pid"] == pid
                assert len(host.protocol_errors()) == errors_after_reopen >= 1
            finally:
                await sup.close()

        asyncio.run(run())
        assert len(pictures) == 2
        for picture in pictures:
            assert picture.size == (320, 240)
            left, right = picture.getpixel((40, 120)), picture.getpixel((280, 120))
            assert left[0] > 180 and left[2] < 80, left
            assert right[2] > 180 and right[0] < 80, right
    finally:
        painter.close()
        host.stop()
        server.stop()
