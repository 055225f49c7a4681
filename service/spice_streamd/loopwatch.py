"""The service's event loop watched for stalls: a loop held a second or more is logged once, with
where its thread was meanwhile (Python code holding it, or the loop's own wait: a process not given
the CPU)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from types import FrameType

from spice_stream_common.ratelimit import LogLimiter

log = logging.getLogger(__name__)

# The loop beats this often; an alarm set at each beat for BEAT_S + HELD_S goes off only when the
# next beat is that late, and its handler, run in the loop's own thread, sees where it is.
BEAT_S = 0.5
HELD_S = 1.0
LOG_INTERVAL_S = 10.0  # one line per this long at most (a guest short of CPU holds it often)
FRAMES_SHOWN = 4
# Where the loop waits for its next event: seen there, it held nothing; the process did not run.
_LOOP_WAIT = {("selectors.py", "select"), ("base_events.py", "_run_once")}


def _where(frame: FrameType | None) -> list[tuple[str, int, str]]:
    """The innermost frames, innermost first: (file name, line, function)."""
    frames = []
    while frame is not None and len(frames) < FRAMES_SHOWN:
        code = frame.f_code
        frames.append((os.path.basename(code.co_filename), frame.f_lineno, code.co_name))
        frame = frame.f_back
    return frames


class LoopWatch:
    """Owns SIGALRM and the real-time interval timer of the process while started (close() gives
    them back). A VT switch waits on this loop: a held one is the first thing to rule out when a
    switch is late, and the journal's times (journald's, on arrival) cannot tell it apart from a
    slow journald."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, beat_s: float = BEAT_S,
                 held_s: float = HELD_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._loop = loop
        self._beat_s, self._held_s = beat_s, held_s
        self._clock = clock
        self._limiter = LogLimiter(log, LOG_INTERVAL_S)
        self._due: float | None = None
        self._seen: list[tuple[str, int, str]] | None = None  # where the alarm found the thread
        self._handle: asyncio.TimerHandle | None = None
        self._previous: object = None
        self._started = False

    def start(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGALRM, self._on_alarm)
            signal.setitimer(signal.ITIMER_REAL, self._beat_s + self._held_s)
        except (OSError, ValueError) as exc:  # a seccomp filter without @timer; not the main thread
            log.info("the event loop is not watched for stalls: %s", exc)
            return
        self._started = True
        self._beat()

    async def close(self) -> None:
        if not self._started:
            return
        self._started = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._previous)  # type: ignore[arg-type]

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        # Run in the loop's thread between two bytecodes, or with its wait interrupted: `frame` is
        # where it was held. Only noted here; the next beat logs it.
        if self._seen is None:
            self._seen = _where(frame)

    def _beat(self) -> None:
        now = self._clock()
        if self._due is not None and now - self._due >= self._held_s:
            self._report(now - self._due)
        self._seen = None
        self._due = now + self._beat_s
        signal.setitimer(signal.ITIMER_REAL, self._beat_s + self._held_s)
        self._handle = self._loop.call_at(self._loop.time() + self._beat_s, self._beat)

    def _report(self, late: float) -> None:
        seen = self._seen
        shown = " <- ".join(f"{name}:{line} {func}" for name, line, func in seen or ())
        if not seen:
            where = "not seen (held for less than the alarm's wait)"
        elif (seen[0][0], seen[0][2]) in _LOOP_WAIT:
            where = f"in the loop's own wait ({shown}): the process was not given the CPU"
        else:
            where = f"held by {shown}"
        self._limiter.log(logging.WARNING, "held", "event loop %.2f s late: %s", late, where)
