"""The bus boundary never hands a caller a Python traceback: an unexpected failure is logged once and
becomes the generic named error."""

from __future__ import annotations

import asyncio
import logging

from dbus_next import Message, MessageType

from spice_stream_common import constants
from spice_streamd import errors
from spice_streamd.dbus_service import RegistrationEndpoint
from spice_streamd.sessions import SessionRegistry
from tests.conftest import connect
from tests.support.waiting import wait_async


class BrokenVerifier:
    def __init__(self) -> None:
        self.calls = 0

    async def verify(self, caller, display, xauthority):
        self.calls += 1
        raise RuntimeError("a bug deep inside the verification")


def test_unexpected_exception_becomes_the_generic_error(bus, caplog):
    async def run():
        service_bus = await connect(bus.address)
        caller_bus = await connect(bus.address)
        verifier = BrokenVerifier()
        endpoint = RegistrationEndpoint(service_bus, verifier, SessionRegistry())
        await endpoint.start()
        try:
            replies = []
            for _ in range(3):
                replies.append(await caller_bus.call(Message(
                    destination=service_bus.unique_name, path=constants.OBJECT_PATH,
                    interface=constants.INTERFACE, member="RegisterSession", signature="ss",
                    body=[":0", "/nonexistent"])))
            return verifier.calls, replies
        finally:
            await endpoint.close()
            service_bus.disconnect()
            caller_bus.disconnect()

    with caplog.at_level(logging.ERROR):
        calls, replies = asyncio.run(run())
    assert calls == 3
    for reply in replies:
        assert reply.message_type == MessageType.ERROR
        assert reply.error_name == errors.GENERIC_ERROR
        assert "Traceback" not in reply.body[0] and "RuntimeError" not in reply.body[0]
        assert "see its log" in reply.body[0]
    # Logged with its traceback once, not once per call.
    assert caplog.text.count("Traceback") == 1 and caplog.text.count("failed unexpectedly") == 1


def test_callers_signatures_do_not_grow_the_service(bus):
    """dbus-next caches every signature it parses, forever, and callers choose them (a call's own
    and each variant's): 2000 calls with as many signatures must not leave 2000 cached."""
    from dbus_next.signature import SignatureTree

    from spice_stream_common import dbusnext_compat

    dbusnext_compat.install()

    def signature(n: int) -> str:
        return "s" + "".join("ub"[int(c)] for c in format(n, "b"))

    async def run():
        service_bus = await connect(bus.address)
        caller_bus = await connect(bus.address)
        endpoint = RegistrationEndpoint(service_bus, BrokenVerifier(), SessionRegistry())
        await endpoint.start()
        try:
            for n in range(1, 2001):
                sig = signature(n)
                body = [":0"] + [1 if c == "u" else True for c in sig[1:]]
                reply = await caller_bus.call(Message(
                    destination=service_bus.unique_name, path=constants.OBJECT_PATH,
                    interface=constants.INTERFACE, member="RegisterSession", signature=sig,
                    body=body))
                assert reply.error_name == errors.InvalidArgument.dbus_name
        finally:
            await endpoint.close()
            service_bus.disconnect()
            caller_bus.disconnect()

    asyncio.run(run())
    cached = set(SignatureTree._cache) | set(getattr(dbusnext_compat, "_signature_cache", ()))
    kept = sum(signature(n) in cached for n in range(1, 2001))
    assert kept <= 512, f"{kept} of the callers' signatures cached"


def test_property_reads_wait_for_the_callers_uid_within_bounds(bus):
    """While the bus daemon has not said who a connection is, its reads wait, at most 8 of them:
    the 9th is refused with LimitReached. Once known, its uid is kept while it is connected (one
    question per connection) and dropped when it leaves. Another interface's Get is answered with
    the standard errors, the caller's text bounded, and so is a property no one has, at once."""
    from dbus_next import Variant

    from spice_streamd.dbus_service import StreamingAgentInterface
    from spice_streamd.propertyreader import PropertyReader

    async def run():
        service_bus = await connect(bus.address)
        caller_bus = await connect(bus.address)
        asked: list[str] = []
        answer = asyncio.Event()

        async def uid_of(_bus, sender):
            asked.append(sender)
            await answer.wait()
            return 1000

        values = {"ActiveVT": 2, "Sessions": [[2, 1000, ":42"], [3, 1001, ":43"]]}
        iface = StreamingAgentInterface(lambda: values)
        service_bus.export(constants.OBJECT_PATH, iface)
        reader = PropertyReader(service_bus, iface, uid_of=uid_of)
        await reader.start()

        def get(interface, name):
            return caller_bus.call(Message(
                destination=service_bus.unique_name, path=constants.OBJECT_PATH,
                interface="org.freedesktop.DBus.Properties", member="Get", signature="ss",
                body=[interface, name]))

        try:
            calls = [asyncio.ensure_future(get(constants.INTERFACE, "Sessions")) for _ in range(9)]
            done, _ = await asyncio.wait(calls, timeout=5, return_when=asyncio.FIRST_COMPLETED)
            assert [t.result().error_name for t in done] == [errors.LimitReached.dbus_name]
            answer.set()
            replies = [await c for c in calls if c not in done]
            assert [r.body[0] for r in replies] == [Variant("a(uus)", [[2, 1000, ":42"]])] * 8
            reply = await get(constants.INTERFACE, "ActiveVT")
            assert reply.body[0] == Variant("u", 2)
            reply = await get("x" * 100_000, "ActiveVT")
            assert reply.error_name == "org.freedesktop.DBus.Error.UnknownInterface"
            assert len(reply.body[0]) < 200
            assert asked == [caller_bus.unique_name]
            # A name no property has is answered without waiting for anyone's uid.
            other = await connect(bus.address)
            answer.clear()
            reply = await asyncio.wait_for(other.call(Message(
                destination=service_bus.unique_name, path=constants.OBJECT_PATH,
                interface="org.freedesktop.DBus.Properties", member="Get", signature="ss",
                body=[constants.INTERFACE, "y" * 100_000])), 5)
            other.disconnect()
            assert reply.error_name == "org.freedesktop.DBus.Error.UnknownProperty"
            assert len(reply.body[0]) < 200 and asked == [caller_bus.unique_name]
            answer.set()
            gone = caller_bus.unique_name
            caller_bus.disconnect()
            await wait_async(lambda: gone not in reader._uids, what="the uid dropped")
        finally:
            await reader.close()
            service_bus.disconnect()

    asyncio.run(run())
