"""Session lookup: logind (dbusmock on a private bus) and the /proc fallback."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from dbus_next import Message, MessageType

from spice_streamd import errors, sessioninfo
from spice_streamd.sessioninfo import (
    LogindSessionSource,
    ProcSessionSource,
    SessionInfo,
    open_session_source,
    parse_proc_stat_tty,
    vt_of_tty_nr,
)
from tests.conftest import connect
from tests.support.waiting import wait_async, wait_until


def test_logind_runtime_path_of_a_user(bus, logind):
    """A Wayland worker's runtime dir is logind's User.RuntimePath for the uid; a uid logind does
    not know has none. Without logind (/proc) there is none to trust."""
    logind.add_session("c7", uid=1000, vt=7, type="wayland", pids=[4343])
    logind.set_runtime_path(1000, "/run/user/1000-test")

    async def run():
        conn = await connect(bus.address)
        src = await open_session_source(conn)
        try:
            assert await src.runtime_path(1000) == "/run/user/1000-test"
            with pytest.raises(errors.NotInSession, match="logind knows no user 4321"):
                await src.runtime_path(4321)
        finally:
            await src.close()
            conn.disconnect()
        with pytest.raises(errors.NotInSession, match="without logind"):
            await ProcSessionSource().runtime_path(1000)

    asyncio.run(run())


def test_logind_session_of_pid(bus, logind):
    logind.add_session("c2", uid=65534, vt=2, type="x11", pids=[4242], active=True)
    logind.add_session("c7", uid=1000, vt=7, type="wayland", pids=[4343])

    async def run():
        conn = await connect(bus.address)
        src = await open_session_source(conn)
        try:
            assert isinstance(src, LogindSessionSource)
            assert await src.session_of_pid(4242) == SessionInfo("c2", 65534, 2, "x11", True)
            assert await src.session_of_pid(4343) == SessionInfo("c7", 1000, 7, "wayland", False)
            with pytest.raises(errors.NotInSession, match="no login session"):
                await src.session_of_pid(999999)
        finally:
            await src.close()
            conn.disconnect()

    asyncio.run(run())


def test_logind_session_says_whether_it_is_remote_on_seat0_or_ended(bus, logind):
    import dbus

    logind.add_session("c2", uid=65534, vt=2, type="x11", pids=[4242], active=True)

    async def run():
        conn = await connect(bus.address)
        src = await open_session_source(conn)
        try:
            info = await src.session_of_pid(4242)
            assert (info.remote, info.seat, info.closing) == (False, "seat0", False)
            logind.set_property("c2", "Remote", True)
            logind.set_property("c2", "Seat", dbus.Struct(
                ("seat1", dbus.ObjectPath("/org/freedesktop/login1/seat/seat1"))))
            logind.set_property("c2", "State", "closing")
            info = await src.session_of_pid(4242)
            assert (info.remote, info.seat, info.closing) == (True, "seat1", True)
        finally:
            await src.close()
            conn.disconnect()

    asyncio.run(run())


def test_logind_autostart_process_gets_the_users_display_session(bus, logind):
    """GNOME's autostart programs run in user@UID.service, outside the session's scope: the user's
    display session stands in, but only seat0's active, local X11 session of that same user."""
    logind.add_session("c2", uid=1000, vt=2, type="x11", active=True)
    logind.add_session("c3", uid=1001, vt=3, type="x11")
    logind.map_user_pids(1000, [500])
    logind.map_user_pids(1001, [600])
    logind.map_user_pids(1002, [700])  # a user with no display session

    async def run():
        conn = await connect(bus.address)
        src = await open_session_source(conn)
        try:
            with pytest.raises(errors.NotInSession, match="uid 1000 has no display session"):
                await src.session_of_pid(500)
            logind.set_user_display(1000, "c2")
            assert await src.session_of_pid(500) == SessionInfo("c2", 1000, 2, "x11", True)

            logind.set_user_display(1001, "c3")  # on seat0 but not the active session
            with pytest.raises(errors.NotInSession, match="not seat0's active local X11"):
                await src.session_of_pid(600)
            logind.activate("c3")
            assert await src.session_of_pid(600) == SessionInfo("c3", 1001, 3, "x11", True)
            logind.set_property("c3", "Remote", True)
            with pytest.raises(errors.NotInSession, match="not seat0's active local X11"):
                await src.session_of_pid(600)
            logind.set_property("c3", "Remote", False)
            # A Wayland display session is the user's too (RegisterWaylandSession; RegisterSession
            # refuses it by its Type, in the verifier); a text one is not a display session.
            logind.set_property("c3", "Type", "wayland")
            assert await src.session_of_pid(600) == SessionInfo("c3", 1001, 3, "wayland", True)
            logind.set_property("c3", "Type", "tty")
            with pytest.raises(errors.NotInSession, match="not seat0's active local X11"):
                await src.session_of_pid(600)
            logind.set_property("c3", "Type", "x11")

            logind.set_user_display(1002, "c3")  # logind never does this; a session of another uid
            with pytest.raises(errors.NotInSession, match="not seat0's active local X11"):
                await src.session_of_pid(700)
            with pytest.raises(errors.NotInSession, match="in no login session"):
                await src.session_of_pid(999)  # no user either
        finally:
            await src.close()
            conn.disconnect()

    asyncio.run(run())


