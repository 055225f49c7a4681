"""Fixtures shared by several test files: private buses, the logind mock, the policy-bus stack."""

from __future__ import annotations

import pytest
from dbus_next import BusType
from dbus_next.aio import MessageBus

from tests.support.logind import LogindMock, PrivateBus


@pytest.fixture
def bus():
    """A permissive private system-type bus."""
    with PrivateBus() as b:
        yield b


@pytest.fixture
def logind(bus):
    with LogindMock(bus.address) as m:
        yield m


async def connect(address: str) -> MessageBus:
    return await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()


@pytest.fixture(scope="module")
def stack_module():
    """Policy bus + real polkitd + logind mock, shared by one module's tests (see support.bus.Stack)."""
    from tests.support.bus import Stack

    s = Stack()
    try:
        yield s
    finally:
        s.close()
