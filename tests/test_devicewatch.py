"""Device presence: real udev monitor events from an umockdev testbed, and the re-check fallback."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from spice_streamd.devicewatch import DeviceWatch

# Runs under umockdev-wrapper (LD_PRELOAD fakes /sys, /dev and the udev netlink for this process);
# the testbed's uevent() reaches our pyudev monitor, the same path a real hot-plug takes.
DRIVER = r'''
import asyncio, json, os, sys, time
import gi
gi.require_version("UMockdev", "1.0")
from gi.repository import UMockdev
from spice_streamd.devicewatch import DeviceWatch

SYSFS = "/sys/devices/pci0000:00/0000:00:05.0/virtio2/virtio-ports/vport2p1"
DESC = """P: /devices/pci0000:00/0000:00:05.0/virtio2/virtio-ports/vport2p1
N: vport2p1
E: DEVNAME=/dev/vport2p1
E: SUBSYSTEM=virtio-ports
E: MAJOR=250
E: MINOR=1
E: DEVLINKS=/dev/virtio-ports/org.spice-space.stream.0
A: name=org.spice-space.stream.0
A: dev=250:1
"""
OTHER = (DESC.replace("vport2p1", "vport2p2").replace("MINOR=1", "MINOR=2")
         .replace("org.spice-space.stream.0", "com.redhat.spice.0"))

async def wait(pred, timeout=3.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True

async def main():
    out = {}
    tb = UMockdev.Testbed.new()
    # The re-check is far away: only the monitor can report these changes in time.
    w = DeviceWatch(recheck_s=600)
    seen = []
    w.on_change(seen.append)
    await w.start()
    out["monitor"] = w._monitor is not None
    out["initial"] = w.present
    tb.add_from_string(OTHER)
    tb.uevent(SYSFS.replace("vport2p1", "vport2p2"), "add")
    await asyncio.sleep(0.3)
    out["other_port"] = w.present
    tb.add_from_string(DESC)
    tb.uevent(SYSFS, "add")
    out["added"] = await wait(lambda: w.present)
    out["node"] = w.node
    tb.uevent(SYSFS, "remove")
    tb.remove_device(SYSFS)
    out["removed"] = await wait(lambda: not w.present)
    out["seen"] = seen
    await w.close()
    print(json.dumps(out))

asyncio.run(main())
'''


def _umockdev_usable() -> bool:
    if shutil.which("umockdev-wrapper") is None:
        return False
    return any(os.path.exists(os.path.join(d, "UMockdev-1.0.typelib")) for d in (
        "/usr/lib/x86_64-linux-gnu/girepository-1.0", "/usr/lib/girepository-1.0"))


@pytest.mark.skipif(not _umockdev_usable(),
                    reason="needs umockdev and gir1.2-umockdev-1.0 (apt)")
def test_udev_events_from_umockdev(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ)
    # gi comes from Debian's python3-gi; the venv's python is the same Debian python3.11.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (env.get("PYTHONPATH"), "/usr/lib/python3/dist-packages") if p)
    proc = subprocess.run(["umockdev-wrapper", sys.executable, str(driver)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["monitor"] is True
    assert out["initial"] is False
    assert out["other_port"] is False  # another virtio port is not ours
    assert out["added"] is True
    # No udevd made the DEVLINKS symlink: the port is found by its sysfs name.
    assert out["node"] == "/dev/vport2p1"
    assert out["removed"] is True
    assert out["seen"] == [True, False]


def test_recheck_fallback_on_a_plain_path(tmp_path):
    path = tmp_path / "org.spice-space.stream.0"

    async def wait(pred, timeout=3.0):
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.01)

    async def run():
        w = DeviceWatch(str(path), recheck_s=0.05)
        seen: list[bool] = []
        w.on_change(seen.append)
        await w.start()
        try:
            assert w.present is False and w.node is None
            path.write_bytes(b"")
            await wait(lambda: w.present)
            assert w.node == str(path)
            path.unlink()
            await wait(lambda: not w.present)
            assert seen == [True, False]
        finally:
            await w.close()

    asyncio.run(run())


def test_present_at_start(tmp_path):
    path = tmp_path / "port"
    path.write_bytes(b"")

    async def run():
        w = DeviceWatch(str(path), recheck_s=600)
        await w.start()
        try:
            assert w.present and w.node == str(path)
        finally:
            await w.close()

    asyncio.run(run())
