"""spice-streamd on a bus enforcing our policy, with the real polkitd and a logind mock: registration,
lifetime of registrations, limits, floods, introspection and the policy file."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import xml.etree.ElementTree as ET

import pytest

from tests.support.bus import REPO, wait_until

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real polkitd, test users")]

ERR = "org.spice_space.StreamingAgent1.Error."
BUS_NAME = "org.spice_space.StreamingAgent1"
PATH = "/org/spice_space/StreamingAgent1"


@pytest.fixture
def stack(stack_module):
    try:
        yield stack_module
    finally:
        stack_module.end_test()


def test_authorized_user_registers_and_gets_its_vt(stack):
    stack.service()
    xa = stack.files.xauthority("spice-test-a", ":42")
    result = stack.register("spice-test-a", "a", ":42", xa)
    assert result[:2] == ["ok", 2]


def test_helper_registers_and_its_session_ends_with_its_connection(stack):
    stack.service()
    h = stack.helper("spice-test-a", "a", ":42")
    uid = stack.uid("spice-test-a")
    wait_until(lambda: stack.prop("Sessions") == [(2, uid, ":42")], what="the session listed")
    # The property changes before the helper has read its reply: wait for its line too.
    wait_until(lambda: "registered" in h.output, what="the helper's line")
    assert stack.prop("ActiveVT") == 2
    h.stop()
    wait_until(lambda: stack.prop("Sessions") == [], what="the session dropped")


def test_unauthorized_user_is_refused(stack):
    svc = stack.service()
    xa = stack.files.xauthority("spice-test-b", ":43")
    result = stack.register("spice-test-b", "b", ":43", xa)
    assert result[:2] == ["error", ERR + "PermissionDenied"]
    assert "polkit" in result[2]
    assert stack.prop("Sessions") == []
    uid = stack.uid("spice-test-b")
    wait_until(lambda: f"uid {uid}" in svc.log and "PermissionDenied" in svc.log,
               what="one refusal log line naming the uid")


def test_caller_not_in_a_session_is_refused(stack):
    stack.service()
    xa = stack.files.xauthority("spice-test-a", ":42")
    result = stack.register("spice-test-a", None, ":42", xa)
    assert result[:2] == ["error", ERR + "NotInSession"]


def test_someone_elses_session_is_refused(stack):
    # A process of uid a that logind places in b's session (e.g. su): not the caller's own.
    stack.service()
    xa = stack.files.xauthority("spice-test-a", ":42")
    result = stack.register("spice-test-a", "b", ":42", xa)
    assert result[:2] == ["error", ERR + "NotInSession"]


def test_wayland_session_is_refused(stack):
    stack.service()
    stack.logind.set_property("a4", "Type", "wayland")
    try:
        xa = stack.files.xauthority("spice-test-a", ":44")
        result = stack.register("spice-test-a", "a4", ":44", xa)
    finally:
        stack.logind.set_property("a4", "Type", "x11")
    assert result[:2] == ["error", ERR + "NotInSession"]
    assert "Wayland" in result[2]


def test_reregistration_replaces(stack):
    stack.service()
    uid = stack.uid("spice-test-a")
    h1 = stack.helper("spice-test-a", "a", ":42")
    wait_until(lambda: stack.prop("Sessions") == [(2, uid, ":42")], what="first registration")
    h2 = stack.helper("spice-test-a", "a", ":45")
    wait_until(lambda: stack.prop("Sessions") == [(2, uid, ":45")], what="replaced by the second")
    # The replaced helper's connection leaving must not drop the new registration.
    h1.stop()
    time.sleep(0.3)  # give a wrong drop the chance to happen before we look again
    assert stack.prop("Sessions") == [(2, uid, ":45")]
    assert h2.proc.poll() is None


def test_a_second_caller_leaving_gives_the_vt_back_to_the_helper(stack):
    # The helper registered at login; another process of the same session registers for the
    # same VT and leaves. The helper's registration must still be there: it never registers again.
    stack.service()
    uid = stack.uid("spice-test-a")
    h = stack.helper("spice-test-a", "a", ":42")
    wait_until(lambda: stack.prop("Sessions") == [(2, uid, ":42")], what="the helper registered")
    second = stack.client("spice-test-a", "a")
    xa = stack.files.xauthority("spice-test-a", ":45")
    assert second.send({"op": "register", "calls": [[":45", xa]], "stay": True})[0][:2] == ["ok", 2]
    assert stack.prop("Sessions") == [(2, uid, ":45")]
    second.stop()
    wait_until(lambda: stack.prop("Sessions") == [(2, uid, ":42")],
               what="the helper's registration in use again")
    assert h.proc.poll() is None


def test_logind_says_remote_or_other_seat_or_ended_refuses_whatever_polkit_says(stack):
    # The test's polkit rule says YES to spice-test-a wherever it is: a loose rule. logind's view
    # of the caller's own session must still keep the port from a remote or ended session.
    import dbus

    svc = stack.service()
    xa = stack.files.xauthority("spice-test-a", ":42")
    seat1 = dbus.Struct(("seat1", dbus.ObjectPath("/org/freedesktop/login1/seat/seat1")))
    seat0 = dbus.Struct(("seat0", dbus.ObjectPath("/org/freedesktop/login1/seat/seat0")))
    for name, bad, good, says in [("Remote", True, False, "remote session"),
                                  ("Seat", seat1, seat0, "not seat0"),
                                  ("State", "closing", "active", "has ended")]:
        stack.logind.set_property("a", name, bad)
        try:
            result = stack.register("spice-test-a", "a", ":42", xa)
        finally:
            stack.logind.set_property("a", name, good)
        assert result[:2] == ["error", ERR + "NotInSession"], (name, result)
        assert says in result[2]
    assert stack.prop("Sessions") == []
    # The control: the same caller, its session local on seat0 again, is accepted.
    assert stack.register("spice-test-a", "a", ":42", xa)[:2] == ["ok", 2]
    assert svc.proc.poll() is None


def test_session_removed_by_logind_drops_registration(stack):
    stack.service()
    uid = stack.uid("spice-test-a")
    stack.logind.add_session("a9", uid, 9, username="spice-test-a")
    h = stack.helper("spice-test-a", "a9", ":49")
    wait_until(lambda: (9, uid, ":49") in stack.prop("Sessions"), what="registration on VT 9")
    stack.logind.remove_session("a9")
    wait_until(lambda: stack.prop("Sessions") == [], what="registration dropped with the session")
    assert h.proc.poll() is None


def test_per_uid_limit(stack):
    stack.service(env={"SPICE_STREAMD_MAX_SESSIONS_PER_UID": "1"})
    uid = stack.uid("spice-test-a")
    stack.helper("spice-test-a", "a", ":42")
    wait_until(lambda: stack.prop("Sessions") == [(2, uid, ":42")], what="first session")
    xa = stack.files.xauthority("spice-test-a", ":44")
    result = stack.register("spice-test-a", "a4", ":44", xa)
    assert result[:2] == ["error", ERR + "LimitReached"]
    assert "limit 1" in result[2]


def test_flood_from_one_caller_does_not_stall_another(stack):
    svc = stack.service()
    flooder = stack.client("spice-test-b", "b")
    other = stack.client("spice-test-a", "a")
    xa_b = stack.files.xauthority("spice-test-b", ":43")
    xa_a = stack.files.xauthority("spice-test-a", ":42")
    rss_before = rss_kib(svc.proc.pid)
    flooder.proc.stdin.write(json.dumps({"op": "register", "calls": [[":43", xa_b]] * 200}) + "\n")
    flooder.proc.stdin.flush()
    t0 = time.monotonic()
    result = other.send({"op": "register", "calls": [[":42", xa_a]]})[0]
    elapsed = time.monotonic() - t0
    assert result[:2] == ["ok", 2]
    assert elapsed < 5.0, f"the other caller waited {elapsed:.1f} s"
    line = flooder.proc.stdout.readline()
    assert line, flooder.proc.stderr.read()
    flood = json.loads(line)
    names = [r[1] for r in flood]
    assert len(flood) == 200
    # The bus daemon itself refuses beyond 128 pending calls per connection (LimitsExceeded).
    assert names.count(ERR + "LimitReached") >= 50
    assert set(names) <= {ERR + "LimitReached", ERR + "PermissionDenied",
                          "org.freedesktop.DBus.Error.LimitsExceeded"}
    assert names.count(ERR + "PermissionDenied") <= 10
    assert rss_kib(svc.proc.pid) - rss_before < 20 * 1024
    refusals = [line for line in svc.log.splitlines() if "refused" in line]
    assert len(refusals) < 10, "refusal logging is not rate-limited"


# Run as a test user: `n` connections, `per` RegisterSession calls on each, all at once; prints
# the error names (or "ok") once every call has its answer.
FLOOD_SCRIPT = r'''
import asyncio, json, sys
from dbus_next import Message, MessageType
from dbus_next.aio import MessageBus
from spice_stream_common import dbusnext_compat


async def main():
    dbusnext_compat.install()
    address, n, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    buses = [await MessageBus(bus_address=address).connect() for _ in range(n)]

    async def call(bus):
        reply = await bus.call(Message(
            destination="org.spice_space.StreamingAgent1", path="/org/spice_space/StreamingAgent1",
            interface="org.spice_space.StreamingAgent1", member="RegisterSession", signature="ss",
            body=[":43", "/nonexistent"]))
        return reply.error_name if reply.message_type == MessageType.ERROR else "ok"

    print(json.dumps(await asyncio.gather(*[call(b) for b in buses for _ in range(per)])), flush=True)

asyncio.run(main())
'''


def test_one_uids_flood_never_refuses_another_uid(stack):
    """spice-test-b keeps 40 calls in flight from 20 connections; spice-test-a still registers,
    while b's calls are waiting to be identified and again once b is at its share.

    The endpoint is the real one on the policy bus, with the bus daemon's credentials; b's calls
    are held where a continuous flood piles them up (between arrival and identification), and in
    verification (a polkit that takes its time for b), so that what is in flight is certain."""
    import asyncio
    import pwd
    import subprocess
    import sys
    from collections import Counter

    from spice_streamd import errors
    from spice_streamd.caller import credentials_of
    from spice_streamd.dbus_service import RegistrationEndpoint
    from spice_streamd.sessions import Registration, SessionRegistry
    from tests.conftest import connect
    from tests.support.waiting import wait_async

    b = stack.uid("spice-test-b")
    xa = stack.files.xauthority("spice-test-a", ":42")

    async def run():
        loop = asyncio.get_running_loop()
        identify_b, verify_b = asyncio.Event(), asyncio.Event()
        seen: list[str] = []
        verifying: Counter[int] = Counter()

        async def credentials(bus, sender):
            caller = await credentials_of(bus, sender)
            if caller.uid == b:
                await identify_b.wait()
            return caller

        class Verifier:
            async def verify(self, caller, display, xauthority):
                verifying[caller.uid] += 1
                if caller.uid == b:
                    await verify_b.wait()
                    raise errors.PermissionDenied("not b")
                return Registration(sender=caller.sender, uid=caller.uid, gid=caller.gid,
                                    groups=(), pid=caller.pid, session_id="a", vt=2,
                                    display=display, xauthority=xauthority)

        def count(msg):
            if msg.member == "RegisterSession":
                seen.append(msg.sender)
            return False

        service_bus = await connect(stack.bus.address)
        service_bus.add_message_handler(count)
        endpoint = RegistrationEndpoint(service_bus, Verifier(), SessionRegistry(),
                                        credentials=credentials)
        await endpoint.start()
        await service_bus.request_name(BUS_NAME)
        pw = pwd.getpwnam("spice-test-b")
        flood = subprocess.Popen(
            [sys.executable, "-c", FLOOD_SCRIPT, stack.bus.address, "20", "2"], user=pw.pw_uid,
            group=pw.pw_gid, extra_groups=[], cwd="/", stdout=subprocess.PIPE, text=True,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})

        def register_a():
            return stack.register("spice-test-a", None, ":42", xa)

        try:
            await wait_async(lambda: len(seen) == 40, timeout=20, what="b's 40 calls in flight")
            assert (await loop.run_in_executor(None, register_a))[:2] == ["ok", 2]
            identify_b.set()
            await wait_async(lambda: verifying[b] == 4 and endpoint.in_flight == 4,
                             what="b at its share, its other calls refused")
            assert (await loop.run_in_executor(None, register_a))[:2] == ["ok", 2]
            verify_b.set()
            out, _ = await loop.run_in_executor(None, lambda: flood.communicate(timeout=30))
        finally:
            identify_b.set()
            verify_b.set()
            if flood.poll() is None:
                flood.kill()
                flood.wait()
            await endpoint.close()
            service_bus.disconnect()
        names = json.loads(out)
        assert names.count(ERR + "LimitReached") == 36 and names.count(ERR + "PermissionDenied") == 4
        assert verifying[stack.uid("spice-test-a")] == 2

    asyncio.run(run())


def test_helper_tries_again_after_limit_reached_and_registers(stack):
    stack.service(env={"SPICE_STREAMD_MAX_SESSIONS_PER_UID": "1"})
    uid = stack.uid("spice-test-a")
    holder = stack.client("spice-test-a", "a4")
    xa4 = stack.files.xauthority("spice-test-a", ":44")
    assert holder.send({"op": "register", "calls": [[":44", xa4]], "stay": True})[0][:2] == ["ok", 4]
    h = stack.helper("spice-test-a", "a", ":42")
    wait_until(lambda: "LimitReached" in h.output, what="the helper refused for now")
    assert "trying again" in h.output and h.proc.poll() is None
    holder.stop()
    wait_until(lambda: stack.prop("Sessions") == [(2, uid, ":42")], timeout=15,
               what="the helper registered on a later try")
    assert h.proc.poll() is None


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def test_helper_reregisters_with_a_restarted_service(stack):
    svc = stack.service()
    uid = stack.uid("spice-test-a")
    h = stack.helper("spice-test-a", "a", ":42")
    wait_until(lambda: stack.prop("Sessions") == [(2, uid, ":42")], what="registration")
    svc.proc.send_signal(signal.SIGKILL)
    svc.proc.wait(5)
    stack.service()
    wait_until(lambda: stack.prop("Sessions") == [(2, uid, ":42")], timeout=15,
               what="the helper registering with the new service")
    assert h.proc.poll() is None


def test_helper_refused_by_polkit_waits_for_its_session_to_become_active(stack):
    """polkit refuses spice-test-b here (no rule for it, session in the background): the helper
    says so and waits for its logind session to become the active one, rather than exit."""
    stack.service()
    h = stack.helper("spice-test-b", "b", ":43")
    wait_until(lambda: "becomes the active one" in h.output, what="the helper's refusal line")
    assert "PermissionDenied" in h.output and h.proc.poll() is None


def test_helper_prints_a_final_refusal_and_exits_nonzero(stack):
    stack.service()
    h = stack.helper("spice-test-a", "a", ":43", xauthority="/nonexistent/Xauthority")
    assert h.wait() != 0
    assert "InvalidArgument" in h.output


def test_helper_exits_zero_on_sigterm(stack):
    stack.service()
    h = stack.helper("spice-test-a", "a", ":42")
    wait_until(lambda: "registered" in h.output, what="registration")
    h.proc.send_signal(signal.SIGTERM)
    assert h.wait() == 0


def test_introspection_shows_the_contract(stack):
    stack.service()
    out = stack.bus.busctl("introspect", BUS_NAME, PATH, user="spice-test-b")
    assert out.returncode == 0, out.stderr
    shown = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if parts and parts[0].startswith("."):
            shown[parts[0][1:]] = (parts[1], parts[2])
    doc = ET.parse(REPO / "dbus" / "org.spice_space.StreamingAgent1.xml").getroot()
    iface = doc.find("interface[@name='org.spice_space.StreamingAgent1']")
    for prop in iface.findall("property"):
        assert shown[prop.get("name")] == ("property", prop.get("type")), prop.get("name")
    assert shown["RegisterSession"] == ("method", "ss")
    assert {p.get("name") for p in iface.findall("property")} >= {
        "ActiveVT", "Sessions", "Streaming", "StreamingVT", "DevicePresent", "WorkerState"}


def test_policy_denies_unknown_method_and_other_interfaces(stack):
    stack.service()
    for user in ("spice-test-a", None):  # None: root is no exception
        out = stack.bus.busctl("call", BUS_NAME, PATH, "org.spice_space.StreamingAgent1",
                               "Shutdown", user=user)
        assert out.returncode != 0 and "denied" in out.stderr.lower(), out.stderr
        out = stack.bus.busctl("call", BUS_NAME, PATH, "org.freedesktop.DBus.Properties", "Set",
                               "ssv", "org.spice_space.StreamingAgent1", "ActiveVT", "u", "5",
                               user=user)
        assert out.returncode != 0 and "denied" in out.stderr.lower(), out.stderr
    out = stack.bus.busctl("get-property", BUS_NAME, PATH, "org.spice_space.StreamingAgent1",
                           "ActiveVT", user="spice-test-b")
    assert out.returncode == 0 and out.stdout.strip() == "u 2", out.stderr


def test_policy_lets_only_root_own_the_name(stack):
    c = stack.client("spice-test-a", None)
    result = c.send({"op": "own", "name": BUS_NAME})[0]
    assert result[:2] == ["error", "org.freedesktop.DBus.Error.AccessDenied"]
    svc = stack.service()  # root may
    assert svc.proc.poll() is None


def test_second_service_instance_refuses_to_start(stack):
    stack.service()
    second = stack.service(ready=False)
    assert second.proc.wait(15) == 1
    assert "already owned" in second.log


def test_idle_service_exits(stack):
    # No session and no device: the service leaves after idle_exit seconds (bus activation
    # brings it back on the next call).
    svc = stack.service(env={"SPICE_STREAMD_IDLE_EXIT": "1"})
    assert svc.proc.wait(10) == 0
    assert "idle for 1 s" in svc.log


def test_registered_session_keeps_service_alive(stack):
    svc = stack.service(env={"SPICE_STREAMD_IDLE_EXIT": "3"})
    uid = stack.uid("spice-test-a")
    stack.helper("spice-test-a", "a", ":42")
    wait_until(lambda: stack.prop("Sessions") == [(2, uid, ":42")], what="registration")
    time.sleep(4.5)  # longer than idle_exit: the service must still be there
    assert svc.proc.poll() is None


def test_active_vt_and_sessions_changes_are_signalled(stack):
    """ActiveVT's value is signalled; Sessions is named as invalidated (its value depends on who
    reads it) and root reads the new value with Get."""
    import asyncio

    from dbus_next import Message

    from tests.conftest import connect
    from tests.support.waiting import wait_async

    stack.service()

    async def run():
        bus = await connect(stack.bus.address)
        changes: list[dict] = []
        invalidated: list[list[str]] = []

        def on_message(msg):
            if (msg.member == "PropertiesChanged" and msg.path == PATH
                    and msg.body[0] == "org.spice_space.StreamingAgent1"):
                changes.append({k: v.value for k, v in msg.body[1].items()})
                invalidated.append(list(msg.body[2]))

        bus.add_message_handler(on_message)
        await bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="AddMatch", signature="s",
            body=[f"type='signal',path='{PATH}',interface='org.freedesktop.DBus.Properties'"]))
        loop = asyncio.get_running_loop()
        try:
            stack.logind.activate("a4")
            await wait_async(lambda: any(c.get("ActiveVT") == 4 for c in changes), what="ActiveVT 4")
            seen = len(invalidated)
            h = stack.helper("spice-test-a", "a4", ":44")
            uid = stack.uid("spice-test-a")
            await wait_async(lambda: any("Sessions" in i for i in invalidated[seen:]),
                             what="Sessions invalidated")
            assert await loop.run_in_executor(None, stack.prop, "Sessions") == [(4, uid, ":44")]
            seen = len(invalidated)
            h.stop()
            await wait_async(lambda: any("Sessions" in i for i in invalidated[seen:]),
                             what="session gone, invalidated")
            assert await loop.run_in_executor(None, stack.prop, "Sessions") == []
        finally:
            stack.logind.activate("a")
            bus.disconnect()
        # Counters are read on demand, never signalled; per-user values never travel in a signal.
        assert not any("WorkerStats" in c or "WorkerStats" in i
                       for c, i in zip(changes, invalidated, strict=True))
        assert not any(k in c for c in changes for k in ("Sessions", "WorkerPID", "LastError"))

    asyncio.run(run())


def test_a_refused_call_is_freed_by_its_reply_without_the_garbage_collector(stack):
    """With the collector off, each refused RegisterSession's message is gone once its reply is
    out: nothing in the refusal path (dbus-next's reader, the endpoint, the verifier, polkit,
    logind, the exception's traceback) keeps it in a reference cycle. One kind per call:
    bad signature, oversized argument, a display the verifier refuses, polkit no, no session,
    the per-connection limit and an unexpected exception (Failed). Callers are real processes
    under the test users; the service's parts are the real ones, in this process."""
    import asyncio

    from spice_streamd.verifier import RegistrationVerifier
    from tests.support.refusals import refused_calls_alive

    xa = stack.files.xauthority("spice-test-a", ":42")
    xa_b = stack.files.xauthority("spice-test-b", ":43")
    # (user, logind session, calls on one connection, the error names expected)
    kinds = {
        "bad signature": ("spice-test-a", "a", "s", ["InvalidArgument"]),
        "oversized": ("spice-test-a", "a", [[":" + "4" * 100_000, xa]], ["InvalidArgument"]),
        "bad display": ("spice-test-a", "a", [["host:42", xa]], ["InvalidArgument"]),
        "polkit no": ("spice-test-b", "b", [[":43", xa_b]], ["PermissionDenied"]),
        "no session": ("spice-test-a", None, [[":42", xa]], ["NotInSession"]),
        "per-connection limit": ("spice-test-b", "b", [[":43", xa_b]] * 3,
                                 ["PermissionDenied", "PermissionDenied", "LimitReached"]),
        "unexpected": ("spice-test-a", "a", [[":66", xa]], ["Failed"]),
    }

    class Verifier(RegistrationVerifier):
        async def verify(self, caller, display, xauthority):
            if display == ":66":
                raise RuntimeError("a bug")
            return await super().verify(caller, display, xauthority)

    def case(kind, user, session, body, expected):
        def send() -> int:
            client = stack.client(user, session)
            request = {"op": "register", "calls": body} if body != "s" else {
                "op": "call", "call": [BUS_NAME, PATH, BUS_NAME, "RegisterSession", "s", [":42"]]}
            results = client.send(request)
            client.stop()
            assert sorted(r[1] for r in results) == sorted(ERR + e for e in expected), \
                (kind, results)
            return len(results)
        return kind, send

    leaks = asyncio.run(refused_calls_alive(stack.bus.address, "RegisterSession", Verifier,
                                            [case(k, *v) for k, v in kinds.items()]))
    assert leaks == {}, "refused calls still in memory after their reply"


# Run as uid 65534: `n` connections, each sending `per` RegisterSession calls one after the other,
# each with two strings of `size` characters; prints the error names once all are answered.
LARGE_FLOOD_SCRIPT = r'''
import asyncio, json, sys
from dbus_next import Message, MessageType
from dbus_next.aio import MessageBus
from spice_stream_common import dbusnext_compat


async def main():
    dbusnext_compat.install()
    address, n, per, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    body = [":" + "4" * (size - 1), "/" + "x" * (size - 1)]

    async def flood(bus):
        names = []
        for _ in range(per):
            reply = await bus.call(Message(
                destination="org.spice_space.StreamingAgent1",
                path="/org/spice_space/StreamingAgent1",
                interface="org.spice_space.StreamingAgent1", member="RegisterSession",
                signature="ss", body=body))
            names.append(reply.error_name if reply.message_type == MessageType.ERROR else "ok")
        return names

    buses = [await MessageBus(bus_address=address).connect() for _ in range(n)]
    results = await asyncio.gather(*[flood(b) for b in buses])
    print(json.dumps([name for names in results for name in names]), flush=True)

asyncio.run(main())
'''


def vm_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1))


