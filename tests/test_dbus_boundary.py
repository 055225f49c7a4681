"""The bus boundary never hands a caller a Python traceback: an unexpected failure is logged once and
becomes the generic named error."""

from __future__ import annotations

import asyncio
import logging

from dbus_next import Message, MessageType

from spice_streamd import constants, errors
from spice_streamd.dbus_service import RegistrationEndpoint
from spice_streamd.sessions import SessionRegistry
from tests.conftest import connect


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

    from spice_streamd import dbusnext_compat

    dbusnext_compat.install()

    async def run():
        service_bus = await connect(bus.address)
        caller_bus = await connect(bus.address)
        endpoint = RegistrationEndpoint(service_bus, BrokenVerifier(), SessionRegistry())
        await endpoint.start()
        try:
            for n in range(1, 2001):
                sig = "s" + "".join("ub"[int(c)] for c in format(n, "b"))
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
    assert len(cached) <= 512, f"{len(cached)} signatures cached"
