"""The session registry, the coordinator's mapping to a worker target, and the rate limiters,
without a bus."""

from __future__ import annotations

import logging

import pytest

from spice_stream_common.ratelimit import LogLimiter, TokenBucket
from spice_streamd.coordinator import Coordinator
from spice_streamd.errors import LimitReached, PermissionDenied
from spice_streamd.sessions import Registration, SessionRegistry


def reg(sender: str, uid: int, vt: int, session: str | None = None) -> Registration:
    return Registration(sender=sender, uid=uid, gid=uid, groups=(), pid=100, session_id=session,
                        vt=vt, display=f":{vt}", xauthority="/x")


def test_same_sender_or_vt_replaces():
    r = SessionRegistry()
    r.add(reg(":1.1", 1000, 2))
    assert r.add(reg(":1.1", 1000, 3)) == [reg(":1.1", 1000, 2)]
    assert [x.vt for x in r.all()] == [3]
    replaced = r.add(reg(":1.2", 1001, 3))
    assert [x.sender for x in replaced] == [":1.1"]
    assert [x.sender for x in r.all()] == [":1.2"]


def test_a_second_caller_on_the_helpers_vt_does_not_cost_the_helper_its_registration():
    r = SessionRegistry()
    helper = reg(":1.1", 1000, 2, "s1")
    r.add(helper)
    second = Registration(sender=":1.2", uid=1000, gid=1000, groups=(), pid=101, session_id="s1",
                          vt=2, display=":5", xauthority="/y")
    assert r.add(second) == []  # same session: kept, both of them
    assert r.by_vt(2) == second and r.all() == [second] and len(r) == 2
    r.remove_sender(":1.2")
    assert r.by_vt(2) == helper and r.all() == [helper]
    # Either may leave first: what remains still counts.
    r.add(second)
    r.remove_sender(":1.1")
    assert r.by_vt(2) == second


def test_another_session_on_the_same_vt_replaces_the_ended_one():
    # logind gives a VT to one live session at a time: an older session there has ended.
    r = SessionRegistry()
    r.add(reg(":1.1", 1000, 2, "s1"))
    r.add(reg(":1.2", 1000, 2, "s1"))
    newer = reg(":1.3", 1001, 2, "s9")
    assert sorted(x.sender for x in r.add(newer)) == [":1.1", ":1.2"]
    assert r.all() == [newer] and len(r) == 1


def test_limits_change_nothing_when_refused():
    r = SessionRegistry(max_sessions=2, max_sessions_per_uid=1)
    r.add(reg(":1.1", 1000, 2))
    with pytest.raises(LimitReached, match="uid 1000"):
        r.add(reg(":1.2", 1000, 3))
    r.add(reg(":1.3", 1001, 4))
    with pytest.raises(LimitReached, match="limit 2"):
        r.add(reg(":1.4", 1002, 5))
    assert [x.sender for x in r.all()] == [":1.1", ":1.3"]
    # Replacing does not count against the bound.
    r.add(reg(":1.1", 1000, 2))
    assert len(r) == 2


def test_remove_by_sender_and_session():
    r = SessionRegistry()
    r.add(reg(":1.1", 1000, 2, "s1"))
    r.add(reg(":1.2", 1001, 3, "s2"))
    assert r.remove_sender(":1.1").vt == 2
    assert r.remove_sender(":1.1") is None
    assert [x.vt for x in r.remove_session("s2")] == [3]
    assert len(r) == 0


class FakeSource:
    has_sessions = False  # the sysfs fallback's way: the VT decides
    active_session = None

    def __init__(self, value):
        self.active_vt = value
        self.present = value
        self.callbacks = []

    def on_change(self, cb):
        self.callbacks.append(cb)

    def set(self, value):
        self.active_vt = self.present = value
        for cb in self.callbacks:
            cb(value)


class FakeSupervisor:
    def __init__(self):
        self.targets = []
        self.present = []
        self.status = {"state": "idle"}

    def set_target(self, t):
        self.targets.append(t)

    def set_device_present(self, p, path=None):
        self.present.append(p)

    def set_standby(self, targets):
        self.standby = list(targets)


def test_coordinator_follows_vt_registry_and_device():
    registry = SessionRegistry()
    vt, dev, sup = FakeSource(2), FakeSource(False), FakeSupervisor()
    c = Coordinator(registry, vt, dev, sup, make_target=lambda r: r and (r.uid, r.vt))
    c.update()
    assert sup.targets == [] and sup.present == [False]
    assert c.idle()
    registry.add(reg(":1.1", 1000, 3))
    assert sup.targets == []  # VT 3 is not active
    assert sup.standby == [(1000, 3)]  # its worker is kept started, not relayed
    vt.set(3)
    assert sup.targets == [(1000, 3)] and sup.standby == []
    dev.set(True)
    assert sup.present == [False, True]
    assert not c.idle()
    registry.remove_sender(":1.1")
    assert sup.targets == [(1000, 3), None]
    assert c.properties()["Sessions"] == [] and c.properties()["ActiveVT"] == 3


