"""The worker supervisor and the port relay: real processes under real uids, a raw pty as the port.

A stand-in worker speaks the stream-device protocol on the socket the supervisor gives it; the
test reads and writes the pty's master side as the host would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import pwd
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import tty
from collections.abc import Iterator

import pytest

from spice_stream_common import protocol as p
from spice_streamd import errors, guestmessages
from spice_streamd.supervisor import WorkerSupervisor, WorkerTarget
from tests.support.hostile import SPAWN_CHILDREN
from tests.support.waiting import wait_async

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs workers as other uids")

# A stand-in worker: records how it was started and what the relay told it, then behaves as its
# mode says. It uses the project's own protocol module, as the real worker does.
FAKE_WORKER = r'''
import json, os, select, signal, socket, stat, struct, sys, time
from collections.abc import Iterator
sys.path.insert(0, sys.argv[3])
from spice_stream_common import protocol as p
mode, rec = sys.argv[1], sys.argv[2]
if "/" in mode:  # "A/B": mode A as nobody, B as any other uid
    mode = mode.split("/")[0 if os.getuid() == 65534 else 1]
args = sys.argv[4:]
opt = dict(zip(args[::2], args[1::2]))
if opt.get("--source") == "scanout":  # the display's scanout reader: always a picture
    mode = "scanout"
dev = int(opt["--device-fd"])
st = os.fstat(dev)
info = {
    "pid": os.getpid(), "argv": args, "resuid": os.getresuid(), "resgid": os.getresgid(),
    "groups": sorted(os.getgroups()), "env": dict(os.environ), "cwd": os.getcwd(),
    "dev_is_socket": stat.S_ISSOCK(st.st_mode), "dev_is_chr": stat.S_ISCHR(st.st_mode),
    "sid_leader": os.getsid(0) == os.getpid(),
}
def record(name, data):
    path = os.path.join(rec, "%s-%d.json" % (name, os.getpid()))
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.rename(path + ".tmp", path)
record("start", info)
if mode == "exit1":
    sys.exit(1)
if mode == "exit7":  # the user pressed Stop in the desktop's screen-sharing indicator
    sys.exit(7)
def on_term(*_):
    open(os.path.join(rec, "term-%d" % os.getpid()), "w").close()
    if mode != "stubborn":
        os._exit(0)
signal.signal(signal.SIGTERM, on_term)
sock = socket.socket(fileno=dev)
sock.setblocking(False)
parser = p.Parser()
heard = []
streaming = False
need_format = True
frame_no = 0
sent = []
def send(data):
    sock.setblocking(True)
    sock.sendall(data)
    sock.setblocking(False)
if mode in ("chatty", "hostile", "tear", "silent", "flood", "waiting", "still", "locks",
            "covered", "scanout"):
    send(p.capabilities(b"\x01"))
if mode == "hostile":
    send(p.encode(p.MsgType.DATA, b"\xff\xd8early"))       # DATA before FORMAT: refused
    send(p.start_stop([0, 1]))                              # a host-only type: refused
    send(p.encode(p.MsgType.CURSOR_SET, b"\x00" * 20))      # malformed cursor: refused
    send(p.format_msg(64, 48, 7))                           # not MJPEG: refused
    send(b"garbage that is no header at all" * 4)           # resynchronised, dropped
next_frame = 0.0
while True:
    r, _, _ = select.select([sock], [], [], 0.01)
    if r:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            data = b"?"
        if not data:
            while mode == "stubborn":  # ignores its socket closing too
                time.sleep(1)
            sys.exit(6)
        for item in parser.feed(data):
            if isinstance(item, p.Message):
                heard.append([item.type, item.payload.hex(), time.monotonic()])
                record("heard", heard)
                if item.type == p.MsgType.START_STOP:
                    streaming = p.CODEC_MJPEG in p.decode_start_stop(item.payload).codecs
                    need_format = True
                    if streaming and mode in ("chatty", "hostile", "tear", "flood", "still",
                                              "locks"):
                        send(p.format_msg(64, 48))
                    if streaming and mode in ("still", "locks"):  # one frame, then static
                        send(p.encode(p.MsgType.DATA, b"\xff\xd8" + b"\0" * 100))
                        next_frame = time.monotonic() + (0.2 if mode == "still" else 1.5)
    now = time.monotonic()
    if streaming and mode in ("chatty", "hostile", "flood") and now >= next_frame:
        frame_no += 1
        payload = b"\xff\xd8" + struct.pack("<Id", frame_no, now) + b"\0" * (
            60000 if mode == "flood" else 100)
        send(p.encode(p.MsgType.DATA, payload))
        sent.append([frame_no, now])
        record("sent", sent)
        next_frame = now + (0.02 if mode == "flood" else 0.1)
    if streaming and mode == "scanout" and now >= next_frame:
        if not sent or sent[-1][0] != "format":
            send(p.format_msg(32, 24))
            sent.append(["format", now])
        send(p.encode(p.MsgType.DATA, b"\xff\xd8S" + b"\0" * 50))
        sent.append(["scanout", now])
        record("sent", sent)
        next_frame = now + 0.1
    if mode == "scanout" and not streaming and sent and sent[-1][0] != "format":
        sent.append(["format", now])  # a new start sends FORMAT again
    if streaming and mode == "covered" and now >= next_frame:
        # No picture until the test says it is back; then FORMAT (on a new START_STOP only) and
        # frames marked W.
        if not os.path.exists(os.path.join(rec, "back")):
            send(p.header(0xFF02, 0))
        else:
            if need_format:  # after each START_STOP, as the real streamer does
                send(p.format_msg(64, 48))
                need_format = False
            send(p.encode(p.MsgType.DATA, b"\xff\xd8W" + b"\0" * 50))
        next_frame = now + 0.1
    if streaming and mode in ("waiting", "locks") and now >= next_frame:
        # A locked screen: no picture, only the word that it waits (every 0.2 s here).
        send(p.header(0xFF02, 0))
        sent.append(["waiting", now])
        record("sent", sent)
        next_frame = now + 0.2
    if streaming and mode == "still" and now >= next_frame:
        # A static screen: no frame again, only the word that the last one is still current.
        send(p.header(0xFF03, 0))
        sent.append(["unchanged", now])
        record("sent", sent)
        next_frame = now + 0.2
    if streaming and mode == "tear":
        msg = p.encode(p.MsgType.DATA, b"\xff\xd8" + b"\1" * 5000)
        send(msg[: len(msg) // 2])   # half a frame, then nothing more
        record("torn", [True])
        mode = "sleep"
'''

NOBODY = WorkerTarget(uid=65534, gid=65534, groups=(), display=":91", xauthority="/tmp/xa-n", vt=2)
SCANOUT = WorkerTarget(uid=12345, gid=12346, groups=(), display="", xauthority="", vt=0,
                       kind="scanout", card="/dev/dri/card-none")
OTHER = WorkerTarget(uid=12345, gid=12346, groups=(12347, 12348), display=":92",
                     xauthority="/tmp/xa-o", vt=3)
SERVICE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "service")


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


def recorded(rec: str, kind: str) -> list:
    out = []
    for name in sorted(os.listdir(rec)):
        if name.startswith(kind + "-") and name.endswith(".json"):
            with open(os.path.join(rec, name)) as f:
                out.append(json.load(f))
    return out


def records(rec: str) -> list[dict]:
    return recorded(rec, "start")


def of_pid(rec: str, kind: str, pid: int):
    try:
        with open(os.path.join(rec, f"{kind}-{pid}.json")) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


async def first_worker(sup: WorkerSupervisor, rec: str, target: WorkerTarget = NOBODY) -> dict:
    """Point the supervisor at `target` and return its worker's start record."""
    sup.set_target(target)
    return (await wait_async(lambda: records(rec), what="worker"))[0]


