"""loopwatch.LoopWatch on a real asyncio loop with the real SIGALRM: a loop held by Python code is
logged once with that code's place; a loop left waiting (a process not given the CPU) says so;
a free loop logs nothing; close() gives SIGALRM and the timer back."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time

import pytest

from spice_streamd.loopwatch import LoopWatch

BEAT_S, HELD_S = 0.1, 0.3


def hold_the_loop(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


async def lines_after(caplog: pytest.LogCaptureFixture, action, wait_s: float = 3.0) -> list[str]:
    """Runs `action` in the loop, then lets it beat until a line comes (or wait_s passes)."""
    loop = asyncio.get_running_loop()
    watch = LoopWatch(loop, beat_s=BEAT_S, held_s=HELD_S)
    watch.start()
    try:
        await asyncio.sleep(2 * BEAT_S)
        action()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not caplog.records:
            await asyncio.sleep(BEAT_S / 2)
    finally:
        await watch.close()
    return [r.getMessage() for r in caplog.records if r.name == "spice_streamd.loopwatch"]


def test_a_loop_held_by_code_is_logged_once_with_where(caplog):
    caplog.set_level(logging.WARNING, "spice_streamd.loopwatch")
    lines = asyncio.run(lines_after(caplog, lambda: hold_the_loop(3 * HELD_S)))
    assert len(lines) == 1, lines
    assert "event loop" in lines[0] and "hold_the_loop" in lines[0], lines
    print(lines[0])
    late = float(lines[0].split("event loop ")[1].split(" s late")[0])
    assert 2 * HELD_S <= late <= 3 * HELD_S + 1.0, lines


def test_a_free_loop_logs_nothing(caplog):
    caplog.set_level(logging.WARNING, "spice_streamd.loopwatch")
    assert asyncio.run(lines_after(caplog, lambda: None, wait_s=1.0)) == []


def test_a_loop_not_given_the_cpu_is_said_to_wait(caplog):
    # The whole process stopped from outside (SIGSTOP, then SIGCONT 1 s later) while its loop
    # waits for events, as a guest short of CPU leaves it: the alarm finds it in its own wait.
    caplog.set_level(logging.WARNING, "spice_streamd.loopwatch")
    pid = os.getpid()
    children = []

    def stop_from_outside() -> None:
        children.append(subprocess.Popen(
            ["sh", "-c", f"sleep 0.2; kill -STOP {pid}; sleep 1; kill -CONT {pid}"]))

    lines = asyncio.run(lines_after(caplog, stop_from_outside))
    assert children[0].wait(5) == 0
    assert len(lines) == 1, lines
    assert "the process was not given the CPU" in lines[0] and "selectors.py" in lines[0], lines
    print(lines[0])


def test_close_gives_back_the_signal_and_the_timer():
    async def run() -> None:
        before = signal.getsignal(signal.SIGALRM)
        watch = LoopWatch(asyncio.get_running_loop(), beat_s=BEAT_S, held_s=HELD_S)
        watch.start()
        assert signal.getsignal(signal.SIGALRM) != before
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0
        await watch.close()
        assert signal.getsignal(signal.SIGALRM) == before
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)

    asyncio.run(run())
