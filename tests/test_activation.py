"""D-Bus activation with the project's own activation file: a helper's call starts the service, the
service leaves when idle, and the next call brings it back."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from spice_stream_common import constants
from spice_streamd.install import render
from tests.support.bus import REPO, VENV_BIN, Stack, wait_until

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real polkitd, test users")]

IDLE_EXIT_S = 2


def service_pid(stack: Stack) -> int:
    """The pid of the name's owner, as the bus daemon knows it; 0 when nobody owns it."""
    out = stack.bus.busctl("call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                           "org.freedesktop.DBus", "GetConnectionUnixProcessID", "s",
                           constants.BUS_NAME)
    return int(out.stdout.split()[1]) if out.returncode == 0 else 0


@pytest.fixture
def activating_stack():
    servicedir = tempfile.mkdtemp(prefix="spice-activation-")
    os.chmod(servicedir, 0o755)
    # Our activation file as install-system-files writes it, pointing at this virtualenv's script.
    text = (REPO / "dbus" / constants.ACTIVATION_FILE).read_text()
    with open(os.path.join(servicedir, constants.ACTIVATION_FILE), "w") as f:
        f.write(render(text, str(VENV_BIN)))
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
           # The service's own configuration, through its documented environment overrides.
           "SPICE_STREAMD_DEVICE": "/nonexistent/spice-stream-test",
           "SPICE_STREAMD_IDLE_EXIT": str(IDLE_EXIT_S)}
    stack = Stack(servicedir=servicedir, bus_env=env)
    try:
        yield stack
    finally:
        stack.close()  # the activated service loses its bus and exits
        shutil.rmtree(servicedir, ignore_errors=True)


def test_helper_call_activates_the_service_which_exits_idle_and_comes_back(activating_stack):
    stack = activating_stack
    uid = stack.uid("spice-test-a")
    assert service_pid(stack) == 0

    h = stack.helper("spice-test-a", "a", ":42")
    wait_until(lambda: stack.prop("Sessions") == [(2, uid, ":42")], timeout=20,
               what="registration through an activated service")
    first = service_pid(stack)
    with open(f"/proc/{first}/cmdline", "rb") as f:
        assert os.path.basename(f.read().split(b"\0")[1]) == b"spice-streamd"

    # No session and no device: the service leaves after idle_exit seconds.
    h.stop()
    wait_until(lambda: not os.path.exists(f"/proc/{first}") or service_pid(stack) == 0,
               timeout=IDLE_EXIT_S + 10, what="the idle service to exit")
    wait_until(lambda: service_pid(stack) == 0, timeout=5, what="the name released")

    # The next registration activates it again.
    stack.helper("spice-test-a", "a", ":42")
    wait_until(lambda: stack.prop("Sessions") == [(2, uid, ":42")], timeout=20,
               what="registration through a re-activated service")
    assert service_pid(stack) not in (0, first)
