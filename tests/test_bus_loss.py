"""The bus going away: the service and the helper say so in one line and exit, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.logind import PrivateBus
from tests.support.waiting import wait_until


@pytest.mark.parametrize("program,expected_rc,last_line", [
    ("helper", 3, "spice-stream-helper: lost the bus connection"),
    ("service", 1, "lost the bus connection: exiting"),
])
def test_bus_gone_is_one_line_and_an_exit(program, expected_rc, last_line, tmp_path):
    err_path = tmp_path / "stderr"
    with PrivateBus() as bus:
        env = dict(os.environ, DISPLAY=":99", XAUTHORITY="/nonexistent")
        if program == "helper":
            argv = [sys.executable, "-m", "spice_stream_helper.main", "--bus", bus.address]
            ready = "waiting for it"
        else:
            argv = [sys.executable, "-m", "spice_streamd.main", "--bus", bus.address,
                    "--device", str(tmp_path / "absent"), "--idle-exit", "0"]
            ready = "ready on the"
        with open(err_path, "w") as err:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_until(lambda: ready in err_path.read_text(), timeout=20, what=f"{program} up")
        except BaseException:
            proc.kill()
            raise
    # The bus daemon is gone now.
    try:
        rc = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err_path.read_text()
    assert rc == expected_rc, text
    assert "Traceback" not in text and "never retrieved" not in text, text
    assert text.strip().splitlines()[-1].endswith(last_line), text