def make(script, rec, device, mode, **kw) -> tuple[WorkerSupervisor, list[dict]]:
    changes: list[dict] = []
    sup: WorkerSupervisor

    def on_change():
        changes.append(sup.status)

    sup = WorkerSupervisor(device_path=device, fps=30, quality=80,
                           worker_argv=[sys.executable, script, mode, rec, SERVICE_DIR],
                           on_change=on_change, **kw)
    return sup, changes


class Host:
    """The pty's master side read strictly: every byte must belong to a whole, valid message."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.buf = bytearray()
        self.messages: list[tuple[int, bytes]] = []

    def read(self) -> list[tuple[int, bytes]]:
        while select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 1 << 20)
            except OSError:
                break
            if not chunk:
                break
            self.buf += chunk
        while len(self.buf) >= p.HEADER_SIZE:
            version, pad, mtype, size = p.HEADER.unpack_from(self.buf)
            assert (version, pad) == (1, 0), f"torn or garbled stream: {bytes(self.buf[:16])!r}"
            assert mtype in p.GUEST_TO_HOST_LIMITS and size <= p.GUEST_TO_HOST_LIMITS[mtype], \
                f"message type {mtype} size {size} on the port"
            if len(self.buf) < p.HEADER_SIZE + size:
                break
            self.messages.append((mtype, bytes(self.buf[p.HEADER_SIZE:p.HEADER_SIZE + size])))
            del self.buf[:p.HEADER_SIZE + size]
        return self.messages

    def types(self) -> list[int]:
        return [t for t, _ in self.read()]

    def frames(self) -> list[int]:
        """Frame numbers of the stand-in's DATA messages, in arrival order."""
        return [struct.unpack_from("<I", m, 2)[0] for t, m in self.read() if t == p.MsgType.DATA]

    def send(self, data: bytes) -> None:
        os.write(self.master, data)


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
            starts = sorted(os.stat(os.path.join(rec, f"start-{r['pid']}.json")).st_mtime
                            for r in records(rec))
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
            assert sup.status["state"] == "starting"  # it never sent a message
            assert first["resuid"] == [65534] * 3 and first["resgid"] == [65534] * 3
            assert first["groups"] == []
            assert first["env"] == {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
                                    "DISPLAY": ":91", "XAUTHORITY": "/tmp/xa-n",
                                    "HOME": "/nonexistent"}
            assert first["cwd"] == "/" and first["sid_leader"]
            # The worker holds a socket end, never the port.
            assert first["dev_is_socket"] and not first["dev_is_chr"]
            assert first["argv"][2:] == ["--fps", "30", "--quality", "80", "--codecs", "mjpeg"]
            fds = {os.readlink(f"/proc/{first['pid']}/fd/{fd}")
                   for fd in os.listdir(f"/proc/{first['pid']}/fd")}
            assert pty_device[0] not in fds

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
            assert sup.device_opens == 1  # the service keeps the port across a switch
            sup.set_target(None)
            await wait_async(lambda: sup.status["state"] == "idle", what="idle")
            assert not alive(second["pid"]) and sup.status["pid"] == 0
        finally:
            await sup.close()

    asyncio.run(run())


def test_stubborn_worker_is_killed_and_the_port_stays_open(workdir, pty_device):
    _, script, rec = workdir

    async def run():
        sup, _ = make(script, rec, pty_device[0], "stubborn", grace_s=0.3)
        try:
            first = await first_worker(sup, rec)
            assert sup.device_opens == 1
            t0 = time.monotonic()
            sup.set_target(OTHER)
            await wait_async(lambda: len(records(rec)) == 2, what="second worker")
            assert time.monotonic() - t0 >= 0.3
            assert os.path.exists(os.path.join(rec, f"term-{first['pid']}"))
            assert not alive(first["pid"])
            # A killed worker cannot have torn a message on the port: no reopen needed.
            assert sup.device_opens == 1
        finally:
            await sup.close()
        assert sup.status["pid"] == 0
        assert not any(alive(r["pid"]) for r in records(rec))

    asyncio.run(run())


def test_relay_writes_checked_messages_and_keeps_the_host_state(workdir, pty_device):
    """The host's START_STOP reaches the worker through the relay; what the worker sends reaches
    the port whole; what a host would refuse never does; the next worker is told the host's
    state by the relay itself."""
    _, script, rec = workdir
    host = Host(pty_device[1])

    async def run():
        sup, changes = make(script, rec, pty_device[0], "hostile")
        try:
            first = await first_worker(sup, rec)
            await wait_async(lambda: sup.status["state"] == "running", what="running")
            host.send(p.capabilities(b"\x01") + p.start_stop([1]))
            await wait_async(lambda: len(host.frames()) >= 3, timeout=15, what="frames on the port")
            types = host.types()
            assert types.index(p.MsgType.FORMAT) < types.index(p.MsgType.DATA)
            assert types.count(p.MsgType.CAPABILITIES) == 1
            assert p.MsgType.START_STOP not in types and p.MsgType.CURSOR_SET not in types
            assert all(p.decode_format(m) == p.Format(64, 48, 1)
                       for t, m in host.read() if t == p.MsgType.FORMAT)
            assert not any(m.startswith(b"\xff\xd8early") for _, m in host.read())
            heard = of_pid(rec, "heard", first["pid"])
            assert [h[0] for h in heard] == [p.MsgType.CAPABILITIES, p.MsgType.START_STOP]
            await wait_async(lambda: sup.status["streaming"] and sup.status["frames"] >= 3,
                             what="streaming reported from what reached the host")
            assert sup.host_state == ([1], b"\x01")
            assert any(c["streaming"] for c in changes)

            # Switch: the second worker hears caps and START_STOP from the relay, the host says
            # nothing more, and its frames follow on the same open port.
            sup.set_target(OTHER)
            second = await wait_async(
                lambda: [r for r in records(rec) if r["pid"] != first["pid"]], what="second")
            pid2 = second[0]["pid"]
            heard2 = await wait_async(lambda: (h := of_pid(rec, "heard", pid2)) and len(h) >= 2
                                      and h, what="host state told to the second worker")
            assert [(h[0], h[1]) for h in heard2[:2]] == [
                (p.MsgType.CAPABILITIES, "01"), (p.MsgType.START_STOP, "0101")]
            n = len(host.frames())
            await wait_async(lambda: len(host.frames()) >= n + 3, timeout=15,
                             what="the second worker's frames")
            assert sup.device_opens == 1
        finally:
            await sup.close()

    asyncio.run(run())


