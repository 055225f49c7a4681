"""The worker's report to the service that spawned it: one JSON object per line on an inherited pipe."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)

REPORT_INTERVAL_S = 1.0


class StatusReporter:
    """Writes state changes at once and counters at most once a second; never blocks the worker."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        self._last: dict[str, Any] = {}
        self._last_time = 0.0
        self.lost = False  # the reader went away: the service that started us is gone
        if fd is not None:
            os.set_blocking(fd, False)

    def report(self, state: dict[str, Any], *, force: bool = False) -> None:
        if self._fd is None:
            return
        now = time.monotonic()
        changed = {k: v for k, v in state.items() if k not in ("frames", "bytes", "fps")} != {
            k: v for k, v in self._last.items() if k not in ("frames", "bytes", "fps")
        }
        if not (force or changed or now - self._last_time >= REPORT_INTERVAL_S):
            return
        line = (json.dumps(state, separators=(",", ":")) + "\n").encode()
        try:
            # A line under PIPE_BUF is written whole or not at all, so the reader never sees half a report.
            os.write(self._fd, line)
        except BlockingIOError:
            return  # the service is not reading right now; the next report carries the same state
        except BrokenPipeError:
            self.lost = True
            self._fd = None
            return
        except OSError as exc:
            log.warning("status pipe failed (%s): no more status reports", exc.strerror)
            self._fd = None
            return
        self._last = dict(state)
        self._last_time = now
