"""FamilyLocal Xauthority entries follow the hostname at the time of the check, as X clients do.

udev may start the service before DHCP or cloud-init set the machine's real hostname; a session's
Xauthority written afterwards holds a FamilyLocal entry for the new name, which libXau (xauth,
xdpyinfo, every X client) matches against gethostname() when it connects. The service's check and the
worker's cookie choice must do the same at each check, and the unit must not freeze the hostname
(ProtectHostname= gives the service a UTS namespace of its own, a copy taken at start).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Runs in a new UTS namespace: our modules are imported (the code has started), then the hostname
# changes, then xauth writes the session's cookie for the display, as a login would.
DRIVER = r"""
import json, os, secrets, socket, subprocess, sys, tempfile, time
import Xlib.display
from spice_stream_common import xauthority
from spice_stream_worker.sources import xauth

started_as = socket.gethostname()
late = "late-" + secrets.token_hex(4)
subprocess.run(["hostname", late], check=True)

number = int(sys.argv[1])
display = f":{number}"
cookie = secrets.token_hex(16)
tmp = tempfile.mkdtemp(prefix="spice-hostname-")
path = os.path.join(tmp, "Xauthority")
subprocess.run(["xauth", "-f", path, "add", display, "MIT-MAGIC-COOKIE-1", cookie], check=True)
listed = subprocess.run(["xauth", "-f", path, "list"], capture_output=True, text=True,
                        check=True).stdout.split()

xvfb = subprocess.Popen(["Xvfb", display, "-auth", path, "-nolisten", "tcp", "-noreset"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    deadline = time.monotonic() + 15
    while not os.path.exists(f"/tmp/.X11-unix/X{number}"):
        assert xvfb.poll() is None and time.monotonic() < deadline, "Xvfb did not start"
        time.sleep(0.05)
    env = dict(os.environ, DISPLAY=display, XAUTHORITY=path)
    x_client = subprocess.run(["xdpyinfo"], env=env, capture_output=True, text=True).returncode

    with open(path, "rb") as f:
        data = f.read()
    try:
        service = xauthority.require_cookie_for(data, display).data.hex()
    except Exception as e:
        service = f"refused: {e}"

    os.environ["XAUTHORITY"] = path
    xauth.install()
    worker_cookie = xauth._get_auth(None, display, "unix", "", number)[1].hex()
    try:
        Xlib.display.Display(xauth.local_only(display)).close()
        worker = "connected"
    except Exception as e:
        worker = f"refused: {e}"
finally:
    xvfb.kill()
    xvfb.wait()
print(json.dumps(dict(started_as=started_as, late=late, now=socket.gethostname(), listed=listed,
                      cookie=cookie, x_client=x_client, service=service,
                      worker_cookie=worker_cookie, worker=worker)))
"""


def free_display() -> int:
    for n in range(180, 240):
        if not os.path.exists(f"/tmp/.X11-unix/X{n}") and not os.path.exists(f"/tmp/.X{n}-lock"):
            return n
    raise AssertionError("no free X display number in 180-239")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None
                    or shutil.which("Xvfb") is None or shutil.which("xauth") is None,
                    reason="needs root, unshare(1), Xvfb and xauth")
def test_familylocal_entry_for_a_hostname_set_after_start_is_accepted() -> None:
    number = free_display()
    p = subprocess.run(["unshare", "--uts", sys.executable, "-c", DRIVER, str(number)],
                       capture_output=True, text=True, timeout=120, check=False, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(p.stdout.splitlines()[-1])
    assert r["now"] == r["late"] != r["started_as"]
    # xauth wrote a FamilyLocal entry for the new name (not FamilyWild: that would match any host).
    assert r["listed"] == [f"{r['late']}/unix:{number}", "MIT-MAGIC-COOKIE-1", r["cookie"]]
    assert r["x_client"] == 0, "a real X client picks that entry and the server accepts it"
    assert r["service"] == r["cookie"], r["service"]
    assert r["worker_cookie"] == r["cookie"]
    assert r["worker"] == "connected"


def test_unit_does_not_freeze_the_hostname() -> None:
    """ProtectHostname=yes runs the service (and its workers) in a UTS namespace copied at start:
    a hostname set later is never seen there, while X clients in the session use it."""
    text = (REPO / "dbus" / "spice-streamd.service").read_text()
    settings = re.findall(r"(?m)^ProtectHostname=(.*)$", text)
    assert settings in ([], ["no"]), f"ProtectHostname={settings}"  # yes and private both freeze it
