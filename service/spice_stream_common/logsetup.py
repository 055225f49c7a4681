"""Log output of the three programs: journald priorities when stderr is the journal, else name[pid]."""

from __future__ import annotations

import logging
import os
import sys

# syslog priorities (sd-daemon.h's SD_ERR...), which journald reads from a "<N>" line prefix.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


def priority(levelno: int) -> int:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _PRIORITY[level]
    return _PRIORITY[logging.DEBUG]


def stderr_is_journal(env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """True when stderr is the stream systemd connected to journald (JOURNAL_STREAM=dev:ino)."""
    try:
        dev, ino = (int(x) for x in env.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class JournalFormatter(logging.Formatter):
    """Each line (a traceback's too) gets the record's priority; journald adds name and pid."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


def setup(name: str, level: int | str, *, with_logger: bool = False) -> bool:
    """Configure the root logger for program `name`; returns True when writing to the journal.
    (The worker's stderr is a pipe the service reads, never the journal: see workerlog.)"""
    journal = stderr_is_journal()
    handler = logging.StreamHandler(sys.stderr)
    if journal:
        handler.setFormatter(JournalFormatter())
    else:
        logger = "%(name)s: " if with_logger else ""
        handler.setFormatter(logging.Formatter(
            f"{name}[{os.getpid()}]: %(levelname)s {logger}%(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return journal