def test_a_flood_of_large_refused_calls_keeps_the_service_small(stack):
    """Any local user (uid 65534, no session, no polkit rule) sends RegisterSession calls whose
    two strings make 24 MiB (the bus admits up to its 32 MiB message size), all refused. The real
    service, its garbage collector left alone, must stay within what one such message can cost
    while it is read (raw bytes, the decoded strings, the read's chunk: about 3 x 24 MiB) above
    its resting size: it frees each call with its reply, and refuses an argument longer than any
    display or path before any work."""
    import subprocess
    import sys

    svc = stack.service()
    pid = svc.proc.pid
    rest = vm_kib(pid, "VmRSS")
    size = 12 * 1024 * 1024
    flood = subprocess.Popen(
        [sys.executable, "-c", LARGE_FLOOD_SCRIPT, stack.bus.address, "4", "8", str(size)],
        user=65534, group=65534, extra_groups=[], cwd="/", stdout=subprocess.PIPE, text=True,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    try:
        out, _ = flood.communicate(timeout=120)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait()
    names = json.loads(out)
    peak = vm_kib(pid, "VmHWM")
    after = vm_kib(pid, "VmRSS")
    print(f"service RSS at rest {rest // 1024} MiB, peak {peak // 1024} MiB, "
          f"after {after // 1024} MiB; {len(names)} calls of 24 MiB")
    assert len(names) == 32 and set(names) <= {ERR + "InvalidArgument", ERR + "LimitReached",
                                                ERR + "PermissionDenied", ERR + "NotInSession"}
    assert peak - rest < 3 * 24 * 1024 + 16 * 1024, f"peak {peak} KiB from {rest} KiB at rest"
    # glibc may keep about one message's worth once freed (its mmap threshold follows the largest
    # block freed, up to 32 MiB); the refused calls themselves must be gone.
    assert after - rest < 32 * 1024, f"{after} KiB after the flood, {rest} KiB at rest"
    assert svc.proc.poll() is None


# Run as a test user: prints "ready" once subscribed, then one JSON line per PropertiesChanged of
# our interface: {"changed": {name: value}, "invalidated": [names]}.
LISTEN_SCRIPT = r'''
import asyncio, json, sys
from dbus_next import Message
from dbus_next.aio import MessageBus


async def main():
    bus = await MessageBus(bus_address=sys.argv[1]).connect()

    def on_message(msg):
        if msg.member == "PropertiesChanged" and msg.path == "/org/spice_space/StreamingAgent1":
            print(json.dumps({"changed": {k: v.value for k, v in msg.body[1].items()},
                              "invalidated": msg.body[2]}, default=repr), flush=True)

    bus.add_message_handler(on_message)
    await bus.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="AddMatch", signature="s",
        body=["type='signal',path='/org/spice_space/StreamingAgent1',"
              "interface='org.freedesktop.DBus.Properties',member='PropertiesChanged'"]))
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
'''


class Listener:
    """LISTEN_SCRIPT as `user`: what a local user receives of our PropertiesChanged signals."""

    def __init__(self, address: str, user: str) -> None:
        import pwd
        import subprocess
        import sys
        import threading

        pw = pwd.getpwnam(user)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LISTEN_SCRIPT, address], user=pw.pw_uid, group=pw.pw_gid,
            extra_groups=[], cwd="/", stdout=subprocess.PIPE, text=True,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()
        wait_until(lambda: "ready\n" in self.lines, what=f"{user}'s listener subscribed")

    @property
    def signals(self) -> list[dict]:
        return [json.loads(line) for line in list(self.lines) if line != "ready\n"]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def read_all(stack, user: str | None) -> dict:
    """GetAll through the bus as `user` (None: root), with busctl: the values as JSON."""
    out = stack.bus.busctl("--json=short", "call", BUS_NAME, PATH,
                           "org.freedesktop.DBus.Properties", "GetAll", "s", BUS_NAME, user=user)
    assert out.returncode == 0, out.stderr
    values = {k: v["data"] for k, v in json.loads(out.stdout)["data"][0].items()}
    values["WorkerStats"] = {k: v["data"] for k, v in values["WorkerStats"].items()}
    return values


