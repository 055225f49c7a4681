"""dbus-next as this project uses it: the bus named by a --bus option, and fixes for 0.2.3 gaps (a full
socket buffer on send must mean "wait", not "the bus is gone": a burst of replies could otherwise drop
the service's connection; every received message must be freed when its handling ends, not when the
garbage collector happens to run; a caller must not grow a cache without bound)."""

from __future__ import annotations

import array
import os
import socket
import traceback

from dbus_next import BusType, DBusError, Message, MessageFlag
from dbus_next._private.unmarshaller import Unmarshaller
from dbus_next.aio import MessageBus
from dbus_next.aio import message_bus as _aio
from dbus_next.constants import ErrorType
from dbus_next.message_bus import BaseMessageBus
from dbus_next.signature import SignatureTree

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


# dbus-next's Unmarshaller keeps a dict of its own bound methods: every Unmarshaller is a reference
# cycle, and it holds the raw message (up to the bus's 32 MiB limit) and the decoded one. One is made
# per received message, so each message lived until a garbage collection, which a flood of large
# calls, all refused, hardly triggers (few objects allocated): the service grew by hundreds of MB.
# The same readers by name, looked up on the class: no cycle, each message freed by refcounting.
_READERS = {
    "y": "read_byte", "b": "read_boolean", "n": "read_int16", "q": "read_uint16",
    "i": "read_int32", "u": "read_uint32", "x": "read_int64", "t": "read_uint64",
    "d": "read_double", "h": "read_uint32", "o": "read_string", "s": "read_string",
    "g": "read_signature", "a": "read_array", "(": "read_struct", "{": "read_dict_entry",
    "v": "read_variant",
}


def _unmarshaller_init(self, stream, sock=None) -> None:
    # Unmarshaller.__init__ of 0.2.3 without the `readers` dict.
    self.unix_fds = []
    self.buf = bytearray()
    self.offset = 0
    self.stream = stream
    self.sock = sock
    self.endian = None
    self.message = None


def _read_argument(self, type_):
    name = _READERS.get(type_.token)
    if name is None:
        raise Exception(f'dont know how to read yet: "{type_.token}"')
    return getattr(self, name)(type_)


class _SendReply:
    """BaseMessageBus._send_reply's per-call class, as one class: 0.2.3 defines a new class for every
    method call it answers (a class is always a reference cycle), whose closure holds the call, so
    each Introspect, Get or unknown call lived until a garbage collection. Same behaviour."""

    __slots__ = ("bus", "msg")

    def __init__(self, bus: BaseMessageBus, msg: Message) -> None:
        self.bus = bus
        self.msg = msg

    def __enter__(self) -> _SendReply:
        return self

    def __call__(self, reply: Message) -> None:
        if self.msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return
        self.bus.send(reply)

    def _exit(self, exc_type, exc_value, tb):
        if exc_type is None:
            return None
        if issubclass(exc_type, DBusError):
            self(exc_value._as_message(self.msg))
            return True
        if issubclass(exc_type, Exception):
            self(Message.new_error(
                self.msg, ErrorType.SERVICE_ERROR,
                f"The service interface raised an error: {exc_value}.\n"
                f"{traceback.format_tb(tb)}"))
            return True
        return None

    def __exit__(self, exc_type, exc_value, tb) -> None:
        # As in 0.2.3: the error is answered and the exception still propagates.
        self._exit(exc_type, exc_value, tb)

    def send_error(self, exc: BaseException) -> None:
        self._exit(exc.__class__, exc, exc.__traceback__)


def _send_reply(self, msg: Message) -> _SendReply:
    return _SendReply(self, msg)


# SignatureTree._get caches every signature it parses, forever; the signatures come from callers (a
# call's own, and every variant's), and a signature has up to 255 characters: any local user could
# grow the service's memory without bound, one message at a time. The cache keeps its first entries
# (the ones the service and its peers use, parsed at start) and parses any others each time.
SIGNATURE_CACHE_MAX = 512
_signature_cache: dict[str, SignatureTree] = {}


def _signature_get(signature: str = "") -> SignatureTree:
    tree = _signature_cache.get(signature)
    if tree is None:
        tree = SignatureTree(signature)
        if len(_signature_cache) < SIGNATURE_CACHE_MAX:
            _signature_cache[signature] = tree
    return tree


def install() -> None:
    """Idempotent; call before connecting."""
    global _installed
    if not _installed:
        _aio._MessageWriter.write_callback = _write_callback
        Unmarshaller.__init__ = _unmarshaller_init
        Unmarshaller.read_argument = _read_argument
        BaseMessageBus._send_reply = _send_reply
        _signature_cache.update(SignatureTree._cache)
        SignatureTree._get = staticmethod(_signature_get)
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
