"""A registration lives as long as its logind session: the session in front (by id, not only its VT)
is streamed, and registrations of closing or removed sessions are dropped (logind mock on a private
bus, the verifier's real session lookup, the coordinator and the expiry as the service wires them)."""

from __future__ import annotations

import asyncio
import logging
import struct

import pytest

from spice_streamd.caller import Caller
from spice_streamd.coordinator import Coordinator
from spice_streamd.errors import NotInSession
from spice_streamd.seat import open_vt_source
from spice_streamd.sessionexpiry import SessionExpiry
from spice_streamd.sessioninfo import open_session_source
from spice_streamd.sessions import Registration, SessionRegistry
from spice_streamd.verifier import RegistrationVerifier
from tests.conftest import connect
from tests.support.waiting import wait_async

ALICE, BOB = 1001, 1002
RECHECK_S = 0.2


def xauthority_for(number: str) -> bytes:
    def counted(b: bytes) -> bytes:
        return struct.pack(">H", len(b)) + b
    return (struct.pack(">H", 65535) + counted(b"") + counted(number.encode())
            + counted(b"MIT-MAGIC-COOKIE-1") + counted(b"\x01" * 16))


class Device:
    present = True
    node = "/dev/vport0p1"

    def on_change(self, cb) -> None:
        pass


class Supervisor:
    """Records what the coordinator asks for: the relayed target and the standby workers."""

    def __init__(self) -> None:
        self.target = None
        self.standby: list = []
        self.status = {"state": "idle"}

    def set_target(self, t) -> None:
        self.target = t

    def set_device_present(self, p, path=None) -> None:
        pass

    def set_standby(self, targets) -> None:
        self.standby = list(targets)

    def workers(self) -> set:
        """Every worker kept running: the relayed one and those in standby."""
        return {t for t in [self.target, *self.standby] if t is not None}


class Service:
    """The parts of main.Service that decide what is streamed, on a private bus."""

    async def start(self, address: str, recheck_s: float = RECHECK_S) -> Service:
        self.conn = await connect(address)
        self.sessions = await open_session_source(self.conn)
        self.seat = await open_vt_source(self.conn)
        self.registry = SessionRegistry()
        self.supervisor = Supervisor()
        self.coordinator = Coordinator(self.registry, self.seat, Device(), self.supervisor,
                                       make_target=lambda r: r and (r.uid, r.vt, r.session_id))
        self.expiry = SessionExpiry(self.registry, self.sessions, self.seat, recheck_s=recheck_s)
        self.expiry.start()
        self.coordinator.update()

        async def authorize(sender: str, action: str) -> None:
            return None

        async def read_file(caller: Caller, path: str) -> bytes:
            return xauthority_for("42")

        self.verifier = RegistrationVerifier(authorize=authorize, sessions=self.sessions,
                                             read_file=read_file)
        return self

    async def register(self, sender: str, uid: int, pid: int) -> Registration:
        caller = Caller(sender=sender, uid=uid, pid=pid, gid=uid, groups=())
        reg = await self.verifier.verify(caller, ":42", "/tmp/xauth")
        self.registry.add(reg)
        return reg

    def senders(self) -> set[str]:
        return {r.sender for r in self.registry.all()}

    async def close(self) -> None:
        await self.expiry.close()
        await self.seat.close()
        await self.sessions.close()
        self.conn.disconnect()


def run(bus, body, **kwargs) -> None:
    async def main():
        service = await Service().start(bus.address, **kwargs)
        try:
            await body(service)
        finally:
            await service.close()

    asyncio.run(main())


def test_another_session_in_front_on_the_same_vt_is_not_shown_the_registered_one(bus, logind):
    """Two sessions on VT 5: alice's registered, bob's (a tty login, never registering) in front."""
    logind.add_session("a5", uid=ALICE, vt=5, type="tty", pids=[5001], active=True)

    async def body(s: Service) -> None:
        await s.register(":1.50", ALICE, 5001)
        assert s.supervisor.target == (ALICE, 5, "a5")
        logind.add_session("b5", uid=BOB, vt=5, type="tty", pids=[5002])
        await asyncio.to_thread(logind.activate, "b5")
        # alice's session is still open (not closing): kept, but not relayed to bob's screen.
        await wait_async(lambda: s.supervisor.target is None, timeout=3,
                         what="no worker relayed while bob's session is in front")
        assert s.senders() == {":1.50"}
        await asyncio.to_thread(logind.activate, "a5")
        await wait_async(lambda: s.supervisor.target == (ALICE, 5, "a5"), what="alice again")

    run(bus, body)


def test_a_closed_session_on_the_vt_of_the_next_login_is_dropped(bus, logind, caplog):
    """alice logs out with a process left behind (closing), bob logs in on the same VT."""
    logind.add_session("a5", uid=ALICE, vt=5, type="tty", pids=[5001], active=True)

    async def body(s: Service) -> None:
        await s.register(":1.50", ALICE, 5001)
        assert s.supervisor.target == (ALICE, 5, "a5")
        await asyncio.to_thread(logind.close_session, "a5")
        logind.add_session("b5", uid=BOB, vt=5, type="tty", pids=[5002])
        await asyncio.to_thread(logind.activate, "b5")
        await wait_async(lambda: s.supervisor.workers() == set() and not s.senders(),
                         timeout=3, what="alice's worker stopped and her registration dropped")
        assert s.supervisor.target is None
        assert s.coordinator.properties()["Sessions"] == []
        # Her helper, still connected, cannot register the closing session again.
        with pytest.raises(NotInSession, match="has ended"):
            await s.register(":1.50", ALICE, 5001)

    with caplog.at_level(logging.INFO, logger="spice_streamd.sessionexpiry"):
        run(bus, body, recheck_s=60)  # the login alone must do it, not the periodic check
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert dropped == [f"registration of uid {ALICE} on VT 5 dropped: session a5 is closing "
                       "(logged out, processes left behind)"]


