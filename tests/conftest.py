"""Fixtures shared by several test files: private buses, the logind mock, the policy-bus stack, a
pipe for a worker's device."""

from __future__ import annotations

import fcntl
import os

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


@pytest.fixture
def device():
    """A pipe for the device: (read end, write end), both non-blocking, room for a few frames."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)