def test_a_worker_switched_away_mid_message_never_tears_the_port(workdir, pty_device):
    _, script, rec = workdir
    host = Host(pty_device[1])

    async def run():
        sup, _ = make(script, rec, pty_device[0], "tear")
        try:
            first = await first_worker(sup, rec)
            host.send(p.start_stop([1]))
            await wait_async(lambda: of_pid(rec, "torn", first["pid"]), what="half a frame sent")
            await wait_async(lambda: p.MsgType.FORMAT in host.types(), what="FORMAT")
            sup.set_target(OTHER)
            await wait_async(lambda: len(records(rec)) == 2, what="second worker")
            # The second worker's whole FORMAT follows the first one's: the half frame was
            # dropped with the first worker's socket. Host.read() asserts every byte parses.
            await wait_async(lambda: host.types().count(p.MsgType.FORMAT) == 2, timeout=10,
                             what="the second FORMAT")
            assert p.MsgType.DATA not in host.types() and not host.buf
        finally:
            await sup.close()

    asyncio.run(run())


def test_host_error_reopens_the_port_and_the_worker_starts_over(workdir, pty_device):
    """NOTIFY_ERROR: the host ignores the port until it is reopened. The relay reopens it, stops
    the worker's stream, and the worker sends FORMAT and frames again when the host asks."""
    _, script, rec = workdir
    host = Host(pty_device[1])

    async def run():
        sup, _ = make(script, rec, pty_device[0], "chatty")
        try:
            first = await first_worker(sup, rec)
            host.send(p.start_stop([1]))
            await wait_async(lambda: host.frames(), timeout=10, what="frames")
            host.send(p.notify_error(1, "invalid message"))
            await wait_async(lambda: sup.device_opens == 2, what="port reopened")
            heard = await wait_async(
                lambda: (h := of_pid(rec, "heard", first["pid"])) and len(h) >= 2 and h,
                what="stop told to the worker")
            assert (heard[-1][0], heard[-1][1]) == (p.MsgType.START_STOP, "00")
            formats = host.types().count(p.MsgType.FORMAT)
            host.send(p.start_stop([1]))  # the host asks again after the reopen
            await wait_async(lambda: host.types().count(p.MsgType.FORMAT) == formats + 1,
                             timeout=10, what="FORMAT again")
            n = len(host.frames())
            await wait_async(lambda: len(host.frames()) > n, timeout=10, what="frames again")
            assert sup.status["pid"] == first["pid"]  # the same worker, never restarted
        finally:
            await sup.close()

    asyncio.run(run())


def test_blocked_port_pauses_the_worker_and_keeps_only_the_newest_frame(workdir, pty_device):
    """While the host does not read, at most the message in progress and the newest frame wait;
    the worker is told to stop encoding and to start again once the port drains."""
    _, script, rec = workdir
    host = Host(pty_device[1])

    async def run():
        sup, _ = make(script, rec, pty_device[0], "flood", pause_after_s=0.2)
        try:
            first = await first_worker(sup, rec)
            host.send(p.start_stop([1]))
            await wait_async(lambda: len(host.frames()) >= 3, timeout=10, what="frames")
            # The host stops reading: the pty fills, the relay pauses the worker.
            heard = await wait_async(
                lambda: (h := of_pid(rec, "heard", first["pid"])) and h[-1][1] == "00" and h,
                timeout=10, what="worker told to stop encoding")
            paused_at = heard[-1][2]
            sent = of_pid(rec, "sent", first["pid"])
            assert all(t <= paused_at + 0.5 for _, t in sent[-3:])  # it stopped encoding
            before = {n for n, _ in sent}
            received = host.frames()  # the host reads again, from now on continuously

            def resumed():
                host.read()
                h = of_pid(rec, "heard", first["pid"])
                return h and h[-1][1] == "0101"

            await wait_async(resumed, timeout=10, what="worker told to start again")
            await wait_async(lambda: any(n not in before for n in host.frames()), timeout=10,
                             what="a frame encoded after the resume")
            after = host.frames()
            stale = [n for n in after[len(received):] if n in before]
            # Written after the host resumed but encoded before: the one in progress and the
            # newest waiting one, never a queue of them.
            assert len(stale) <= 2, stale
            assert sup.relay.dropped_frames > 0
        finally:
            await sup.close()

    asyncio.run(run())


def test_worker_that_sends_no_frames_is_restarted(workdir, pty_device):
    _, script, rec = workdir
    host = Host(pty_device[1])

    async def run():
        sup, _ = make(script, rec, pty_device[0], "silent", watchdog_s=1.0)
        try:
            first = await first_worker(sup, rec)
            host.send(p.start_stop([1]))
            await wait_async(lambda: len(records(rec)) == 2, timeout=15, what="a restart")
            assert not alive(first["pid"])
            assert "sent no frame" in sup.status["last_error"]
            assert not sup.status["streaming"]
        finally:
            await sup.close()

    asyncio.run(run())


def test_a_worker_that_says_it_has_no_picture_is_waiting_not_stuck(workdir, pty_device):
    # A screen cast on GNOME's lock screen: NO_PICTURE keeps the watchdog off, and nothing of
    # it reaches the port (the host never hears a type it does not know).
    _, script, rec = workdir
    host = Host(pty_device[1])

    async def run():
        sup, _ = make(script, rec, pty_device[0], "waiting", watchdog_s=1.0)
        try:
            first = await first_worker(sup, rec)
            host.send(p.start_stop([1]))
            await wait_async(lambda: len(of_pid(rec, "sent", first["pid"]) or []) >= 20,
                             timeout=15, what="4 s of NO_PICTURE (four watchdog periods)")
            assert len(records(rec)) == 1 and alive(first["pid"]), "restarted while waiting"
            assert "sent no frame" not in (sup.status["last_error"] or "")
            assert not sup.status["streaming"]  # nothing stale is claimed as current
            assert host.types() == [p.MsgType.CAPABILITIES]  # a stray type would fail read()
        finally:
            await sup.close()

    asyncio.run(run())


def test_a_worker_that_says_it_has_no_picture_after_a_frame_is_not_streaming_at_once(
        workdir, pty_device):
    # The lock screen 1.5 s after the last frame: Streaming is false from the worker's NO_PICTURE,
    # not only once that frame is older than STREAMING_WINDOW_S (5 s).
    _, script, rec = workdir
    host = Host(pty_device[1])

    async def run():
        sup, _ = make(script, rec, pty_device[0], "locks")
        try:
            await first_worker(sup, rec)
            host.send(p.start_stop([1]))
            await wait_async(lambda: sup.status["streaming"], timeout=10,
                             what="Streaming with the frame")
            await wait_async(lambda: not sup.status["streaming"], timeout=2.5,
                             what="Streaming false once the worker says it has no picture")
        finally:
            await sup.close()

    asyncio.run(run())