def test_token_bucket():
    now = [0.0]
    b = TokenBucket(rate=1.0, burst=2, clock=lambda: now[0], max_keys=2)
    assert [b.allow("k") for _ in range(3)] == [True, True, False]
    now[0] += 1.0
    assert b.allow("k") and not b.allow("k")
    for k in range(100):
        b.allow(k)
    assert len(b._state) == 2


def test_log_limiter(caplog):
    now = [0.0]
    lim = LogLimiter(logging.getLogger("t"), interval=10, clock=lambda: now[0])
    with caplog.at_level(logging.INFO):
        for _ in range(50):
            lim.log(logging.WARNING, "k", "refused %s", "x")
        now[0] += 11
        lim.log(logging.WARNING, "k", "refused %s", "x")
    assert len(caplog.records) == 2
    assert "49 similar lines suppressed" in caplog.records[1].getMessage()


class RecordingSupervisor(FakeSupervisor):
    def __init__(self, refuse=False):
        super().__init__()
        self.paths = []
        self.refuse = refuse

    def set_device_present(self, p, path=None):
        self.present.append(p)
        self.paths.append(path)

    def set_target(self, t):
        if self.refuse and t is not None:
            raise PermissionDenied("refusing a root group")
        super().set_target(t)


def test_coordinator_hands_over_the_node_the_watch_found_and_survives_a_refused_target(caplog):
    registry = SessionRegistry()
    vt, dev = FakeSource(2), FakeSource(False)
    sup = RecordingSupervisor(refuse=True)
    c = Coordinator(registry, vt, dev, sup, make_target=lambda r: r and (r.uid, r.vt))
    c.update()
    dev.node = "/dev/vport0p1"  # found by its sysfs name: no udev symlink
    dev.set(True)
    assert sup.present[-1] is True and sup.paths[-1] == "/dev/vport0p1"
    registry.add(reg(":1.1", 1000, 2))
    assert sup.targets == []  # refused, and the coordinator went on
    assert "not streaming uid 1000 on VT 2" in caplog.text
    assert c.properties()["Sessions"] == [[2, 1000, ":2"]]


def test_coordinator_streams_the_fallback_when_no_registered_session_is_in_front():
    """The scanout reader's target: relayed while nobody's session is in front (from the very
    first update), kept in standby while one is."""
    registry = SessionRegistry()
    vt, dev, sup = FakeSource(2), FakeSource(True), FakeSupervisor()
    c = Coordinator(registry, vt, dev, sup, make_target=lambda r: r and (r.uid, r.vt),
                    fallback="scanout")
    c.update()
    assert sup.targets == ["scanout"] and sup.standby == []
    registry.add(reg(":1.1", 1000, 2))
    assert sup.targets == ["scanout", (1000, 2)] and sup.standby == ["scanout"]
    vt.set(6)  # a text console
    assert sup.targets[-1] == "scanout" and sup.standby == [(1000, 2)]
    # The scanout's status has no VT of its own: the properties say the VT in front.
    sup.status = {"state": "running", "streaming": True, "vt": 0, "pid": 7}
    assert c.properties()["StreamingVT"] == 6
    sup.status = {"state": "running", "streaming": False, "vt": 0, "pid": 7}
    assert c.properties()["StreamingVT"] == 0


def wayland_reg(sender, uid, vt, session):
    return Registration(sender=sender, uid=uid, gid=uid, groups=(uid,), vt=vt, display="",
                        xauthority="", session_id=session, pid=100, kind="wayland")


def test_coordinator_streams_wayland_sessions_from_the_scanout_when_configured(caplog):
    """wayland_capture = "scanout": a Wayland session in front is streamed by the scanout
    reader (kept running across the switch to it: the same target), no worker of its own is
    started or kept in standby; an X11 session keeps its worker."""
    registry = SessionRegistry()
    vt, dev, sup = FakeSource(2), FakeSource(True), FakeSupervisor()
    c = Coordinator(registry, vt, dev, sup, make_target=lambda r: r and (r.uid, r.vt),
                    fallback="scanout", scanout_kinds=frozenset({"wayland"}))
    c.update()
    caplog.set_level(logging.INFO)
    registry.add(wayland_reg(":1.1", 1000, 2, "s1"))
    assert sup.targets == ["scanout", "scanout"] and sup.standby == []
    assert "streaming uid 1000 display wayland (session s1) from the display's scanout" \
        in caplog.text
    registry.add(reg(":1.2", 1001, 3))  # bob's X11 session on VT 3
    assert sup.standby == [(1001, 3)]
    vt.set(3)
    assert sup.targets[-1] == (1001, 3) and sup.standby == ["scanout"]
    vt.set(2)
    assert sup.targets[-1] == "scanout" and sup.standby == [(1001, 3)]


def test_coordinator_without_a_scanout_streams_wayland_sessions_by_their_worker():
    registry = SessionRegistry()
    vt, dev, sup = FakeSource(2), FakeSource(True), FakeSupervisor()
    c = Coordinator(registry, vt, dev, sup, make_target=lambda r: r and (r.uid, r.vt),
                    fallback=None, scanout_kinds=frozenset({"wayland"}))
    c.update()
    registry.add(wayland_reg(":1.1", 1000, 2, "s1"))
    assert sup.targets == [(1000, 2)]
