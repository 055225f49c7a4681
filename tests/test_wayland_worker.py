"""A Wayland registration's worker: how the supervisor starts it (argv, environment, identity,
cgroup limits), the user's Stop (exit 7: no restart, the registration stays, a new registration
starts it again), and a VT switch between an X11 and a Wayland session. The real registry,
coordinator and supervisor; the stand-in worker of test_supervisor under real uids; a raw pty as
the port."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable

import pytest

from spice_streamd import cgroup, workerprocess
from spice_streamd.coordinator import Coordinator
from spice_streamd.sessions import Registration, SessionRegistry
from spice_streamd.supervisor import WorkerSupervisor, WorkerTarget
from tests.support.bus import ensure_test_user
from tests.support.cgroupfs import scratch_cgroup
from tests.support.waiting import wait_async

# test_supervisor's stand-in worker and pty, under this file's names (imported fixtures count).
from tests.test_supervisor import SERVICE_DIR, Host, alive, records
from tests.test_supervisor import pty_device as port  # noqa: F401
from tests.test_supervisor import workdir as stand_in  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs workers as other uids")


RUNTIME = "/run/user/65534"
WAYLAND = WorkerTarget(uid=65534, gid=65534, groups=(), display="", xauthority="", vt=5,
                       kind="wayland", runtime_dir=RUNTIME, registration=":1.50",
                       session_id="c7")
X11_OTHER = WorkerTarget(uid=12345, gid=12346, groups=(12347,), display=":92",
                         xauthority="/tmp/xa-o", vt=2)


def supervisor(script: str, rec: str, device: str, mode: str, **kw) -> WorkerSupervisor:
    return WorkerSupervisor(device_path=device, fps=30, quality=80,
                            worker_argv=[sys.executable, script, mode, rec, SERVICE_DIR], **kw)


def test_a_wayland_worker_runs_as_the_user_with_the_screencast_source_and_session_bus(
        stand_in, port):
    _, script, rec = stand_in

    async def run():
        sup = supervisor(script, rec, port[0], "sleep")
        try:
            sup.set_target(WAYLAND)
            first = (await wait_async(lambda: records(rec), what="the Wayland worker"))[0]
            assert first["argv"][2:] == ["--fps", "30", "--quality", "80", "--codecs", "mjpeg",
                                         "--source", "screencast"]
            assert first["env"] == {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
                                    "XDG_RUNTIME_DIR": RUNTIME,
                                    "DBUS_SESSION_BUS_ADDRESS": f"unix:path={RUNTIME}/bus",
                                    "XDG_SESSION_ID": "c7", "HOME": "/nonexistent"}
            assert first["resuid"] == [65534] * 3 and first["resgid"] == [65534] * 3
            assert first["groups"] == []
            assert first["dev_is_socket"] and not first["dev_is_chr"]
            # Its groups are the caller's, never root's (as for X11).
            other = WorkerTarget(uid=12345, gid=12346, groups=(12347, 12348), display="",
                                 xauthority="", vt=6, kind="wayland",
                                 runtime_dir="/run/user/12345", registration=":1.51")
            sup.set_target(other)
            await wait_async(lambda: len(records(rec)) == 2, what="the second worker")
            second = [r for r in records(rec) if r["pid"] != first["pid"]][0]
            assert second["resuid"] == [12345] * 3 and second["resgid"] == [12346] * 3
            assert second["groups"] == [12347, 12348]
            assert "DISPLAY" not in second["env"] and "XAUTHORITY" not in second["env"]
            assert second["env"]["DBUS_SESSION_BUS_ADDRESS"] == "unix:path=/run/user/12345/bus"
        finally:
            await sup.close()

    asyncio.run(run())


def test_a_wayland_worker_gets_the_screencast_cgroup_limits(stand_in):
    """pids.max 64 for a GStreamer/PipeWire worker (16 for X11's), memory.max as for X11."""
    _, script, rec = stand_in
    user = ensure_test_user("spice-test-a")

    async def run(tree: cgroup.Tree):
        import socket
        found = {}
        for kind in ("x11", "wayland"):
            target = WorkerTarget(uid=user.pw_uid, gid=user.pw_gid, groups=(), display=":0",
                                  xauthority="/x", vt=5, kind=kind, runtime_dir="/run/user/1",
                                  registration=":1.1" if kind == "wayland" else "")
            ours, theirs = socket.socketpair()
            child = await workerprocess.spawn(
                [sys.executable, script, "sleep", rec, SERVICE_DIR, "--device-fd",
                 str(theirs.fileno())], target, theirs.fileno(), cgroups=tree)
            theirs.close()
            try:
                limits = {}
                for name in ("pids.max", "memory.max"):
                    path = os.path.join(child.cgroup.path, name)
                    if os.path.exists(path):
                        with open(path) as f:
                            limits[name] = f.read().strip()
                found[kind] = limits
            finally:
                child.kill_all()
                await child.exited()
                await child.end_rest()
                child.close_pipes()
                ours.close()
        return found

    class Recording(cgroup.Tree):
        """The real tree, noting the limits each cgroup was asked for (a machine without the
        pids or memory controller still shows what was asked)."""

        asked: list[cgroup.Limits] = []

        def create(self, kind, limits):
            self.asked.append(limits)
            return super().create(kind, limits)

    with scratch_cgroup() as path:
        tree = Recording(path)
        found = asyncio.run(run(tree))
    assert Recording.asked == [cgroup.Limits(pids=16, memory=256 << 20),
                               cgroup.Limits(pids=64, memory=256 << 20)]
    if "pids" in tree.controllers:
        assert found["wayland"]["pids.max"] == "64" and found["x11"]["pids.max"] == "16"
    if "memory" in tree.controllers:
        assert found["wayland"]["memory.max"] == found["x11"]["memory.max"] == str(256 << 20)


class Seat:
    """seat0 as the coordinator sees it: the active logind session, switched by the test."""

    def __init__(self) -> None:
        self.active_vt: int | None = None
        self.active_session: str | None = None
        self.has_sessions = True
        self._callbacks: list[Callable] = []

    def on_change(self, callback: Callable) -> None:
        self._callbacks.append(callback)

    def switch(self, session: str, vt: int) -> None:
        self.active_session, self.active_vt = session, vt
        for cb in list(self._callbacks):
            cb(vt)


class Port:
    def __init__(self, path: str) -> None:
        self.present = True
        self.node = path

    def on_change(self, callback: Callable) -> None:
        pass


def registration(sender: str, kind: str, uid: int, gid: int, vt: int, session: str,
                 groups: tuple[int, ...] = ()) -> Registration:
    if kind == "wayland":
        return Registration(sender=sender, uid=uid, gid=gid, groups=groups, pid=100,
                            session_id=session, vt=vt, display="", xauthority="",
                            kind="wayland", runtime_dir=f"/run/user/{uid}")
    return Registration(sender=sender, uid=uid, gid=gid, groups=groups, pid=100,
                        session_id=session, vt=vt, display=":92", xauthority="/tmp/xa-o")


def test_stopped_by_the_user_is_not_restarted_until_registered_anew(stand_in, port, caplog):
    """Exit 7 (GNOME's Stop): one log line with uid, VT and pid, no restart (the backoff would
    restart a failed worker within 0.05 s), the registration still listed; a new registration of
    the session (a new helper connection) starts a worker again."""
    _, script, rec = stand_in
    caplog.set_level(logging.INFO, logger="spice_streamd")

    async def run():
        sup = supervisor(script, rec, port[0], "exit7", backoff_s=0.05)
        registry = SessionRegistry()
        seat = Seat()
        coord = Coordinator(registry, seat, Port(port[0]), sup)
        try:
            seat.switch("w", 5)
            registry.add(registration(":1.50", "wayland", 65534, 65534, 5, "w"))
            first = (await wait_async(lambda: records(rec), what="the worker"))[0]
            await wait_async(lambda: [r for r in caplog.records
                                      if "stopped by its user" in r.getMessage()],
                             what="the stop logged")
            stop_lines = [r.getMessage() for r in caplog.records
                          if "stopped by its user" in r.getMessage()]
            assert stop_lines == [f"worker uid=65534 vt=5 pid={first['pid']} stopped by its user "
                                  "(the desktop's Stop for screen sharing): not restarted until "
                                  "the session registers again"]
            await wait_async(lambda: sup.status["state"] == "idle", what="idle")
            # A failed worker would be restarted 0.05 s later, five times in under 1.6 s: give
            # it twenty times that and count the starts.
            await asyncio.sleep(1.0)
            assert len(records(rec)) == 1
            assert not [r for r in caplog.records if "restart in" in r.getMessage()]
            assert sup.status["state"] == "idle" and sup.status["pid"] == 0
            assert "the user stopped the screen capture" in sup.status["last_error"]
            assert coord.properties()["Sessions"] == [[5, 65534, "wayland"]]
            # A VT switch away and back does not start it either.
            seat.switch("x", 2)
            seat.switch("w", 5)
            await asyncio.sleep(0.5)
            assert len(records(rec)) == 1
            # The user registers anew (a new login, a new helper connection): started again.
            registry.add(registration(":1.77", "wayland", 65534, 65534, 5, "w"))
            await wait_async(lambda: len(records(rec)) == 2, what="a worker for the new one")
            await wait_async(lambda: len([r for r in caplog.records
                                          if "stopped by its user" in r.getMessage()]) == 2,
                             what="its stop logged too")
            assert coord.properties()["Sessions"] == [[5, 65534, "wayland"]]
        finally:
            await sup.close()

    asyncio.run(run())


def test_a_standby_wayland_worker_stopped_by_its_user_is_not_started_on_a_switch(
        stand_in, port, caplog):
    """The Wayland session is in the background (its worker in standby) when its user stops the
    capture: switching to it starts nothing; the X11 session is streamed as before."""
    _, script, rec = stand_in
    caplog.set_level(logging.INFO, logger="spice_streamd")

    async def run():
        # nobody (the Wayland user) exits 7; uid 12345 (X11) sleeps.
        sup = supervisor(script, rec, port[0], "exit7/sleep", backoff_s=0.05)
        registry = SessionRegistry()
        seat = Seat()
        Coordinator(registry, seat, Port(port[0]), sup)
        try:
            seat.switch("x", 2)
            registry.add(registration(":1.40", "x11", 12345, 12346, 2, "x"))
            registry.add(registration(":1.50", "wayland", 65534, 65534, 5, "w"))
            await wait_async(lambda: len(records(rec)) == 2, what="both workers")
            await wait_async(lambda: [r for r in caplog.records
                                      if "stopped by its user" in r.getMessage()],
                             what="the standby worker's stop logged")
            seat.switch("w", 5)
            await wait_async(lambda: sup.status["state"] == "idle" and sup.status["uid"] == 65534,
                             what="nothing streamed for the stopped session")
            await asyncio.sleep(0.5)
            assert len(records(rec)) == 2
            seat.switch("x", 2)
            x11 = [r for r in records(rec) if r["resuid"][0] == 12345][0]
            await wait_async(lambda: sup.status["pid"] == x11["pid"], what="X11 relayed again")
        finally:
            await sup.close()

    asyncio.run(run())


def test_a_vt_switch_between_x11_and_wayland_moves_the_stream_both_ways(stand_in, port):
    """Alice's X11 session on VT 2, nobody's Wayland session on VT 5, both registered: the stream
    follows seat0's active session both ways, and frames reach the port from whichever is
    relayed."""
    _, script, rec = stand_in
    host = Host(port[1])

    async def run():
        from spice_stream_common import protocol as p

        sup = supervisor(script, rec, port[0], "chatty")
        registry = SessionRegistry()
        seat = Seat()
        Coordinator(registry, seat, Port(port[0]), sup)
        try:
            seat.switch("x", 2)
            registry.add(registration(":1.40", "x11", 12345, 12346, 2, "x", groups=(12347,)))
            registry.add(registration(":1.50", "wayland", 65534, 65534, 5, "w"))
            await wait_async(lambda: len(records(rec)) == 2, what="both workers started")
            by_uid = {r["resuid"][0]: r for r in records(rec)}
            x11, wl = by_uid[12345], by_uid[65534]
            assert x11["env"]["DISPLAY"] == ":92" and "--source" not in x11["argv"]
            assert wl["env"]["XDG_RUNTIME_DIR"] == "/run/user/65534" and \
                wl["argv"][-2:] == ["--source", "screencast"]
            host.send(p.capabilities(b"") + p.start_stop([1]))
            await wait_async(lambda: sup.status["pid"] == x11["pid"] and host.frames(),
                             timeout=10, what="the X11 session streamed")

            seat.switch("w", 5)
            await wait_async(lambda: sup.status["pid"] == wl["pid"], what="moved to Wayland")
            n = len(host.frames())
            await wait_async(lambda: len(host.frames()) > n, timeout=10,
                             what="the Wayland worker's frames")
            seat.switch("x", 2)
            await wait_async(lambda: sup.status["pid"] == x11["pid"], what="moved back to X11")
            n = len(host.frames())
            await wait_async(lambda: len(host.frames()) > n, timeout=10,
                             what="the X11 worker's frames again")
            assert len(records(rec)) == 2  # each switch relayed a standby worker: no new start
            assert alive(wl["pid"]) and alive(x11["pid"])
        finally:
            await sup.close()
        assert not any(alive(r["pid"]) for r in records(rec))

    asyncio.run(run())
