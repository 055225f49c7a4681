"""dbus-next as this project uses it: the bus named by a --bus option, and a fix for a 0.2.3 gap (a full
socket buffer on send must mean "wait", not "the bus is gone": a burst of replies could otherwise drop
the service's connection)."""

from __future__ import annotations

import array
import os
import socket

from dbus_next import BusType
from dbus_next.aio import MessageBus
from dbus_next.aio import message_bus as _aio

_installed = False


def _write_callback(self) -> None:
    # Same contract as dbus-next's writer, except that a would-block send keeps the writer
    # registered with the loop, which calls us again once the socket is writable.
    try:
        while True:
            if self.buf is None:
                if self.messages.qsize() == 0:
                    self.loop.remove_writer(self.fd)
                    return
                buf, unix_fds, fut = self.messages.get_nowait()
                self.unix_fds = unix_fds
                self.buf = memoryview(buf)
                self.offset = 0
                self.fut = fut
            try:
                if self.unix_fds and self.negotiate_unix_fd:
                    fds = array.array("i", self.unix_fds)
                    sent = self.sock.sendmsg([self.buf[self.offset:]],
                                             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                    self.unix_fds = None
                else:
                    sent = self.sock.send(self.buf[self.offset:])
            except (BlockingIOError, InterruptedError):
                return
            self.offset += sent
            if self.offset < len(self.buf):
                return
            self.buf = None
            _aio._future_set_result(self.fut, None)
    except Exception as e:
        _aio._future_set_exception(self.fut, e)
        self.bus._finalize(e)


def install() -> None:
    """Idempotent; call before connecting."""
    global _installed
    if not _installed:
        _aio._MessageWriter.write_callback = _write_callback
        _installed = True


def bus_for(spec: str) -> MessageBus:
    """The bus a --bus option names: "system", "session", or a D-Bus address (a private bus).

    A service started by a system bus's activation connects back to that bus: the daemon says which
    in DBUS_STARTER_ADDRESS (the real system bus, or a private one in tests and demos)."""
    install()
    if spec == "system":
        starter = os.environ.get("DBUS_STARTER_ADDRESS")
        if starter and os.environ.get("DBUS_STARTER_BUS_TYPE") == "system":
            return MessageBus(bus_address=starter)
        return MessageBus(bus_type=BusType.SYSTEM)
    if spec == "session":
        return MessageBus(bus_type=BusType.SESSION)
    return MessageBus(bus_address=spec)


def describe_bus(spec: str) -> str:
    """The address a --bus option connects to, for a message a person reads."""
    if spec == "system":
        if os.environ.get("DBUS_STARTER_BUS_TYPE") == "system" and os.environ.get(
                "DBUS_STARTER_ADDRESS"):
            return os.environ["DBUS_STARTER_ADDRESS"]
        return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS",
                              "unix:path=/run/dbus/system_bus_socket (the system bus)")
    if spec == "session":
        return os.environ.get("DBUS_SESSION_BUS_ADDRESS", "(DBUS_SESSION_BUS_ADDRESS is not set)")
    return spec


async def disconnected(bus: MessageBus) -> BaseException | None:
    """Wait until the bus connection ends; the reason (EOFError when the bus went away), retrieved
    here so that asyncio never reports it as a "Task exception was never retrieved"."""
    try:
        await bus.wait_for_disconnect()
    except Exception as e:
        return e
    return None