def test_a_static_screen_is_neither_stuck_nor_not_streaming(workdir, pty_device, monkeypatch):
    # Issue 16: one frame, then only UNCHANGED (no frame again). The watchdog sees a live worker,
    # and Streaming stays true throughout (no PropertiesChanged to false and back): with short
    # periods, four watchdog periods and four Streaming windows after the only frame.
    from spice_streamd import supervisor

    monkeypatch.setattr(supervisor, "STREAMING_WINDOW_S", 1.0)
    _, script, rec = workdir
    host = Host(pty_device[1])

    async def run():
        sup, changes = make(script, rec, pty_device[0], "still", watchdog_s=1.0)
        try:
            first = await first_worker(sup, rec)
            host.send(p.start_stop([1]))
            await wait_async(lambda: sup.status["streaming"], timeout=15, what="Streaming")
            since = len(changes)
            seen = []
            deadline = time.monotonic() + 15
            while len(of_pid(rec, "sent", first["pid"]) or []) < 20:  # 4 s of UNCHANGED
                assert time.monotonic() < deadline and alive(first["pid"]), \
                    f"the worker sent {len(of_pid(rec, 'sent', first['pid']) or [])} UNCHANGED " \
                    f"and is {'alive' if alive(first['pid']) else 'gone'}: {sup.status}"
                seen.append(sup.status["streaming"])
                await asyncio.sleep(0.05)
            assert len(records(rec)) == 1 and alive(first["pid"]), "restarted on a static screen"
            assert "sent no frame" not in (sup.status["last_error"] or "")
            assert all(seen) and sup.status["streaming"], "Streaming went false on a static screen"
            # What the service told its listeners (PropertiesChanged follows these): never false.
            assert all(c["streaming"] for c in changes[since:]), changes[since:]
            assert host.types() == [p.MsgType.CAPABILITIES, p.MsgType.FORMAT, p.MsgType.DATA]
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
            assert not alive(first["pid"]) and not sup.relay.is_open
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
            assert "cannot open the stream port /nonexistent/port" in sup.status["last_error"]
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
        first = await first_worker(sup, rec)
        await sup.close()
        assert not alive(first["pid"])

    asyncio.run(run())


def test_device_path_change_moves_the_port_not_the_worker(workdir, pty_device):
    _, script, rec = workdir
    master2, slave2 = os.openpty()
    tty.setraw(slave2)
    path2 = os.ttyname(slave2)

    async def run():
        sup, _ = make(script, rec, pty_device[0], "chatty")
        try:
            first = await first_worker(sup, rec)
            Host(pty_device[1]).send(p.start_stop([1]))
            await wait_async(lambda: sup.status["streaming"], timeout=10, what="streaming")
            sup.set_device_present(True, path=path2)
            await wait_async(lambda: sup.device_opens == 2 and sup.relay.path == path2,
                             what="the port reopened on the new node")
            host2 = Host(master2)
            host2.send(p.start_stop([1]))
            await wait_async(lambda: host2.frames(), timeout=10, what="frames on the new node")
            assert p.MsgType.FORMAT in host2.types()
            assert records(rec) == [first] and alive(first["pid"])
        finally:
            await sup.close()

    try:
        asyncio.run(run())
    finally:
        os.close(master2)
        os.close(slave2)


@pytest.mark.slow
def test_real_worker_streams_from_real_xvfb_as_nobody(pty_device):
    from tests.support.xserver import xvfb

    device, master = pty_device
    host = Host(master)
    with xvfb(320, 240, owner_uid=65534) as server:
        target = WorkerTarget(uid=65534, gid=65534, groups=(), display=server.display,
                              xauthority=server.xauthority, vt=2)

        async def run():
            sup = WorkerSupervisor(device_path=device, fps=30, quality=80)
            try:
                sup.set_target(target)
                await wait_async(lambda: sup.status["pid"], what="worker pid")
                pid = sup.status["pid"]
                with open(f"/proc/{pid}/status") as f:
                    st = dict(line.split(":", 1) for line in f if ":" in line)
                assert st["Uid"].split() == ["65534"] * 4 and st["Groups"].split() == []
                host.send(p.start_stop([1]))
                await wait_async(lambda: p.MsgType.DATA in host.types(), timeout=20,
                                 what="a DATA message on the pty")
                types = host.types()
                assert types.index(p.MsgType.FORMAT) < types.index(p.MsgType.DATA)
                await wait_async(lambda: sup.status["streaming"] and sup.status["frames"] > 0,
                                 timeout=10, what="streaming reported")
                assert sup.status["state"] == "running"
                assert sup.host_state[0] == [1]
            finally:
                await sup.close()

        asyncio.run(run())


def test_stopped_worker_dies_with_a_killed_service(workdir):
    """kill -9 of the service while its user has stopped the worker (SIGSTOP): the worker still
    goes (its parent-death signal is SIGKILL), so no worker outlives the service."""
    import signal
    import subprocess
    from pathlib import Path

    from tests.support.waiting import wait_until

    rec = Path(workdir[2])
    out, ready = rec / "pid", rec / "ready"
    # The worker's own start-up (follow_parent), then it waits as if capturing. Its user may
    # make it ignore SIGTERM and the SIGHUP an orphaned stopped group gets: only the kernel's
    # parent-death SIGKILL is left to end it.
    worker = (f"import signal, sys, time; sys.path.insert(0, {SERVICE_DIR!r}); "
              "from spice_stream_worker.main import follow_parent; follow_parent(); "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "signal.signal(signal.SIGHUP, signal.SIG_IGN); "
              f"open({str(ready)!r}, 'w').close(); time.sleep(60)")
    program = f"""
import asyncio, os, sys
sys.path.insert(0, {SERVICE_DIR!r})
from spice_streamd.supervisor import WorkerSupervisor, WorkerTarget
async def main():
    master, slave = os.openpty()
    sup = WorkerSupervisor(device_path=os.ttyname(slave), fps=30, quality=80,
                           worker_argv=[sys.executable, "-c", {worker!r}])
    sup.set_target(WorkerTarget(65534, 65534, (), ":4242", "/nonexistent", 2))
    while not sup.status["pid"]:
        await asyncio.sleep(0.01)
    open({str(out)!r}, "w").write(str(sup.status["pid"]))
    await asyncio.sleep(60)
asyncio.run(main())
"""
    service = subprocess.Popen([sys.executable, "-c", program])
    try:
        wait_until(lambda: out.exists() and out.read_text() and ready.exists(), timeout=20,
                   what="worker started")
        pid = int(out.read_text())
        os.kill(pid, signal.SIGSTOP)
        service.kill()
        service.wait(10)
        wait_until(lambda: not alive(pid), timeout=10, what="the stopped worker to go")
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()


def test_standby_worker_is_relayed_on_a_switch_without_a_start(workdir, pty_device):
    """Registered sessions on other VTs have their worker started ahead, holding only a socket;
    a switch relays it at once (no process start) and the one switched away from waits in standby."""
    _, script, rec = workdir
    host = Host(pty_device[1])

    async def run():
        sup, _ = make(script, rec, pty_device[0], "chatty")
        try:
            sup.set_target(NOBODY)
            sup.set_standby([NOBODY, OTHER])  # the active one in the list is ignored
            await wait_async(lambda: len(records(rec)) == 2, what="active and standby workers")
            by_uid = {r["resuid"][0]: r for r in records(rec)}
            host.send(p.capabilities(b"") + p.start_stop([1]))
            await wait_async(lambda: host.frames(), timeout=10, what="frames from the active one")
            standby = by_uid[12345]
            assert of_pid(rec, "heard", standby["pid"]) is None  # told nothing: not relayed
            assert sup.status["pid"] == by_uid[65534]["pid"]

            sup.set_target(OTHER)
            sup.set_standby([NOBODY, OTHER])
            await wait_async(lambda: sup.status["pid"] == standby["pid"], what="the switch")
            n = len(host.frames())
            await wait_async(lambda: len(host.frames()) > n, timeout=10, what="its frames")
            assert len(records(rec)) == 2  # nobody was started for the switch
            first = by_uid[65534]["pid"]
            assert alive(first)  # waiting in standby
            heard = of_pid(rec, "heard", first)
            assert (heard[-1][0], heard[-1][1]) == (p.MsgType.START_STOP, "00")  # told to stop

            sup.set_standby([OTHER])  # the first session ended
            await wait_async(lambda: not alive(first), what="the ended session's worker to go")
        finally:
            await sup.close()
        assert not any(alive(r["pid"]) for r in records(rec))

    asyncio.run(run())


