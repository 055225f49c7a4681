"""Log lines: journald priorities when stderr is the journal stream, name[pid] otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

PROGRAM = """
import logging, sys
from spice_stream_common import logsetup
print(logsetup.setup("spice-streamd", "INFO"), flush=True)
log = logging.getLogger("spice_streamd.x")
log.debug("hidden")
log.info("session registered: uid 1000 VT 2")
log.warning("refused uid 1001")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("unexpected")
"""


def run(journal: bool) -> tuple[str, list[str]]:
    """Run PROGRAM with stderr on a file; JOURNAL_STREAM names that file when journal=True."""
    r, w = os.pipe()
    st = os.fstat(w)
    env = dict(os.environ)
    env.pop("JOURNAL_STREAM", None)
    if journal:
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    else:
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino + 1}"  # another stream: not ours
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM], env=env,
                            stdout=subprocess.PIPE, stderr=w, text=True)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    return out.strip(), err.splitlines()


def test_journal_stream_gets_priorities_and_no_name_prefix():
    out, lines = run(journal=True)
    assert out == "True"
    assert lines[0] == "<6>session registered: uid 1000 VT 2"
    assert lines[1] == "<4>refused uid 1001"
    assert lines[2] == "<3>unexpected"
    # Every traceback line keeps the error's priority: none falls back to journald's default.
    assert len(lines) > 4 and all(line.startswith("<3>") for line in lines[2:])
    assert not any("spice-streamd[" in line or "hidden" in line for line in lines)


def test_other_stderr_gets_name_pid_and_level():
    out, lines = run(journal=False)
    assert out == "False"
    assert lines[0].startswith("spice-streamd[") and lines[0].endswith(
        "]: INFO session registered: uid 1000 VT 2")
    assert not any(line.startswith("<") for line in lines)