def read_one(stack, user: str | None, name: str):
    out = stack.bus.busctl("--json=short", "get-property", BUS_NAME, PATH, BUS_NAME, name,
                           user=user)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["data"]


def test_a_registration_is_visible_to_root_and_its_user_not_to_others(stack):
    """User A registers. Root and A read A's entry in Sessions; B and nobody (uid 65534) read an
    empty list, with Get and with GetAll; B's PropertiesChanged signal names Sessions as
    invalidated and carries no value of it."""
    stack.service()
    a = stack.uid("spice-test-a")
    listener = Listener(stack.bus.address, "spice-test-b")
    try:
        stack.helper("spice-test-a", "a", ":42")
        wait_until(lambda: stack.prop("Sessions") == [(2, a, ":42")], what="A registered")
        assert read_one(stack, None, "Sessions") == [[2, a, ":42"]]
        assert read_one(stack, "spice-test-a", "Sessions") == [[2, a, ":42"]]
        assert read_one(stack, "spice-test-b", "Sessions") == []
        assert read_one(stack, "nobody", "Sessions") == []
        assert read_all(stack, "spice-test-b")["Sessions"] == []
        assert read_all(stack, "spice-test-a")["Sessions"] == [[2, a, ":42"]]
        # The public ones stay public.
        assert read_all(stack, "nobody")["ActiveVT"] == 2
        wait_until(lambda: any("Sessions" in s["invalidated"] for s in listener.signals),
                   what="B told that Sessions changed")
    finally:
        listener.stop()
    for signal_seen in listener.signals:
        assert not {"Sessions", "WorkerPID", "LastError"} & set(signal_seen["changed"]), signal_seen


