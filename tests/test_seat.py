"""Active VT: logind seat0 (dbusmock on a private bus) and the sysfs file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import time
from collections.abc import AsyncIterator

import pytest
from dbus_next import Message, MessageType, Variant
from dbus_next.aio import MessageBus

from spice_streamd.seat import LogindVTSource, SysfsVTSource, VTSource, open_vt_source
from tests.conftest import connect
from tests.support.waiting import wait_async


@contextlib.asynccontextmanager
async def vt_source(bus, **kwargs) -> AsyncIterator[tuple[MessageBus, VTSource]]:
    """open_vt_source on a connection to the test bus, both closed afterwards."""
    conn = await connect(bus.address)
    src = await open_vt_source(conn, **kwargs)
    try:
        yield conn, src
    finally:
        await src.close()
        conn.disconnect()


def test_logind_follows_seat0(bus, logind):
    logind.add_session("c2", uid=1000, vt=2, active=True)
    logind.add_session("c7", uid=1001, vt=7)
    logind.add_session("ssh", uid=1002, vt=0, type="tty")

    async def run():
        async with vt_source(bus, sysfs_path="/nonexistent") as (_, src):
            seen: list[int | None] = []
            src.on_change(seen.append)
            assert isinstance(src, LogindVTSource)
            assert src.active_vt == 2
            await asyncio.to_thread(logind.activate, "c7")
            await wait_async(lambda: src.active_vt == 7, what="VT 7")
            await asyncio.to_thread(logind.activate, "ssh")  # active but on no VT
            await wait_async(lambda: src.active_vt is None, what="no VT")
            await asyncio.to_thread(logind.activate, "c2")
            await wait_async(lambda: src.active_vt == 2, what="VT 2")
            await asyncio.to_thread(logind.remove_session, "c2")
            await wait_async(lambda: src.active_vt is None, what="no session")
            assert seen == [7, None, 2, None]

    asyncio.run(run())


def test_logind_without_a_session_in_front_says_the_kernels_vt(bus, logind, tmp_path):
    """A text console's login prompt has no logind session: the VT in front is the kernel's."""
    active = tmp_path / "active"
    active.write_text("tty6\n")
    logind.add_session("c2", uid=1000, vt=2, active=True)

    async def run():
        async with vt_source(bus, sysfs_path=str(active)) as (_, src):
            assert (src.active_vt, src.active_session) == (2, "c2")
            await asyncio.to_thread(logind.remove_session, "c2")
            await wait_async(lambda: src.active_vt == 6, what="the kernel's VT 6")
            assert src.active_session is None

    asyncio.run(run())


def test_a_new_session_on_the_same_vt_is_a_change(bus, logind):
    """A logout and another user's login on the same VT leave the VT as it was: the session id
    tells them apart, and the callbacks hear of it."""
    logind.add_session("a5", uid=1001, vt=5, type="tty", active=True)

    async def run():
        async with vt_source(bus) as (_, src):
            seen: list[tuple[int | None, str | None]] = []
            src.on_change(lambda vt: seen.append((vt, src.active_session)))
            assert (src.active_vt, src.active_session, src.has_sessions) == (5, "a5", True)
            logind.add_session("b5", uid=1002, vt=5, type="tty")
            await asyncio.to_thread(logind.activate, "b5")
            await wait_async(lambda: seen, what="the change of session")
            assert seen == [(5, "b5")]
            # A change nobody signalled is found by reading again.
            await asyncio.to_thread(logind.activate, "a5", True)
            await src.refresh("test")
            assert seen == [(5, "b5"), (5, "a5")]

    asyncio.run(run())


def test_spoofed_seat_change_is_ignored(bus, logind):
    """Another peer unicasting a PropertiesChanged for seat0 must not move the worker."""
    logind.add_session("c2", uid=1000, vt=2, active=True)
    logind.add_session("c9", uid=1001, vt=9)

    async def run():
        async with vt_source(bus) as (conn, src):
            seen: list[int | None] = []
            src.on_change(seen.append)
            evil = await connect(bus.address)
            await evil.send(Message(
                message_type=MessageType.SIGNAL, destination=conn.unique_name,
                path="/org/freedesktop/login1/seat/seat0",
                interface="org.freedesktop.DBus.Properties", member="PropertiesChanged",
                signature="sa{sv}as",
                body=["org.freedesktop.login1.Seat",
                      {"ActiveSession": Variant("(so)", ["c9", "/org/freedesktop/login1/session/c9"])},
                      []]))
            # The real switch afterwards proves the fake one arrived first and was dropped.
            await asyncio.to_thread(logind.activate, "c9")
            await wait_async(lambda: seen, what="real switch")
            assert seen == [9]
            evil.disconnect()

    asyncio.run(run())


def test_a_malformed_active_session_in_loginds_signal_is_read_from_the_seat(bus, logind, caplog):
    """The value in logind's signal is used only in the shape (so); any other has seat0 read
    again: no error, no change that did not happen."""
    import dbus
    from tests.support.logind import SEAT, SEAT0

    logind.add_session("c2", uid=1000, vt=2, active=True)
    logind.add_session("c9", uid=1001, vt=9)

    async def run():
        async with vt_source(bus, sysfs_path="/nonexistent") as (_, src):
            seen: list[int | None] = []
            src.on_change(seen.append)
            for bad in (dbus.String("c9", variant_level=1),
                        dbus.Struct((dbus.UInt32(9), dbus.ObjectPath("/")), variant_level=1)):
                await asyncio.to_thread(
                    logind._mock(SEAT0).EmitSignal, "org.freedesktop.DBus.Properties",
                    "PropertiesChanged", "sa{sv}as",
                    [SEAT, dbus.Dictionary({"ActiveSession": bad}, signature="sv"),
                     dbus.Array([], signature="s")])
            # The real switch afterwards proves the malformed ones came first (one sender).
            await asyncio.to_thread(logind.activate, "c9")
            await wait_async(lambda: seen, what="real switch")
            assert seen == [9] and src.active_session == "c9"

    with caplog.at_level("WARNING"):
        asyncio.run(run())
    assert not [r for r in caplog.records if r.levelno >= 40], caplog.records


def test_logind_going_away_means_no_vt(bus, logind):
    logind.add_session("c3", uid=1000, vt=3, active=True)

    async def run():
        async with vt_source(bus) as (_, src):
            assert src.active_vt == 3
            await asyncio.to_thread(logind.stop)
            await wait_async(lambda: src.active_vt is None, what="no VT once logind is gone")

    asyncio.run(run())


def test_kernel_vt_is_read_at_the_call_ahead_of_the_published_vt(bus, logind, tmp_path):
    """kernel_vt() reads the kernel's VT when asked (the supervisor asks when a worker says it has
    no picture), not what logind has said so far; with either source."""
    active = tmp_path / "active"
    active.write_text("tty2\n")
    logind.add_session("c2", uid=1000, vt=2, active=True)

    async def run():
        async with vt_source(bus, sysfs_path=str(active)) as (_, src):
            assert src.kernel_vt() == 2 and src.active_vt == 2
            active.write_text("tty3\n")  # the kernel switched; logind has not said so
            assert src.kernel_vt() == 3 and src.active_vt == 2
            active.write_text("garbage")
            assert src.kernel_vt() is None
        sysfs = SysfsVTSource(str(active))
        active.write_text("tty5\n")
        assert sysfs.kernel_vt() == 5
        active.unlink()
        assert sysfs.kernel_vt() is None

    asyncio.run(run())


def test_sysfs_regular_file_is_polled(tmp_path):
    active = tmp_path / "active"
    active.write_bytes(b"tty1\n")

    async def run():
        src = await open_vt_source(None, sysfs_path=str(active))
        seen: list[int | None] = []
        src.on_change(seen.append)
        try:
            assert isinstance(src, SysfsVTSource)
            assert src.mode == "poll"
            assert src.active_vt == 1
            active.write_bytes(b"tty4\n")
            await wait_async(lambda: src.active_vt == 4, timeout=3, what="VT 4")
            active.write_bytes(b"garbage")
            await wait_async(lambda: src.active_vt is None, timeout=3, what="unparsable")
            active.unlink()
            await asyncio.sleep(0.6)
            active.write_bytes(b"tty63\n")
            await wait_async(lambda: src.active_vt == 63, timeout=3, what="VT 63")
            assert seen == [4, None, 63]
        finally:
            await src.close()

    asyncio.run(run())


def test_bus_without_logind_uses_sysfs(bus, tmp_path):
    active = tmp_path / "active"
    active.write_bytes(b"tty5\n")

    async def run():
        conn = await connect(bus.address)
        src = await open_vt_source(conn, sysfs_path=str(active))
        try:
            assert isinstance(src, SysfsVTSource) and src.active_vt == 5
            assert not src.has_sessions and src.active_session is None  # the VT decides
        finally:
            await src.close()
            conn.disconnect()

    asyncio.run(run())


@pytest.mark.skipif(not os.path.exists("/sys/class/tty/tty0/active"), reason="no VT sysfs")
def test_real_sysfs_is_watched_without_spinning():
    """The real attribute goes through epoll (PRI/ERR only): reading it right and staying idle."""
    with open("/sys/class/tty/tty0/active", "rb") as f:
        expected = int(f.read().strip()[3:])

    async def run():
        src = SysfsVTSource()
        await src.start()
        try:
            assert src.mode == "epoll"
            assert src.active_vt == expected
            before = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.monotonic()
            await asyncio.sleep(0.5)
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            assert cpu < 0.1 * (time.monotonic() - t0), f"busy loop: {cpu:.3f} s CPU"
        finally:
            await src.close()

    asyncio.run(run())


def test_overlapping_lookups_publish_the_first_answer_and_never_an_older_one_after_a_newer():
    """Two lookups of seat0 in flight (a PropertiesChanged, then the periodic re-check): the
    first answer is published at once, not held back until the newer lookup answers; an answer
    to an older lookup that comes after a newer one's is dropped."""

    async def run():
        src = LogindVTSource(bus=object())  # type: ignore[arg-type]  # _read_active stands in
        answers: list[asyncio.Future] = []

        async def read_active(active=None):
            fut = asyncio.get_running_loop().create_future()
            answers.append(fut)
            return await fut

        src._read_active = read_active  # type: ignore[method-assign]
        seen: list[int | None] = []
        src.on_change(seen.append)
        older = asyncio.create_task(src._refresh("seat0 ActiveSession changed"))
        newer = asyncio.create_task(src._refresh("periodic re-check"))
        await wait_async(lambda: len(answers) == 2, what="both lookups")
        answers[0].set_result((2, "1"))  # the older lookup answers first: published
        await older
        assert (src.active_vt, src.active_session) == (2, "1")
        answers[1].set_result((3, "3"))  # then the newer one: published
        await newer
        assert seen == [2, 3]
        # The other way round: the newer answers first, the older one's answer is dropped.
        older = asyncio.create_task(src._refresh("seat0 ActiveSession changed"))
        newer = asyncio.create_task(src._refresh("periodic re-check"))
        await wait_async(lambda: len(answers) == 4, what="both lookups")
        answers[3].set_result((5, "5"))
        await newer
        answers[2].set_result((4, "4"))
        await older
        assert (src.active_vt, src.active_session) == (5, "5") and seen == [2, 3, 5]

    asyncio.run(run())


