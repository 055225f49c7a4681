"""The verifier's use of logind's view of the caller's session, whatever polkit said: remote, other
seats and ended sessions are refused; an inactive one only when asked to be strict."""

from __future__ import annotations

import asyncio
import struct

import pytest

from spice_streamd.caller import Caller
from spice_streamd.errors import NotInSession
from spice_streamd.sessioninfo import SessionInfo
from spice_streamd.verifier import RegistrationVerifier

CALLER = Caller(sender=":1.7", uid=1000, pid=4242, gid=1000, groups=())


def xauthority_for(number: str) -> bytes:
    def counted(b: bytes) -> bytes:
        return struct.pack(">H", len(b)) + b
    return (struct.pack(">H", 65535) + counted(b"") + counted(number.encode())
            + counted(b"MIT-MAGIC-COOKIE-1") + counted(b"\x01" * 16))


class Sessions:
    def __init__(self, info: SessionInfo) -> None:
        self.info = info

    async def session_of_pid(self, pid: int) -> SessionInfo:
        return self.info


def verify(info: SessionInfo, **kwargs):
    async def authorize(sender: str, action: str) -> None:
        return None  # a polkit rule that says yes to anything

    async def read_file(caller: Caller, path: str) -> bytes:
        return xauthority_for("42")

    verifier = RegistrationVerifier(authorize=authorize, sessions=Sessions(info),
                                    read_file=read_file, **kwargs)
    return asyncio.run(verifier.verify(CALLER, ":42", "/home/u/.Xauthority"))


ACTIVE = SessionInfo("c2", 1000, 2, "x11", True, remote=False, seat="seat0")


def test_the_active_local_session_is_accepted():
    assert verify(ACTIVE).vt == 2


@pytest.mark.parametrize("info, says", [
    (SessionInfo("c2", 1000, 2, "x11", True, remote=True), "remote"),
    (SessionInfo("c2", 1000, 2, "x11", True, seat="seat1"), "not seat0"),
    (SessionInfo("c2", 1000, 2, "x11", True, seat=""), "not seat0"),
    (SessionInfo("c2", 1000, 2, "x11", False, closing=True), "has ended"),
])
def test_remote_other_seat_or_ended_sessions_are_refused(info, says):
    with pytest.raises(NotInSession, match=says):
        verify(info)


def test_an_inactive_session_is_refused_only_when_strict():
    background = SessionInfo("c3", 1000, 3, "x11", False)
    assert verify(background).vt == 3  # streamed only once its VT is in front
    with pytest.raises(NotInSession, match="not the active session"):
        verify(background, require_active=True)
    assert verify(ACTIVE, require_active=True).vt == 2


def test_the_proc_fallback_counts_as_local_seat0():
    # Without logind the controlling VT is all there is: seat0's, local by construction.
    assert verify(SessionInfo(None, 1000, 2, "unspecified", True)).vt == 2


# ---- RegisterWaylandSession ------------------------------------------------------------------

class WaylandSessions(Sessions):
    def __init__(self, info: SessionInfo, runtime: str = "/run/user/1000") -> None:
        super().__init__(info)
        self.runtime = runtime
        self.asked: list[int] = []

    async def runtime_path(self, uid: int) -> str:
        self.asked.append(uid)
        return self.runtime


def verify_wayland(info: SessionInfo, sessions: WaylandSessions | None = None):
    checked: list[tuple[str, int, int]] = []

    async def authorize(sender: str, action: str) -> None:
        assert action == "org.spice_space.streaming-agent.register-session"

    async def check_runtime(runtime: str, uid: int, gid: int) -> None:
        checked.append((runtime, uid, gid))

    sessions = sessions or WaylandSessions(info)
    verifier = RegistrationVerifier(authorize=authorize, sessions=sessions,
                                    check_runtime=check_runtime)
    return asyncio.run(verifier.verify_wayland(CALLER)), checked


WAYLAND = SessionInfo("c5", 1000, 5, "wayland", True, remote=False, seat="seat0")


def test_the_active_local_wayland_session_is_accepted_with_loginds_runtime_dir():
    sessions = WaylandSessions(WAYLAND, "/run/user/1000")
    reg, checked = verify_wayland(WAYLAND, sessions)
    assert (reg.kind, reg.vt, reg.runtime_dir, reg.label, reg.display) == \
        ("wayland", 5, "/run/user/1000", "wayland", "")
    assert sessions.asked == [1000]  # the caller's uid, from the bus: never a caller's path
    assert checked == [("/run/user/1000", 1000, 1000)]


@pytest.mark.parametrize("info, says", [
    (SessionInfo("c5", 1000, 5, "x11", True), "not a Wayland session"),
    (SessionInfo("c5", 1000, 5, "tty", True), "not a Wayland session"),
    (SessionInfo("c5", 1000, 5, "wayland", False), "not seat0's active session"),
    (SessionInfo("c5", 1000, 5, "wayland", True, remote=True), "remote"),
    (SessionInfo("c5", 1000, 5, "wayland", True, seat="seat1"), "not seat0"),
    (SessionInfo("c5", 1000, 5, "wayland", True, closing=True), "has ended"),
    (SessionInfo("c5", 1001, 5, "wayland", True), "not of uid 1000"),
    # The /proc fallback: no logind, no session id, no runtime dir to trust.
    (SessionInfo(None, 1000, 5, "unspecified", True), "need systemd-logind"),
])
def test_a_wayland_registration_is_refused_unless_all_holds(info, says):
    sessions = WaylandSessions(info)
    with pytest.raises(NotInSession, match=says):
        verify_wayland(info, sessions)
    assert sessions.asked == []  # refused before the runtime dir is even looked up


def test_a_wayland_session_is_refused_by_register_session():
    with pytest.raises(NotInSession, match="RegisterWaylandSession"):
        verify(WAYLAND)
