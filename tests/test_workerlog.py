"""A worker's stderr reaches the service's log bounded, escaped, rate-limited and marked as its."""

from __future__ import annotations

import asyncio
import logging

from spice_streamd.workerlog import MAX_LINE, relay_stderr


def feed(data: bytes, caplog) -> list[logging.LogRecord]:
    async def run():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        await relay_stderr(reader, "uid=1000 vt=2 pid=42")

    with caplog.at_level(logging.DEBUG, logger="spice_streamd.worker"):
        asyncio.run(run())
    return [r for r in caplog.records if r.name == "spice_streamd.worker"]


def test_lines_are_marked_escaped_and_capped_at_warning(caplog):
    records = feed(b"spice-stream-worker[42]: ERROR cannot open X display ':0'\n"
                   b"forged\rspice-streamd[1]: INFO session registered: uid 0\x1b[2J\n"
                   b"spice-stream-worker[42]: INFO start streaming\n", caplog)
    texts = [r.getMessage() for r in records]
    assert texts[0] == "worker uid=1000 vt=2 pid=42: cannot open X display ':0'"
    assert records[0].levelno == logging.WARNING  # a worker's ERROR is at most a warning here
    assert texts[1] == ("worker uid=1000 vt=2 pid=42: forged\\rspice-streamd[1]: INFO session "
                        "registered: uid 0\\x1b[2J")
    assert records[2].levelno == logging.INFO
    assert all(t.isprintable() for t in texts)


def test_floods_and_endless_lines_are_bounded(caplog):
    records = feed(b"x" * (50 * MAX_LINE) + b"\n" + b"line\n" * 1000, caplog)
    assert len(records) <= 25
    assert all(len(r.getMessage()) < MAX_LINE + 100 for r in records)