def test_a_kernel_switch_has_logind_asked_again_when_its_signal_is_lost(bus, logind, tmp_path):
    """logind's PropertiesChanged came 3.4 s late or never under load (VM): the kernel's VT (the
    sysfs file, polled here) changing has logind asked again, and again while it lags behind."""
    active = tmp_path / "active"
    active.write_text("tty2\n")
    logind.add_session("c2", uid=1000, vt=2, active=True)
    logind.add_session("c3", uid=1001, vt=3)

    async def run():
        conn = await connect(bus.address)
        src = await open_vt_source(conn, sysfs_path=str(active))
        try:
            assert src.active_vt == 2
            # logind takes the switch without a signal.
            await asyncio.to_thread(logind.activate, "c3", quietly=True)
            await asyncio.sleep(1.5)  # the file is polled every 0.5 s: the kernel has not moved
            assert src.active_vt == 2  # nothing said so: the periodic re-check would find it
            active.write_text("tty3\n")
            await wait_async(lambda: src.active_vt == 3, timeout=3.0, what="VT 3 from logind")
            assert src.active_session == "c3"
            # The kernel first, logind a while later (and silently): asked again until it agrees.
            active.write_text("tty2\n")
            await asyncio.sleep(0.8)
            await asyncio.to_thread(logind.activate, "c2", quietly=True)
            await wait_async(lambda: src.active_vt == 2, timeout=3.0, what="VT 2 from logind")
            assert src.active_session == "c2"
        finally:
            await src.close()
            conn.disconnect()

    asyncio.run(run())