def test_logind_session_state_closing_or_gone(bus, logind):
    logind.add_session("c5", uid=1000, vt=5, type="tty", pids=[77], active=True)

    async def run():
        conn = await connect(bus.address)
        src = await open_session_source(conn)
        try:
            assert await src.session_state("c5") == "active"
            await asyncio.to_thread(logind.close_session, "c5")  # told to nobody, as by logind
            assert await src.session_state("c5") == "closing"
            await asyncio.to_thread(logind.remove_session, "c5", False)
            assert await src.session_state("c5") == sessioninfo.GONE
            assert await src.session_state("no-such") == sessioninfo.GONE
            await asyncio.to_thread(logind.stop)
            with pytest.raises(sessioninfo.LogindError):  # nobody knows: not "gone"
                await src.session_state("c5")
        finally:
            await src.close()
            conn.disconnect()

    asyncio.run(run())


def test_logind_session_not_on_vt(bus, logind):
    logind.add_session("s0", uid=1000, vt=0, type="tty", pids=[77])

    async def run():
        conn = await connect(bus.address)
        src = await open_session_source(conn)
        try:
            with pytest.raises(errors.NotInSession, match="not on a VT"):
                await src.session_of_pid(77)
        finally:
            await src.close()
            conn.disconnect()

    asyncio.run(run())


def test_logind_session_removed_signal(bus, logind):
    logind.add_session("c3", uid=1000, vt=3, pids=[55])

    async def run():
        conn = await connect(bus.address)
        src = await open_session_source(conn)
        removed: list[str] = []
        src.on_session_removed(removed.append)
        try:
            await asyncio.to_thread(logind.remove_session, "c3")
            await wait_async(lambda: removed == ["c3"], what="SessionRemoved")
            with pytest.raises(errors.NotInSession):
                await src.session_of_pid(55)
        finally:
            await src.close()
            conn.disconnect()

    asyncio.run(run())


def test_spoofed_session_removed_is_ignored(bus, logind):
    """A SessionRemoved unicast by some other peer must not drop anyone's session."""
    logind.add_session("c4", uid=1000, vt=4, pids=[66])

    async def run():
        conn = await connect(bus.address)
        src = await open_session_source(conn)
        removed: list[str] = []
        src.on_session_removed(removed.append)
        evil = await connect(bus.address)
        try:
            await evil.send(Message(
                message_type=MessageType.SIGNAL, destination=conn.unique_name,
                path="/org/freedesktop/login1", interface="org.freedesktop.login1.Manager",
                member="SessionRemoved", signature="so",
                body=["c4", "/org/freedesktop/login1/session/c4"]))
            # A real removal afterwards proves the handler was live when the fake one arrived.
            await asyncio.to_thread(logind.remove_session, "c4")
            await wait_async(lambda: removed, what="real SessionRemoved")
            assert removed == ["c4"]
        finally:
            await src.close()
            evil.disconnect()
            conn.disconnect()

    asyncio.run(run())


def test_logind_timeout_is_authority_unavailable(bus, logind):
    logind.add_session("c5", uid=1000, vt=5, pids=[88])
    logind.set_hang(1.5)

    async def run():
        conn = await connect(bus.address)
        src = LogindSessionSource(conn, timeout=0.3)
        await src.start()
        try:
            t0 = time.monotonic()
            with pytest.raises(errors.AuthorityUnavailable):
                await src.session_of_pid(88)
            assert time.monotonic() - t0 < 1.2
        finally:
            await src.close()
            conn.disconnect()

    asyncio.run(run())