def test_worker_details_are_shown_only_to_the_workers_user(stack):
    """WorkerPID, WorkerStats and LastError of A's worker: root and A read them, B reads 0, zeros
    and "". During a switch to B (the old worker still relayed, the target already B's), A still
    reads the worker's pid and B reads the LastError of its own start. Signals caught by B carry
    none of them. The real PropertyReader on the policy bus, callers under their own uids."""
    import asyncio

    from spice_streamd.dbus_service import StreamingAgentInterface
    from spice_streamd.propertyreader import PropertyReader
    from spice_streamd.readaccess import Owners
    from tests.conftest import connect

    a, b = stack.uid("spice-test-a"), stack.uid("spice-test-b")
    values = {"ActiveVT": 2, "Sessions": [[2, a, ":42"], [3, b, ":43"]], "DevicePresent": True,
              "WorkerState": "running", "WorkerPID": 4242, "Streaming": True, "StreamingVT": 2,
              "LastError": "", "WorkerStats": {"frames": 10, "bytes": 1000, "fps": 30.0,
                                               "restarts": 1}}
    owners = [Owners(worker=a, target=a)]
    zeros = {"frames": 0, "bytes": 0, "fps": 0.0, "restarts": 0}

    async def run():
        loop = asyncio.get_running_loop()

        def read(user):
            return loop.run_in_executor(None, read_all, stack, user)

        bus = await connect(stack.bus.address)
        iface = StreamingAgentInterface(lambda: values, owners=lambda: owners[0])
        bus.export(PATH, iface)
        reader = PropertyReader(bus, iface)
        await reader.start()
        await bus.request_name(BUS_NAME)
        iface.refresh()
        listener = await loop.run_in_executor(None, Listener, stack.bus.address, "spice-test-b")
        try:
            values.update(WorkerPID=4343, LastError="the worker's last words")
            iface.refresh()
            seen_root, seen_a, seen_b = await read(None), await read("spice-test-a"), \
                await read("spice-test-b")
            assert seen_root == values
            assert (seen_a["WorkerPID"], seen_a["LastError"], seen_a["WorkerStats"],
                    seen_a["Sessions"]) == (4343, "the worker's last words",
                                            values["WorkerStats"], [[2, a, ":42"]])
            assert (seen_b["WorkerPID"], seen_b["LastError"], seen_b["WorkerStats"],
                    seen_b["Sessions"]) == (0, "", zeros, [[3, b, ":43"]])
            assert (seen_b["WorkerState"], seen_b["Streaming"], seen_b["StreamingVT"]) == \
                ("running", True, 2)
            owners[0] = Owners(worker=a, target=b)
            values.update(LastError="B's worker cannot start")
            iface.refresh()
            seen_a, seen_b = await read("spice-test-a"), await read("spice-test-b")
            assert (seen_a["WorkerPID"], seen_a["LastError"]) == (4343, "")
            assert (seen_b["WorkerPID"], seen_b["LastError"], seen_b["WorkerStats"]) == \
                (0, "B's worker cannot start", zeros)
            await loop.run_in_executor(None, lambda: wait_until(
                lambda: sum("LastError" in s["invalidated"] for s in listener.signals) == 2,
                what="B told twice that LastError changed"))
        finally:
            listener.stop()
            await reader.close()
            bus.disconnect()
        for signal_seen in listener.signals:
            assert not {"Sessions", "WorkerPID", "LastError", "WorkerStats"} & \
                set(signal_seen["changed"]), signal_seen
        assert any("WorkerPID" in s["invalidated"] for s in listener.signals)

    asyncio.run(run())