def test_a_closing_session_still_in_front_is_dropped_by_the_periodic_check(bus, logind):
    """alice logs out on VT 5 and nobody logs in: logind keeps her closing session seat0's active
    one and signals nothing, so only asking finds it."""
    logind.add_session("a5", uid=ALICE, vt=5, type="tty", pids=[5001], active=True)

    async def body(s: Service) -> None:
        await s.register(":1.50", ALICE, 5001)
        assert s.supervisor.target == (ALICE, 5, "a5")
        await asyncio.to_thread(logind.close_session, "a5")
        await wait_async(lambda: not s.senders() and s.supervisor.target is None, timeout=3,
                         what="alice's closing session dropped")
        assert s.seat.active_session == "a5"  # still in front: the state decided

    run(bus, body)


def test_a_missed_active_session_signal_is_made_good_by_the_periodic_check(bus, logind):
    """alice closes and bob takes VT 5, and the service hears neither (a lost signal)."""
    logind.add_session("a5", uid=ALICE, vt=5, type="tty", pids=[5001], active=True)
    logind.add_session("c6", uid=BOB, vt=6, type="x11", pids=[6001])

    async def body(s: Service) -> None:
        await s.register(":1.50", ALICE, 5001)
        await s.register(":1.60", BOB, 6001)
        assert s.supervisor.target == (ALICE, 5, "a5")
        logind.add_session("b5", uid=BOB, vt=5, type="tty", pids=[5002])
        await asyncio.to_thread(logind.close_session, "a5")
        await asyncio.to_thread(logind.activate, "b5", True)
        await wait_async(lambda: s.senders() == {":1.60"}, timeout=3,
                         what="alice's registration dropped without any signal")
        await wait_async(lambda: s.seat.active_session == "b5", timeout=3,
                         what="seat0's active session read again")
        assert s.supervisor.target is None
        assert s.supervisor.workers() == {(BOB, 6, "c6")}  # bob's own display, standby

    run(bus, body)


def test_a_removed_session_is_dropped_with_or_without_its_signal(bus, logind, caplog):
    logind.add_session("a5", uid=ALICE, vt=5, type="tty", pids=[5001])
    logind.add_session("a6", uid=ALICE, vt=6, type="x11", pids=[6001])
    logind.add_session("c7", uid=BOB, vt=7, type="x11", pids=[7001], active=True)

    async def body(s: Service) -> None:
        await s.register(":1.50", ALICE, 5001)
        await s.register(":1.60", ALICE, 6001)
        await s.register(":1.70", BOB, 7001)
        assert s.supervisor.workers() == {(ALICE, 5, "a5"), (ALICE, 6, "a6"), (BOB, 7, "c7")}
        await asyncio.to_thread(logind.remove_session, "a5")
        await wait_async(lambda: ":1.50" not in s.senders(), timeout=3, what="SessionRemoved")
        await asyncio.to_thread(logind.remove_session, "a6", False)
        await wait_async(lambda: s.senders() == {":1.70"}, timeout=3,
                         what="a session gone without its SessionRemoved")
        assert s.supervisor.workers() == {(BOB, 7, "c7")}
        assert s.supervisor.target == (BOB, 7, "c7")

    with caplog.at_level(logging.INFO, logger="spice_streamd.sessionexpiry"):
        run(bus, body)
    dropped = sorted(r.getMessage() for r in caplog.records if "dropped" in r.getMessage())
    assert dropped == [
        f"registration of uid {ALICE} on VT 5 dropped: session a5 was removed (logind "
        "SessionRemoved)",
        f"registration of uid {ALICE} on VT 6 dropped: session a6 is gone (logind no longer "
        "knows it)",
    ]


def test_logind_not_answering_keeps_registrations(bus, logind, caplog):
    """A check that gets no answer must not drop anyone (nor be mistaken for "gone"), and says so
    once, not at every periodic check."""
    logind.add_session("c6", uid=BOB, vt=6, type="x11", pids=[6001], active=True)

    async def body(s: Service) -> None:
        await s.register(":1.60", BOB, 6001)
        await asyncio.to_thread(logind.stop)
        await wait_async(lambda: s.seat.active_vt is None, what="logind gone")
        await asyncio.sleep(5 * RECHECK_S)  # several periodic checks, all unanswered
        assert s.senders() == {":1.60"}

    with caplog.at_level(logging.INFO):
        run(bus, body)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([w for w in warnings if "seat0's active session" in w]) <= 1, warnings
    assert len([w for w in warnings if "registered sessions" in w]) == 1, warnings


def test_without_logind_the_vt_decides_as_before(bus, tmp_path):
    """The sysfs + /proc fallback has no session ids: the registration on the active VT is shown."""
    active = tmp_path / "active"
    active.write_bytes(b"tty2\n")

    async def body() -> None:
        conn = await connect(bus.address)
        seat = await open_vt_source(conn, sysfs_path=str(active))
        registry = SessionRegistry()
        sup = Supervisor()
        Coordinator(registry, seat, Device(), sup, make_target=lambda r: r and (r.uid, r.vt))
        try:
            registry.add(Registration(sender=":1.3", uid=ALICE, gid=ALICE, groups=(), pid=1,
                                      session_id=None, vt=3, display=":3", xauthority="/x"))
            assert sup.target is None and sup.standby == [(ALICE, 3)]
            active.write_bytes(b"tty3\n")
            await wait_async(lambda: sup.target == (ALICE, 3), timeout=3, what="VT 3 in front")
        finally:
            await seat.close()
            conn.disconnect()

    asyncio.run(body())