def test_worker_that_never_says_a_word_gets_several_periods_then_a_restart(workdir, pty_device):
    """A worker still starting is not stuck; one that never sends anything for three watchdog
    periods while the host asks for frames is."""
    _, script, rec = workdir
    host = Host(pty_device[1])

    async def run():
        sup, _ = make(script, rec, pty_device[0], "sleep", watchdog_s=0.5)
        try:
            first = await first_worker(sup, rec)
            host.send(p.start_stop([1]))
            started = time.monotonic()
            await wait_async(lambda: len(records(rec)) == 2, timeout=15, what="a restart")
            assert time.monotonic() - started >= 1.0  # not after one period
            assert not alive(first["pid"]) and "sent no frame" in sup.status["last_error"]
        finally:
            await sup.close()

    asyncio.run(run())


def test_streaming_is_this_workers_frames_not_the_last_ones(workdir, pty_device):
    """After a switch, Streaming stays false until the new worker's own frames reach the host:
    the frames the previous worker sent a moment ago do not count."""
    _, script, rec = workdir
    host = Host(pty_device[1])

    async def run():
        sup, _ = make(script, rec, pty_device[0], "chatty/silent", watchdog_s=30)
        try:
            first = await first_worker(sup, rec)
            host.send(p.start_stop([1]))
            await wait_async(lambda: sup.status["streaming"], timeout=10, what="streaming")
            sup.set_target(OTHER)
            await wait_async(lambda: sup.status["pid"] not in (0, first["pid"])
                             and sup.status["state"] == "running",
                             timeout=10, what="the silent worker running")
            host.read()
            assert sup.relay.frame_age() < 5  # the first worker's frames are recent...
            assert not sup.status["streaming"]  # ...but not this worker's
        finally:
            await sup.close()

    asyncio.run(run())


# --- what a hostile worker costs the service: CPU in standby, memory per frame ------------------

# A worker run as its target's uid: "flood" sends its CAPABILITIES, then small messages as fast as
# its socket takes them, and records how many bytes it got rid of; "frame" sends FORMAT W x H, a
# whole frame of SIZE bytes (as FRAME_PARTS), then all but one byte of another ("frames": all of
# it), and records when the service has read everything (nothing left in its socket's send
# queue); "idle" only says who it is. Each then stays, reading nothing.
HOSTILE_WORKER = r'''
import fcntl, json, os, socket, struct, sys, termios, time
mode, rec = sys.argv[1], sys.argv[2]
if "/" in mode:  # "A/B": mode A as nobody, B as any other uid
    mode = mode.split("/")[0 if os.getuid() == 65534 else 1]
sys.path.insert(0, sys.argv[3])
from spice_stream_common import frameparts as fp
from spice_stream_common import protocol as p
width, height, size = (int(v) for v in sys.argv[4:7])
opt = dict(zip(sys.argv[7::2], sys.argv[8::2]))
sock = socket.socket(fileno=int(opt["--device-fd"]))
def record(name, data):
    path = os.path.join(rec, "%s-%d.json" % (name, os.getpid()))
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.rename(path + ".tmp", path)
record("start", {"pid": os.getpid(), "uid": os.getuid()})
sock.sendall(p.capabilities(b""))
if mode == "flood":
    sock.setblocking(False)
    flood = (p.header(fp.FRAME_PARTS, 4) + fp.COUNT.pack(1088) + p.cursor_move(1, 2)) * 4096
    sent, last = 0, 0.0
    while True:
        try:
            sent += sock.send(flood)
        except BlockingIOError:
            time.sleep(0.001)
        if time.monotonic() - last > 0.05:
            record("sent", sent)
            last = time.monotonic()
elif mode in ("frame", "frames"):
    half = size // 2
    frame = [b"\xff\xd8" + bytes(half - 2), bytes(size - half)]
    whole = b"".join(fp.message(frame, range(2)))
    sock.sendall(p.format_msg(width, height) + whole + (whole if mode == "frames" else whole[:-1]))
    while struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0]:
        time.sleep(0.01)
    record("drained", True)
while True:
    time.sleep(1)
'''

# The service in a process of its own, so that its memory is measured alone: the real supervisor
# and port relay (on a pty nobody reads in "peak", so the port writer holds its copy of the frame
# too; drained in "standby"), heap tuned as main() does. It prints the growth of its resident
# memory over what it had before the worker started: at its peak, or (standby) once the worker
# that sent the frames has been switched away from.
MEMORY_SERVICE = r'''
import asyncio, json, os, sys, threading, tty
sys.path.insert(0, sys.argv[1])
from spice_streamd import heap
from spice_streamd.supervisor import WorkerSupervisor, WorkerTarget
from tests.support.waiting import wait_async
mode, script, rec, size, width, height, worker = sys.argv[2:9]
NOBODY = WorkerTarget(uid=65534, gid=65534, groups=(), display=":91", xauthority="/tmp/xa-n", vt=2)
SCANOUT = WorkerTarget(uid=12345, gid=12346, groups=(), display="", xauthority="", vt=0,
                       kind="scanout", card="/dev/dri/card-none")
OTHER = WorkerTarget(uid=12345, gid=12346, groups=(), display=":92", xauthority="/tmp/xa-o", vt=3)

def rss(field="VmRSS"):  # VmHWM: the peak, of this program only (ru_maxrss counts the parent's)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) * 1024

def drain(fd):  # the host, reading what the port gets
    while True:
        os.read(fd, 1 << 20)

def found(kind):
    return any(n.startswith(kind + "-") and n.endswith(".json") for n in os.listdir(rec))

async def main():
    heap.keep_frame_buffers()
    master, slave = os.openpty()
    tty.setraw(slave)
    if mode == "standby":
        threading.Thread(target=drain, args=(master,), daemon=True).start()
    argv = [sys.executable, script, worker + "/idle", rec, os.path.dirname(sys.argv[1]) + "/service",
            width, height, size]
    sup = WorkerSupervisor(device_path=os.ttyname(slave), fps=30, quality=80, worker_argv=argv,
                           device_present=True)
    base = rss()
    try:
        sup.set_target(NOBODY)
        await wait_async(lambda: found("drained"), timeout=60, what="the frames read")
        if mode == "standby":
            sup.set_standby([NOBODY, OTHER])
            sup.set_target(OTHER)
            await wait_async(lambda: sup.status["uid"] == 12345 and sup.relay.frames >= 1,
                             timeout=30, what="the switch, the frame written")
            grown = rss() - base
        else:
            grown = rss("VmHWM") - base
        print(json.dumps({"grown": grown}))
    finally:
        await sup.close()

asyncio.run(main())
'''

MIB = 1024 * 1024


