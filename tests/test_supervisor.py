"""The worker supervisor with real processes under real uids and a raw pty as the device."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import tty

import pytest

from spice_streamd import errors
from spice_streamd.supervisor import WorkerSupervisor, WorkerTarget
from tests.support.waiting import wait_async

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs workers as other uids")

# A stand-in worker: records how it was started, then behaves as its mode says.
FAKE_WORKER = r'''
import json, os, signal, sys, time
mode, rec = sys.argv[1], sys.argv[2]
args = sys.argv[3:]
opt = dict(zip(args[::2], args[1::2]))
dev = int(opt["--device-fd"])
st = int(opt["--status-fd"])
info = {
    "pid": os.getpid(), "argv": args, "resuid": os.getresuid(), "resgid": os.getresgid(),
    "groups": sorted(os.getgroups()), "env": dict(os.environ), "cwd": os.getcwd(),
    "dev_is_tty": os.isatty(dev), "status_is_fifo": __import__("stat").S_ISFIFO(os.fstat(st).st_mode),
    "sid_leader": os.getsid(0) == os.getpid(), "dev_rdev": os.fstat(dev).st_rdev,
}
path = os.path.join(rec, "start-%d.json" % os.getpid())
with open(path + ".tmp", "w") as f:
    json.dump(info, f)
os.rename(path + ".tmp", path)
if mode == "exit1":
    sys.exit(1)
def on_term(*_):
    open(os.path.join(rec, "term-%d" % os.getpid()), "w").close()
    if mode != "stubborn":
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
if mode == "chatty":
    out = os.fdopen(st, "wb", buffering=0)
    out.write(b'{"streaming": true, "frames": 5, "bytes": 1000, "fps": 30.0, '
              b'"codecs": [1, 3], "host_caps": "0f"}\n')
    out.write(b"x" * 10000 + b"\n")          # over-long: dropped
    out.write(b"not json\n[1,2]\n" + b"[" * 3000 + b"\n")   # garbage: ignored
    out.write(b'{"frames": "many", "bytes": -1, "fps": true}\n')  # wrong types: ignored
    out.write(b'{"streaming": true, "frames": 7, "bytes": 2000, "fps": 25.5}\n')
while True:
    time.sleep(0.05)
'''

NOBODY = WorkerTarget(uid=65534, gid=65534, groups=(), display=":91", xauthority="/tmp/xa-n", vt=2)
OTHER = WorkerTarget(uid=12345, gid=12346, groups=(12347, 12348), display=":92",
                     xauthority="/tmp/xa-o", vt=3)


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="spice-sup-")
    os.chmod(d, 0o755)
    rec = os.path.join(d, "rec")
    os.mkdir(rec)
    os.chmod(rec, 0o777)  # workers under other uids record into it
    script = os.path.join(d, "fake_worker.py")
    with open(script, "w") as f:
        f.write(FAKE_WORKER)
    os.chmod(script, 0o644)
    try:
        yield d, script, rec
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def pty_device():
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    try:
        yield path, master
    finally:
        os.close(master)
        os.close(slave)


def records(rec: str) -> list[dict]:
    out = []
    for name in sorted(os.listdir(rec)):
        if name.startswith("start-") and name.endswith(".json"):
            with open(os.path.join(rec, name)) as f:
                out.append(json.load(f))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


def make(script, rec, device, mode, **kw) -> tuple[WorkerSupervisor, list[dict]]:
    changes: list[dict] = []
    sup: WorkerSupervisor

    def on_change():
        changes.append(sup.status)

    sup = WorkerSupervisor(device_path=device, fps=30, quality=80,
                           worker_argv=[sys.executable, script, mode, rec],
                           on_change=on_change, **kw)
    return sup, changes


def test_quick_exits_back_off_then_fail(workdir, pty_device):
    _, script, rec = workdir

    async def run():
        sup, changes = make(script, rec, pty_device[0], "exit1", backoff_s=0.05)
        try:
            sup.set_target(NOBODY)
            await wait_async(lambda: sup.status["state"] == "failed", what="failed")
            st = sup.status
            assert len(records(rec)) == 5
            assert st["restarts"] == 4 and st["pid"] == 0
            assert "exit 1" in st["last_error"]
            states = [c["state"] for c in changes]
            assert states.count("backoff") == 4 and states[-1] == "failed"
            # Backoff grows: the gaps between starts double (0.05, 0.1, 0.2, 0.4).
            starts = [os.stat(os.path.join(rec, f"start-{r['pid']}.json")).st_mtime
                      for r in records(rec)]
            starts.sort()
            assert starts[-1] - starts[-2] > starts[1] - starts[0]
            # A new target resets the failure count and tries again.
            sup.set_target(OTHER)
            await wait_async(lambda: len(records(rec)) == 6, what="retry for a new target")
        finally:
            await sup.close()

    asyncio.run(run())


def test_switch_sigterms_first_and_runs_second_as_its_uid(workdir, pty_device):
    _, script, rec = workdir

    async def run():
        sup, _ = make(script, rec, pty_device[0], "sleep")
        try:
            sup.set_target(NOBODY)
            first = (await wait_async(lambda: records(rec), what="first worker"))[0]
            assert sup.status["pid"] == first["pid"]
            assert sup.status["state"] == "starting"  # it never reported a status
            assert first["resuid"] == [65534] * 3 and first["resgid"] == [65534] * 3
            assert first["groups"] == []
            assert first["env"] == {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
                                    "DISPLAY": ":91", "XAUTHORITY": "/tmp/xa-n",
                                    "HOME": "/nonexistent"}
            assert first["cwd"] == "/" and first["sid_leader"]
            assert first["dev_is_tty"] and first["status_is_fifo"]
            assert first["argv"][4:] == ["--fps", "30", "--quality", "80"]

            sup.set_target(OTHER)
            await wait_async(lambda: len(records(rec)) == 2, what="second worker")
            second = [r for r in records(rec) if r["pid"] != first["pid"]][0]
            # The first got SIGTERM and was gone before the second started.
            assert os.path.exists(os.path.join(rec, f"term-{first['pid']}"))
            assert not alive(first["pid"])
            assert second["resuid"] == [12345] * 3 and second["resgid"] == [12346] * 3
            assert second["groups"] == [12347, 12348]
            assert "HOME" not in second["env"]  # uid 12345 has no passwd entry
            # And the kernel agrees, from outside the process.
            with open(f"/proc/{second['pid']}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            assert status["Uid"].split() == ["12345"] * 4
            assert status["Gid"].split() == ["12346"] * 4
            assert status["Groups"].split() == ["12347", "12348"]
            assert sup.status["uid"] == 12345 and sup.status["vt"] == 3
            assert sup.device_opens == 1  # kept open across a clean switch
            sup.set_target(None)
            await wait_async(lambda: sup.status["state"] == "idle", what="idle")
            assert not alive(second["pid"]) and sup.status["pid"] == 0
        finally:
            await sup.close()

    asyncio.run(run())


def test_sigterm_ignored_means_sigkill_and_device_reopen(workdir, pty_device):
    _, script, rec = workdir

    async def run():
        sup, _ = make(script, rec, pty_device[0], "stubborn", grace_s=0.3)
        try:
            sup.set_target(NOBODY)
            first = (await wait_async(lambda: records(rec), what="worker"))[0]
            assert sup.device_opens == 1
            t0 = time.monotonic()
            sup.set_target(OTHER)
            await wait_async(lambda: len(records(rec)) == 2, what="second worker")
            assert time.monotonic() - t0 >= 0.3
            assert os.path.exists(os.path.join(rec, f"term-{first['pid']}"))
            assert not alive(first["pid"])
            assert sup.device_opens == 2  # closed and reopened: the host side resets
        finally:
            await sup.close()
        assert sup.status["pid"] == 0
        assert not any(alive(r["pid"]) for r in records(rec))

    asyncio.run(run())


def test_status_pipe_fields_and_host_state_handover(workdir, pty_device):
    _, script, rec = workdir

    async def run():
        sup, changes = make(script, rec, pty_device[0], "chatty")
        try:
            sup.set_target(NOBODY)
            await wait_async(lambda: sup.status["frames"] == 7, what="last status line")
            st = sup.status
            assert st["state"] == "running"
            assert (st["streaming"], st["bytes"], st["fps"]) == (True, 2000, 25.5)
            assert sup.host_state == ([1, 3], "0f")
            assert any(c["state"] == "running" and c["frames"] == 5 for c in changes)
            sup.set_target(OTHER)
            await wait_async(lambda: len(records(rec)) == 2, what="second worker")
            second = max(records(rec), key=lambda r: r["argv"].count("--start-codecs"))
            assert second["argv"][8:] == ["--start-codecs", "1,3", "--host-caps", "0f"]
            await wait_async(lambda: sup.status["frames"] == 7 and sup.status["uid"] == 12345,
                             what="second worker's status")
        finally:
            await sup.close()

    asyncio.run(run())


def test_device_absent_means_no_worker(workdir, pty_device):
    _, script, rec = workdir

    async def run():
        sup, _ = make(script, rec, pty_device[0], "sleep", device_present=False)
        try:
            # Before any session registers, too (the README's troubleshooting says so).
            assert sup.status["state"] == "no-device"
            sup.set_target(NOBODY)
            await wait_async(lambda: sup.status["state"] == "no-device", what="no-device")
            assert records(rec) == [] and sup.device_opens == 0
            sup.set_device_present(True)
            first = (await wait_async(lambda: records(rec), what="worker"))[0]
            sup.set_device_present(False)
            await wait_async(lambda: sup.status["state"] == "no-device", what="no-device again")
            assert not alive(first["pid"])
        finally:
            await sup.close()

    asyncio.run(run())


def test_missing_device_path_backs_off(workdir):
    _, script, rec = workdir

    async def run():
        sup, _ = make(script, rec, "/nonexistent/port", "sleep", device_present=True,
                      backoff_s=0.02, max_quick_failures=3)
        try:
            sup.set_target(NOBODY)
            await wait_async(lambda: sup.status["state"] == "failed", what="failed")
            assert "cannot open /nonexistent/port" in sup.status["last_error"]
            assert records(rec) == []
        finally:
            await sup.close()

    asyncio.run(run())


@pytest.mark.parametrize("target", [
    WorkerTarget(uid=1000, gid=1000, groups=(27, 0), display=":0", xauthority="/x", vt=2),
    WorkerTarget(uid=1000, gid=0, groups=(), display=":0", xauthority="/x", vt=2),
])
def test_root_group_targets_are_refused(target):
    async def run():
        sup = WorkerSupervisor(device_path="/nonexistent", fps=30, quality=80)
        with pytest.raises(errors.PermissionDenied):
            sup.set_target(target)
        assert sup.status["state"] == "no-device" and sup.status["uid"] == -1
        await sup.close()

    asyncio.run(run())


def test_close_kills_a_stubborn_worker(workdir, pty_device):
    _, script, rec = workdir

    async def run():
        sup, _ = make(script, rec, pty_device[0], "stubborn", grace_s=0.2)
        sup.set_target(NOBODY)
        first = (await wait_async(lambda: records(rec), what="worker"))[0]
        await sup.close()
        assert not alive(first["pid"])

    asyncio.run(run())


def test_device_path_change_moves_the_worker(workdir, pty_device):
    _, script, rec = workdir
    master2, slave2 = os.openpty()
    tty.setraw(slave2)
    path2 = os.ttyname(slave2)

    async def run():
        sup, _ = make(script, rec, pty_device[0], "sleep")
        try:
            sup.set_target(NOBODY)
            first = (await wait_async(lambda: records(rec), what="worker"))[0]
            assert first["dev_rdev"] == os.stat(pty_device[0]).st_rdev
            sup.set_device_present(True, path=path2)
            await wait_async(lambda: len(records(rec)) == 2, what="worker on the new node")
            second = [r for r in records(rec) if r["pid"] != first["pid"]][0]
            assert second["dev_rdev"] == os.stat(path2).st_rdev
            assert not alive(first["pid"]) and sup.device_opens == 2
        finally:
            await sup.close()

    try:
        asyncio.run(run())
    finally:
        os.close(master2)
        os.close(slave2)


START_STOP_MJPEG = bytes.fromhex("01000400020000000101")  # v1, type 4, size 2: 1 codec, MJPEG


def _read_messages(master: int, buf: bytearray) -> list[tuple[int, bytes]]:
    """Whole stream-device messages read so far from the pty master (header: u8 u8 u16 u32)."""
    import select
    import struct

    while select.select([master], [], [], 0)[0]:
        try:
            chunk = os.read(master, 1 << 20)
        except OSError:
            break
        if not chunk:
            break
        buf += chunk
    out = []
    while len(buf) >= 8:
        _version, _pad, mtype, size = struct.unpack_from("<BBHI", buf)
        if len(buf) < 8 + size:
            break
        out.append((mtype, bytes(buf[8:8 + size])))
        del buf[:8 + size]
    return out


@pytest.mark.slow
def test_real_worker_streams_from_real_xvfb_as_nobody(pty_device):
    from tests.support.xserver import xvfb

    device, master = pty_device
    with xvfb(320, 240, owner_uid=65534) as server:
        target = WorkerTarget(uid=65534, gid=65534, groups=(), display=server.display,
                              xauthority=server.xauthority, vt=2)

        async def run():
            sup = WorkerSupervisor(device_path=device, fps=30, quality=80)
            buf = bytearray()
            seen: list[int] = []
            try:
                sup.set_target(target)
                await wait_async(lambda: sup.status["pid"], what="worker pid")
                pid = sup.status["pid"]
                with open(f"/proc/{pid}/status") as f:
                    st = dict(line.split(":", 1) for line in f if ":" in line)
                assert st["Uid"].split() == ["65534"] * 4 and st["Groups"].split() == []
                os.write(master, START_STOP_MJPEG)

                def got_frame() -> bool:
                    seen.extend(t for t, _ in _read_messages(master, buf))
                    return 3 in seen

                await wait_async(got_frame, timeout=20, what="a DATA message on the pty")
                assert 2 in seen and seen.index(2) < seen.index(3)  # FORMAT before DATA
                await wait_async(lambda: sup.status["streaming"] and sup.status["frames"] > 0,
                                 timeout=10, what="worker status reports streaming")
                assert sup.status["state"] == "running"
                assert sup.host_state[0] == [1]
            finally:
                await sup.close()

        asyncio.run(run())