def test_the_real_workers_pid_is_shown_to_its_user_only(stack):
    """The service with a real worker of A (a pty as the port, an Xvfb of A's): root and A read
    its pid, B and nobody read 0; A's WorkerStats are A's to read."""
    from tests.support.hostpeer import RawPty
    from tests.support.xserver import start_xvfb

    a = stack.uid("spice-test-a")
    port = RawPty()
    xa = start_xvfb(320, 240, owner_uid=a, server_uid=a)
    try:
        stack.service(device=port.path)
        stack.helper("spice-test-a", "a", display=xa.display, xauthority=xa.xauthority)
        pid = wait_until(lambda: stack.prop("WorkerPID"), timeout=20, what="A's worker")
        with open(f"/proc/{pid}/status") as f:
            assert re.search(rf"\nUid:\s+{a}\s", f.read())
        assert read_one(stack, "spice-test-a", "WorkerPID") == pid
        assert read_one(stack, "spice-test-b", "WorkerPID") == 0
        assert read_one(stack, "nobody", "WorkerPID") == 0
        assert read_all(stack, "spice-test-b")["WorkerStats"] == {
            "frames": 0, "bytes": 0, "fps": 0.0, "restarts": 0}
        assert read_all(stack, None)["WorkerPID"] == pid
    finally:
        stack.end_test()
        xa.stop()
        port.close()