def service_memory(workdir, mode: str, size: int, width: int, height: int,
                   worker: str = "frame") -> int:
    """Bytes the service's resident memory grew by under a worker sending frames of `size`."""
    d, _, rec = workdir
    script = os.path.join(d, "hostile_worker.py")
    with open(script, "w") as f:
        f.write(HOSTILE_WORKER)
    os.chmod(script, 0o644)
    root = os.path.dirname(SERVICE_DIR)
    out = subprocess.run([sys.executable, "-c", MEMORY_SERVICE, SERVICE_DIR, mode, script, rec,
                          str(size), str(width), str(height), worker],
                         capture_output=True, text=True, timeout=120, cwd=root,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])["grown"]


@pytest.mark.parametrize("worker, width, height", [
    ("frame", 16384, 16384), ("frames", 16384, 16384), ("frame", 1920, 1080), ("frame", 64, 48)])
def test_a_worker_costs_the_service_at_most_three_frames_of_its_format(workdir, worker, width,
                                                                       height):
    # The worst a worker can do: the largest frame the protocol allows (32 MiB), then all but one
    # byte of another, or all of it, to a port that takes nothing. What its FORMAT allows
    # (guestmessages.frame_limit: 32 MiB at 16384 x 16384, 12 MiB at 1920 x 1080, 0.1 MiB at
    # 64 x 48) is held at most three times: the frame, the message being read, the port writer's
    # copy of the frame it is writing (before, the second whole frame cost 141 MiB: its payload
    # copied out of the parser's buffer, the frame's parts copied whole). A larger frame is
    # skipped as it is read, never buffered or assembled (before, 64 x 48 cost 109 MiB).
    limit = guestmessages.frame_limit(width, height)
    grown = service_memory(workdir, "peak", p.DATA_MAX_BYTES, width, height, worker)
    assert grown < 3 * limit + 16 * MIB, f"the service grew by {grown / MIB:.0f} MiB"


def test_a_worker_switched_to_standby_holds_no_frame(workdir):
    # Its frame and its half-read message are dropped when its session goes to the background.
    grown = service_memory(workdir, "standby", p.DATA_MAX_BYTES, 16384, 16384)
    assert grown < 12 * MIB, f"the service still holds {grown / MIB:.0f} MiB"


def test_a_standby_workers_flood_is_not_read(workdir, pty_device):
    # A background session's worker floods its socket: the service takes its CAPABILITIES and
    # nothing more, so the flood costs the service no CPU and stops at the socket's buffer.
    d, _, rec = workdir
    script = os.path.join(d, "hostile_worker.py")
    with open(script, "w") as f:
        f.write(HOSTILE_WORKER)
    os.chmod(script, 0o644)

    async def run():
        sup = WorkerSupervisor(device_path=pty_device[0], fps=30, quality=80,
                               worker_argv=[sys.executable, script, "flood", rec, SERVICE_DIR,
                                            "0", "0", "0"])
        try:
            sup.set_target(NOBODY)
            sup.set_standby([NOBODY, OTHER])
            await wait_async(lambda: len(recorded(rec, "sent")) == 2, timeout=20,
                             what="both workers flooding")
            standby = next(s for s in recorded(rec, "start") if s["uid"] == 12345)
            active = next(s for s in recorded(rec, "start") if s["uid"] == 65534)
            # While the same flood from the active worker is read...
            await wait_async(lambda: of_pid(rec, "sent", active["pid"]) > 16 * MIB, timeout=30,
                             what="the active worker's flood read")
            # ...the standby's stops at what the kernel buffers for a socket (the worker's send
            # buffer is 1 MiB, which the kernel doubles, and the service's receive buffer).
            standby_sent = of_pid(rec, "sent", standby["pid"])
            assert standby_sent < 4 * MIB, f"the standby worker got {standby_sent} bytes read"
            assert sup._standby[OTHER].channel.caps_seen  # what a standby is read for
        finally:
            await sup.close()

    asyncio.run(run())


# ---- a hostile worker under spice-test-a: its children, its stdout, its user's site-packages ----

# Writes to fd 1 (mode "stdout"), or starts children that outlive it unless something ends them:
# two `setsid sleep` holding its stdout and stderr, and a daemon (double fork, setsid) reparented
# to init; records their pids and its own cgroup, then exits 3 ("spawn-exit") or stays.
HOSTILE_CHILDREN_WORKER = r'''
import json, os, subprocess, sys, time
mode, rec = sys.argv[1], sys.argv[2]
def record(name, data):
    path = os.path.join(rec, "%s-%d.json" % (name, os.getpid()))
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.rename(path + ".tmp", path)
if mode == "stdout":
    for _ in range(3):
        os.write(1, b"<0>spice-streamd: HOSTILE-STDOUT the worker speaks as the service\n")
    open(os.path.join(rec, "wrote"), "w").close()
    while True:
        time.sleep(1)
''' + SPAWN_CHILDREN + r'''
record("children", {"pid": os.getpid(), "children": pids, "cgroup": cg})
if mode == "spawn-exit":
    sys.exit(3)
while True:
    time.sleep(1)
'''


@pytest.fixture
def hostile(workdir):
    d, _, rec = workdir
    script = os.path.join(d, "hostile_worker.py")
    with open(script, "w") as f:
        f.write(HOSTILE_CHILDREN_WORKER)
    os.chmod(script, 0o644)
    spawned: list[int] = []
    try:
        yield script, rec, spawned
    finally:
        for r in recorded(rec, "children"):
            spawned += r["children"]
        for pid in spawned:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def user_a_target(display: str = ":4242", xauthority: str = "/nonexistent") -> WorkerTarget:
    from tests.support.bus import ensure_test_user

    a = ensure_test_user("spice-test-a")
    return WorkerTarget(uid=a.pw_uid, gid=a.pw_gid, groups=(), display=display,
                        xauthority=xauthority, vt=2)


def test_a_worker_child_holding_stderr_does_not_wedge_the_supervisor(hostile, pty_device):
    """Finding 2: the worker forks a setsid child that keeps its stderr and exits. The exit is
    noticed at once (not when the pipe closes: never), the worker is restarted, and a stop
    completes. Without a cgroup: the child survives the worker, so only the exit matters here."""
    script, rec, _ = hostile

    async def run():
        sup = WorkerSupervisor(device_path=pty_device[0], fps=30, quality=80,
                               worker_argv=[sys.executable, script, "spawn-exit", rec],
                               backoff_s=0.2, cgroups=None)
        try:
            sup.set_target(user_a_target())
            first = (await wait_async(lambda: recorded(rec, "children"), timeout=15,
                                      what="the first worker's children"))[0]
            assert any(alive(c) for c in first["children"])  # they hold its stderr
            await wait_async(lambda: "exit 3" in sup.status["last_error"], timeout=5,
                             what="the worker's exit to be noticed")
            await wait_async(lambda: len(recorded(rec, "children")) >= 2, timeout=10,
                             what="a restart")
            sup.set_target(None)
            await wait_async(lambda: sup.status["state"] == "idle" and not sup.status["pid"],
                             timeout=10, what="the stop")
        finally:
            await asyncio.wait_for(sup.close(), 10)

    asyncio.run(run())