def test_logind_gone_is_authority_unavailable(bus, logind):
    logind.add_session("c6", uid=1000, vt=6, pids=[99])

    async def run():
        conn = await connect(bus.address)
        src = await open_session_source(conn)
        try:
            await asyncio.to_thread(logind.stop)
            await asyncio.to_thread(
                wait_until, lambda: not _has_owner(bus.address), 5, "logind gone")
            with pytest.raises(errors.AuthorityUnavailable):
                await src.session_of_pid(99)
        finally:
            await src.close()
            conn.disconnect()

    asyncio.run(run())


def _has_owner(address: str) -> bool:
    import dbus

    conn = dbus.bus.BusConnection(address)
    try:
        return bool(conn.name_has_owner("org.freedesktop.login1"))
    finally:
        conn.close()


def test_no_logind_gives_proc_source(bus):
    async def run():
        conn = await connect(bus.address)
        src = await open_session_source(conn)
        try:
            assert isinstance(src, ProcSessionSource)
        finally:
            await src.close()
            conn.disconnect()

    asyncio.run(run())


def test_proc_stat_parsing_survives_odd_names():
    line = b"1234 (a) b (c)) S 1 1234 1234 1025 1234 4194560 0 0\n"
    assert parse_proc_stat_tty(line) == 1025
    with pytest.raises(ValueError):
        parse_proc_stat_tty(b"garbage")


@pytest.mark.parametrize(
    "tty_nr,vt",
    [(0x0401, 1), (0x0402, 2), (0x043F, 63), (0x0400, None), (0x0440, None),
     (0x8800, None), (0x8801, None), (0, None)],
)
def test_vt_of_tty_nr(tty_nr, vt):
    assert vt_of_tty_nr(tty_nr) == vt


def _fake_proc(root, pid: int, stat: bytes, uid_line: bytes) -> None:
    d = root / str(pid)
    d.mkdir()
    (d / "stat").write_bytes(stat)
    (d / "status").write_bytes(b"Name:\tx\n" + uid_line + b"Gid:\t0 0 0 0\n")


def test_proc_source(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    active = tmp_path / "active"
    active.write_bytes(b"tty3\n")
    _fake_proc(proc, 10, b"10 (Xorg :0) S 1 10 10 1027 0 0\n", b"Uid:\t1000\t0\t0\t0\n")
    _fake_proc(proc, 11, b"11 (gnome) S 1 11 11 0 0 0\n", b"Uid:\t1000\t1000\t1000\t1000\n")
    _fake_proc(proc, 12, b"12 (bash) S 1 12 12 34816 0 0\n", b"Uid:\t0\t0\t0\t0\n")
    _fake_proc(proc, 13, b"13 (x) S 1 13 13 1026 0 0\n", b"Uid:\t5\t5\t5\t5\n")
    _fake_proc(proc, 14, b"14 (x) S", b"")
    src = ProcSessionSource(str(proc), str(active))

    async def run():
        # Real uid, not the effective one: the effective uid is the process's to change.
        assert await src.session_of_pid(10) == SessionInfo(None, 1000, 3, "unspecified", True)
        assert await src.session_of_pid(13) == SessionInfo(None, 5, 2, "unspecified", False)
        with pytest.raises(errors.NotInSession, match="not on a VT"):
            await src.session_of_pid(11)
        with pytest.raises(errors.NotInSession, match="not on a VT"):
            await src.session_of_pid(12)  # a pty (major 136) is no VT
        with pytest.raises(errors.NotInSession, match="gone"):
            await src.session_of_pid(99)
        with pytest.raises(errors.NotInSession, match="unreadable"):
            await src.session_of_pid(14)
        with pytest.raises(errors.NotInSession):
            await src.session_of_pid(0)

    asyncio.run(run())


def test_proc_source_real_process():
    """Against the real /proc: this test process has no VT as controlling tty here."""
    src = ProcSessionSource()
    with open(f"/proc/{os.getpid()}/stat", "rb") as f:
        vt = vt_of_tty_nr(sessioninfo.parse_proc_stat_tty(f.read()))

    async def run():
        if vt is None:
            with pytest.raises(errors.NotInSession):
                await src.session_of_pid(os.getpid())
        else:
            info = await src.session_of_pid(os.getpid())
            assert (info.uid, info.vt) == (os.getuid(), vt)

    asyncio.run(run())
