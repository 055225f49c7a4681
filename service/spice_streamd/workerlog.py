"""A worker's stderr in the service's log: its user controls it, so each line is bounded, escaped,
rate-limited and marked with the worker's subject, at most at warning priority."""

from __future__ import annotations

import asyncio
import logging
import re

from spice_stream_common.ratelimit import TokenBucket
from spice_stream_common.untrusted import shown

log = logging.getLogger("spice_streamd.worker")

MAX_LINE = 1024
READ_CHUNK = 4096
LINES_PER_S = 2.0
LINE_BURST = 20.0
# The worker's own format, "spice-stream-worker[PID]: LEVEL message": the level is a hint only,
# never above warning (a worker cannot make the service's log cry error).
_LEVEL = re.compile(r"^spice-stream-worker\[\d+\]: (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
           "ERROR": logging.WARNING, "CRITICAL": logging.WARNING}


def level_and_text(line: str) -> tuple[int, str]:
    m = _LEVEL.match(line)
    if m is None:
        return logging.INFO, line
    return _LEVELS[m.group(1)], line[m.end():]


async def relay_stderr(stream: asyncio.StreamReader, subject: str) -> None:
    """Log every line the worker writes until it closes its stderr."""
    bucket = TokenBucket(LINES_PER_S, LINE_BURST)
    suppressed = 0
    pending = b""
    while True:
        chunk = await stream.read(READ_CHUNK)
        if not chunk:
            break
        pending += chunk
        lines = pending.split(b"\n")
        pending = lines.pop()
        if len(pending) > MAX_LINE:  # a line without end: cut it here
            lines.append(pending)
            pending = b""
        for raw in lines:
            if not raw.strip():
                continue
            if not bucket.allow(subject):
                suppressed += 1
                continue
            level, text = level_and_text(raw[:MAX_LINE].decode("utf-8", "replace"))
            if suppressed:
                text += f" ({suppressed} worker lines suppressed before this one)"
                suppressed = 0
            log.log(level, "worker %s: %s", subject, shown(text, MAX_LINE, quoted=False))
    if pending.strip():
        level, text = level_and_text(pending[:MAX_LINE].decode("utf-8", "replace"))
        log.log(level, "worker %s: %s", subject, shown(text, MAX_LINE, quoted=False))