def test_a_workers_processes_end_with_it_in_its_cgroup(hostile, pty_device):
    """Finding 4: everything the worker starts (setsid children, a daemon reparented to init) is
    in the worker's own cgroup from before its exec; stopping the worker empties and removes it."""
    from spice_streamd import cgroup
    from tests.support.cgroupfs import cgroup_of, relative, scratch_cgroup

    script, rec, _ = hostile
    with scratch_cgroup() as parent:
        async def run():
            sup = WorkerSupervisor(device_path=pty_device[0], fps=30, quality=80,
                                   worker_argv=[sys.executable, script, "stay", rec],
                                   cgroups=cgroup.Tree(parent))
            try:
                sup.set_target(user_a_target())
                r = (await wait_async(lambda: recorded(rec, "children"), timeout=15,
                                      what="the worker's children"))[0]
                assert r["cgroup"].startswith(relative(parent) + "/worker-")
                for pid in r["children"]:
                    assert cgroup_of(pid) == r["cgroup"]
                sup.set_target(None)
                await wait_async(lambda: sup.status["state"] == "idle" and not sup.status["pid"],
                                 timeout=10, what="the stop")
                # Gone by the time the stop completed, not some time later.
                assert not [pid for pid in [r["pid"], *r["children"]] if alive(pid)]
                assert not [n for n in os.listdir(parent) if n.startswith("worker-")]
            finally:
                await sup.close()

        asyncio.run(run())


def test_a_worker_that_exits_takes_its_processes_with_it(hostile, pty_device):
    """Finding 4: the worker exits on its own, leaving setsid children and a daemon: they are
    killed with its cgroup, which is removed, before the exit is reported."""
    from spice_streamd import cgroup
    from tests.support.cgroupfs import scratch_cgroup

    script, rec, _ = hostile
    with scratch_cgroup() as parent:
        async def run():
            sup = WorkerSupervisor(device_path=pty_device[0], fps=30, quality=80,
                                   worker_argv=[sys.executable, script, "spawn-exit", rec],
                                   backoff_s=30, cgroups=cgroup.Tree(parent))
            try:
                sup.set_target(user_a_target())
                r = (await wait_async(lambda: recorded(rec, "children"), timeout=15,
                                      what="the worker's children"))[0]
                await wait_async(lambda: sup.status["state"] == "backoff", timeout=10,
                                 what="the exit reported")
                assert "exit 3" in sup.status["last_error"]
                assert not [pid for pid in [r["pid"], *r["children"]] if alive(pid)]
                assert not [n for n in os.listdir(parent) if n.startswith("worker-")]
            finally:
                await sup.close()

        asyncio.run(run())


# The service in a process of its own (its stdout is the test's to read), with the supervisor's
# defaults: the worker's command line is the one the installed service uses.
SERVICE_PROGRAM = r'''
import asyncio, json, os, sys
from spice_streamd.supervisor import WorkerSupervisor, WorkerTarget
spec = json.loads(sys.argv[1])
async def main():
    master, slave = os.openpty()
    sup = WorkerSupervisor(device_path=os.ttyname(slave), fps=30, quality=80,
                           worker_argv=spec["argv"], backoff_s=30)
    t = spec["target"]
    sup.set_target(WorkerTarget(t["uid"], t["gid"], tuple(t["groups"]), t["display"],
                                t["xauthority"], t["vt"]))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 40
    while loop.time() < deadline:
        if sup.status["state"] == "running" if spec["until"] == "running" else \
                os.path.exists(spec["until"]):
            break
        await asyncio.sleep(0.02)
    status = sup.status
    await sup.close()
    with open(spec["out"], "w") as f:
        json.dump(status, f)
asyncio.run(main())
'''


def run_service(python: str, spec: dict) -> tuple[dict, subprocess.CompletedProcess]:
    spec = dict(spec, target=dataclasses.asdict(spec["target"]))
    proc = subprocess.run([python, "-c", SERVICE_PROGRAM, json.dumps(spec)], capture_output=True,
                          timeout=90, cwd="/")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    with open(spec["out"]) as f:
        return json.load(f), proc


def test_a_worker_writing_to_its_stdout_reaches_nothing_of_the_service(hostile):
    """Finding 3: a worker's fd 1 is not the service's stdout (its journal stream): an
    emergency-priority line written there must not come out of the service."""
    script, rec, _ = hostile
    out = os.path.join(rec, "status.json")
    status, proc = run_service(sys.executable, {
        "argv": [sys.executable, script, "stdout", rec], "target": user_a_target(),
        "until": os.path.join(rec, "wrote"), "out": out})
    assert os.path.exists(os.path.join(rec, "wrote"))  # it did write
    assert b"HOSTILE-STDOUT" not in proc.stdout
    assert b"HOSTILE-STDOUT" not in proc.stderr


@pytest.mark.slow
def test_the_users_usercustomize_does_not_run_in_the_worker(workdir):
    """The worker runs with its user's HOME: without -I, ~/.local/lib/python3.X/site-packages/
    usercustomize.py (the user's file) would run inside it. A real one in spice-test-a's home,
    the real worker under a Python whose user site is on (a venv's is off, Debian's is on)."""
    from tests.support.xserver import xvfb

    d, _, rec = workdir
    target_user = pwd.getpwuid(user_a_target().uid)
    venv = os.path.join(d, "venv")
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", "--system-site-packages",
                    venv], check=True, timeout=60)
    python = os.path.join(venv, "bin", "python")
    site_dir = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                              check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site_dir, "spice-streamd-tree.pth"), "w") as f:
        f.write(SERVICE_DIR + "\n")
    marker = os.path.join(rec, "usercustomize-ran")
    user_env = {"HOME": target_user.pw_dir, "PATH": "/usr/bin:/bin"}
    user_site = subprocess.run([python, "-c", "import site; print(site.getusersitepackages())"],
                               check=True, capture_output=True, text=True,
                               env=user_env).stdout.strip()
    code = f"open({marker!r}, 'a').write('ran in %d\\n' % __import__('os').getpid())\n"
    with user_site_file(target_user, user_site, "usercustomize.py", code):
        # The trap is armed: this Python runs it for that user, as it would have in the worker.
        subprocess.run([python, "-c", "pass"], user=target_user.pw_uid,
                       group=target_user.pw_gid, extra_groups=[], env=user_env, cwd="/",
                       check=True, timeout=30)
        assert os.path.exists(marker)
        os.unlink(marker)

        with xvfb(320, 240, owner_uid=target_user.pw_uid) as server:
            status, proc = run_service(python, {
                "argv": None, "until": "running", "out": os.path.join(rec, "status.json"),
                "target": user_a_target(server.display, server.xauthority)})
        assert not os.path.exists(marker), open(marker).read()
        assert status["state"] == "running", proc.stderr.decode(errors="replace")


@contextlib.contextmanager
def user_site_file(user: pwd.struct_passwd, site_dir: str, name: str, text: str) -> Iterator[str]:
    """`text` as site_dir/name, owned by `user` as if they had written it; afterwards the file is
    removed (or what was there put back) with every directory made for it: the home too, for a
    test user created without one."""
    missing = []
    d = site_dir
    while not os.path.isdir(d):
        missing.append(d)
        d = os.path.dirname(d)
    for m in reversed(missing):
        os.mkdir(m, 0o755)
        os.chown(m, user.pw_uid, user.pw_gid)
    target = os.path.join(site_dir, name)
    saved = None
    if os.path.exists(target):
        with open(target, "rb") as f:
            saved = f.read()
    with open(target, "w") as f:
        f.write(text)
    os.chown(target, user.pw_uid, user.pw_gid)
    try:
        yield target
    finally:
        if saved is None:
            os.unlink(target)
            shutil.rmtree(os.path.join(site_dir, "__pycache__"), ignore_errors=True)
        else:
            with open(target, "wb") as f:
                f.write(saved)
        if missing:
            shutil.rmtree(missing[-1], ignore_errors=True)


