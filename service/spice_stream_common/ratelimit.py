"""Token buckets and rate-limited logging for anything a caller can trigger."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable


class TokenBucket:
    """Allows `burst` events at once, then `rate` per second, per key; keys are bounded (LRU)."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._state: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def allow(self, key: Hashable) -> bool:
        now = self._clock()
        tokens, last = self._state.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        self._state[key] = (tokens, now)
        # A full bucket is the default state: forgetting the oldest key loses nothing that matters.
        while len(self._state) > self._max_keys:
            self._state.popitem(last=False)
        return ok


class LogLimiter:
    """At most one log line per key per `interval` seconds; reports how many were suppressed."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, *, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval = interval
        self._max_keys = max_keys
        self._clock = clock
        self._state: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()

    def log(self, level: int, key: Hashable, msg: str, *args: object) -> bool:
        now = self._clock()
        last, suppressed = self._state.pop(key, (None, 0))
        if last is not None and now - last < self._interval:
            self._state[key] = (last, suppressed + 1)
            self._trim()
            return False
        if suppressed:
            msg = msg + " (%d similar lines suppressed)"
            args = (*args, suppressed)
        self._logger.log(level, msg, *args)
        self._state[key] = (now, 0)
        self._trim()
        return True

    def _trim(self) -> None:
        while len(self._state) > self._max_keys:
            self._state.popitem(last=False)