def test_a_switch_to_a_known_session_asks_logind_nothing(bus, logind, monkeypatch):
    """Under load each call to logind took 0.5-1 s while it handled the switch itself (VM): its
    signal carries seat0's new ActiveSession, and a session's VTNr, which never changes, is asked
    for once. A session not seen before is asked for its VT; another logind forgets them all."""
    from spice_streamd import seat

    logind.add_session("c2", uid=1000, vt=2, active=True)
    logind.add_session("c7", uid=1001, vt=7)
    logind.add_session("c9", uid=1002, vt=9)
    asked: list[str] = []
    real = seat.get_properties

    async def counted(bus_, path, interface, timeout):
        asked.append(path.rsplit("/", 1)[-1])
        return await real(bus_, path, interface, timeout)

    monkeypatch.setattr(seat, "get_properties", counted)

    async def run():
        conn = await connect(bus.address)
        src = await open_vt_source(conn, sysfs_path="/nonexistent")
        try:
            assert src.active_vt == 2
            await asyncio.to_thread(logind.activate, "c7")
            await wait_async(lambda: src.active_vt == 7, what="VT 7")
            await asyncio.to_thread(logind.activate, "c2")
            await wait_async(lambda: src.active_vt == 2, what="VT 2")
            # The start read the seat and c2; the switch to c7 asked for c7's VT only; back to
            # c2, nothing.
            assert asked == ["seat0", "c2", "c7"], asked
            asked.clear()
            await asyncio.to_thread(logind.activate, "c7")
            await wait_async(lambda: src.active_vt == 7, what="VT 7 again")
            assert asked == []
            await asyncio.to_thread(logind.activate, "c9")
            await wait_async(lambda: src.active_vt == 9, what="VT 9")
            assert asked == ["c9"]
            # A re-check still reads the seat (a signal may be lost), not the known session.
            asked.clear()
            await src.refresh("test")
            assert asked == ["seat0"] and src.active_vt == 9
        finally:
            await src.close()
            conn.disconnect()

    asyncio.run(run())