class FakeGrants:
    """FramebufferGrants without a DRM device: a device fd (/dev/null) and a grant socket."""

    opened: list[FakeGrants] = []

    def __init__(self, path: str) -> None:
        import socket
        self.path = path
        self.card_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self.ours, self.theirs = socket.socketpair()
        self.closed = False
        FakeGrants.opened.append(self)

    def reader_fds(self) -> tuple[int, int]:
        return self.card_fd, self.theirs.fileno()

    def started(self) -> None:
        self.theirs.close()

    def close(self) -> None:
        self.closed = True
        os.close(self.card_fd)
        self.ours.close()
        self.theirs.close()


def test_the_scanout_covers_for_a_worker_without_a_picture(workdir, pty_device):
    """A relayed worker that says NO_PICTURE (a locked Wayland screen): the scanout reader waiting
    in standby is relayed meanwhile (FORMAT first, Streaming true, its pid); once the worker has
    its picture again it is relayed again, starting with its FORMAT, and the reader rests. Nothing
    on the port is torn, and no frame of one goes under the other's FORMAT."""
    _, script, rec = workdir
    host = Host(pty_device[1])
    FakeGrants.opened.clear()

    async def run():
        sup, _ = make(script, rec, pty_device[0], "covered", open_grants=FakeGrants)
        try:
            sup.set_standby([SCANOUT])
            await wait_async(lambda: len(records(rec)) == 1, what="the reader in standby")
            reader = records(rec)[0]
            assert "--card-fd" in reader["argv"] and reader["resuid"][0] == SCANOUT.uid
            assert FakeGrants.opened and FakeGrants.opened[0].path == SCANOUT.card
            sup.set_target(NOBODY)
            first = (await wait_async(lambda: [r for r in records(rec)
                                               if r["pid"] != reader["pid"]], what="worker"))[0]
            host.send(p.start_stop([1]))
            await wait_async(lambda: sup.status["streaming"], timeout=15,
                             what="Streaming with the scanout's frames")
            assert sup.status["pid"] == reader["pid"] and sup.status["vt"] == NOBODY.vt
            # Its picture is back: the worker is relayed again.
            open(os.path.join(rec, "back"), "w").close()
            await wait_async(lambda: [m for t, m in host.read()
                                      if t == p.MsgType.DATA and m[2:3] == b"W"],
                             timeout=15, what="the worker's own frames")
            await wait_async(lambda: sup.status["pid"] == first["pid"], what="its pid again")
            msgs = host.read()
            kinds = [(t, m[2:3] if t == p.MsgType.DATA else p.decode_format(m).width
                      if t == p.MsgType.FORMAT else None) for t, m in msgs
                     if t in (p.MsgType.FORMAT, p.MsgType.DATA)]
            first_s = next(i for i, k in enumerate(kinds) if k[1] == b"S")
            first_w = next(i for i, k in enumerate(kinds) if k[1] == b"W")
            # The scanout's frames under its own FORMAT (32 wide), the worker's under its (64): the
            # FORMAT and frame it sent before it was told to start over are not on the port.
            assert kinds[first_s - 1] == (p.MsgType.FORMAT, 32), kinds
            assert kinds[first_w - 1] == (p.MsgType.FORMAT, 64), kinds
            assert kinds.count((p.MsgType.FORMAT, 64)) == 1, kinds
            assert all(k[1] == b"W" for k in kinds[first_w:] if k[0] == p.MsgType.DATA), kinds
            assert sup.status["streaming"]
            assert not FakeGrants.opened[0].closed  # the reader still waits in standby
        finally:
            await sup.close()
        assert FakeGrants.opened[0].closed

    asyncio.run(run())


async def _streaming_with_the_reader_in_standby(sup: WorkerSupervisor, rec, host: Host):
    """NOBODY's worker relayed and streaming (its own frames on the port), the scanout reader
    waiting in standby; the relayed worker."""
    sup.set_standby([SCANOUT])
    await wait_async(lambda: len(records(rec)) == 1, what="the reader in standby")
    sup.set_target(NOBODY)
    host.send(p.start_stop([1]))
    await wait_async(lambda: [m for t, m in host.read()
                              if t == p.MsgType.DATA and m[2:3] == b"W"],
                     timeout=15, what="the worker's own frames")
    return sup._worker


def test_no_cover_while_the_kernel_shows_another_vt_for_the_grace(workdir, pty_device):
    """The relayed worker's NO_PICTURE comes before the seat has told the switch (mutter hears
    of it first): while the kernel shows another VT, no cover for LEFT_GRACE_S (the reader would
    take CPU from the session switched to); past it, or with the kernel on its VT, covered."""
    _, script, rec = workdir
    host = Host(pty_device[1])
    FakeGrants.opened.clear()
    open(os.path.join(rec, "back"), "w").close()  # the worker has its picture
    from spice_streamd.supervisor import LEFT_GRACE_S

    kernel = {"vt": NOBODY.vt + 1}

    async def run():
        sup, _ = make(script, rec, pty_device[0], "covered", open_grants=FakeGrants,
                      kernel_vt=lambda: kernel["vt"])
        try:
            relayed = await _streaming_with_the_reader_in_standby(sup, rec, host)
            sup._on_no_picture(relayed)
            assert sup._cover is None and relayed.left_at is not None
            sup._on_no_picture(relayed)  # again (every 2 s), within the grace
            assert sup._cover is None
            relayed.left_at -= LEFT_GRACE_S  # past it: the kernel's VT is followed by no switch
            sup._on_no_picture(relayed)
            assert sup._cover is not None
            sup._end_cover(relayed, "test")
            kernel["vt"] = NOBODY.vt  # the kernel on the session's VT: covered at once
            sup._on_no_picture(relayed)
            assert sup._cover is not None
            sup._end_cover(relayed, "test")
            kernel["vt"] = None  # unknown: covered at once
            sup._on_no_picture(relayed)
            assert sup._cover is not None
        finally:
            await sup.close()

    asyncio.run(run())


def test_no_cover_for_a_worker_whose_session_has_just_left_the_screen(workdir, pty_device):
    """A VT switch: the relayed worker's session leaves the screen, so its NO_PICTURE may be read
    after the target changed and before the switch is carried out. The scanout reader is not
    started for it (on Debian 12 that put a start and a stop into the middle of the switch)."""
    _, script, rec = workdir
    host = Host(pty_device[1])
    FakeGrants.opened.clear()
    open(os.path.join(rec, "back"), "w").close()  # the worker has its picture

    async def run():
        sup, _ = make(script, rec, pty_device[0], "covered", open_grants=FakeGrants)
        try:
            relayed = await _streaming_with_the_reader_in_standby(sup, rec, host)
            sup.set_target(None)
            sup._on_no_picture(relayed)  # read before the supervisor's next round
            assert sup._cover is None
            # The still-current target's worker is covered, as before.
            sup.set_target(NOBODY)
            sup._on_no_picture(relayed)
            assert sup._cover is not None
        finally:
            await sup.close()

    asyncio.run(run())
