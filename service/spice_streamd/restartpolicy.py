"""When a worker that ended on its own is started again: backoff, and giving up after quick failures."""

from __future__ import annotations

import time
from collections.abc import Callable


class RestartPolicy:
    """Counts failures of runs shorter than `quick_run_s`; after `max_quick_failures` in a row the
    target is given up (until reset: a new target, or the device coming back)."""

    def __init__(self, *, quick_run_s: float = 10.0, max_quick_failures: int = 5,
                 backoff_s: float = 0.5, backoff_max_s: float = 8.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.quick_run_s = quick_run_s
        self.max_quick_failures = max_quick_failures
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        self.quick_failures = 0
        self.restarts = 0
        self.gave_up = False
        self.last_error = ""
        self._not_before = 0.0

    def failed(self, error: str, ran_s: float) -> float | None:
        """Record a failure; the delay before the next start, or None when giving up."""
        self.last_error = error
        self.quick_failures = self.quick_failures + 1 if ran_s < self.quick_run_s else 0
        if self.quick_failures >= self.max_quick_failures:
            self.gave_up = True
            return None
        n = max(self.quick_failures, 1)
        delay = min(self.backoff_s * 2 ** (n - 1), self.backoff_max_s)
        self._not_before = self._clock() + delay
        self.restarts += 1
        return delay

    def wait_left(self) -> float:
        """Seconds until the next start is allowed (0 when it is)."""
        return max(0.0, self._not_before - self._clock())
