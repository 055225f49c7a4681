"""Properties Get and GetAll at our object path, answered with what the caller may read
(readaccess), the caller's uid from the bus daemon, bounded per caller."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from dbus_next import Message, MessageType
from dbus_next.aio import MessageBus

from spice_stream_common import constants
from spice_stream_common.untrusted import printable, shown

from . import errors
from .busendpoint import BusEndpoint, left_the_bus
from .caller import uid_of
from .dbus_service import PROPERTY_SIGNATURES, StreamingAgentInterface, on_the_wire

log = logging.getLogger(__name__)

PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"
_STANDARD_INTERFACES = (PROPERTIES_INTERFACE, "org.freedesktop.DBus.Introspectable",
                        "org.freedesktop.DBus.Peer")


class PropertyReader(BusEndpoint):
    """Answers org.freedesktop.DBus.Properties Get and GetAll at our object path with what the
    caller may read (visible_to), the caller's uid from the bus daemon, never from the call.

    A unique bus name is never reused, so its uid is asked once and kept while it is connected
    (at most `max_known` names); the calls of a name being asked about wait for that answer, at
    most `max_waiting_per_sender` of them, and at most `max_senders` names are asked about at
    once: beyond that a call is refused with LimitReached. polkit is not asked: reading needs no
    authorization, only the caller's uid."""

    def __init__(self, bus: MessageBus, interface: StreamingAgentInterface, *,
                 uid_of: Callable[[MessageBus, str], Awaitable[int]] = uid_of,
                 max_senders: int = 256, max_waiting_per_sender: int = 8,
                 max_known: int = 4096) -> None:
        super().__init__(bus, log)
        self._interface = interface
        self._uid_of = uid_of
        self._max_senders = max_senders
        self._max_waiting = max_waiting_per_sender
        self._max_known = max_known
        self._uids: dict[str, int] = {}
        self._waiting: dict[str, list[Message]] = {}

    def _on_message(self, msg: Message) -> bool:
        gone = left_the_bus(msg)
        if gone is not None:
            self._uids.pop(gone, None)
            return False
        if (msg.message_type != MessageType.METHOD_CALL or msg.path != constants.OBJECT_PATH
                or msg.interface != PROPERTIES_INTERFACE
                or (msg.member, msg.signature) not in (("Get", "ss"), ("GetAll", "s"))):
            return False  # dbus-next answers (Set is refused by the bus policy)
        if self._answer_without_uid(msg):
            return True
        sender = msg.sender or ""
        uid = self._uids.get(sender)
        if uid is not None:
            self._answer(msg, uid)
            return True
        waiting = self._waiting.get(sender)
        if waiting is not None:
            if len(waiting) >= self._max_waiting:
                self._refuse(msg, errors.LimitReached(
                    "too many property reads in progress from this connection"), sender)
            else:
                waiting.append(msg)
            return True
        if len(self._waiting) >= self._max_senders:
            self._refuse(msg, errors.LimitReached(
                "the service is busy with other callers; try again in a few seconds"), sender)
            return True
        self._waiting[sender] = [msg]
        self._spawn(self._identify(sender), name=f"property reader {sender}")
        return True

    async def _identify(self, sender: str) -> None:
        uid: int | None = None
        refusal: errors.ServiceError | None = None
        try:
            uid = await self._uid_of(self._bus, sender)
        except errors.ServiceError as e:
            # Without its traceback: that holds this frame, which holds the waiting calls.
            refusal = e.with_traceback(None)
        except asyncio.CancelledError:
            refusal = errors.ServiceError("the service is stopping")
            raise
        except Exception as e:
            self._log_unexpected("unexpected", e, "reading the uid of %s failed", sender)
            refusal = errors.ServiceError("the service failed unexpectedly; see its log")
        finally:
            waiting = self._waiting.pop(sender, [])
            if uid is not None:
                if len(self._uids) >= self._max_known:
                    del self._uids[next(iter(self._uids))]
                self._uids[sender] = uid
                for msg in waiting:
                    self._answer(msg, uid)
            else:
                for msg in waiting:
                    self._refuse(msg, refusal or errors.ServiceError("no answer"), sender)

    def _answer_without_uid(self, msg: Message) -> bool:
        """Answers a read whose answer is the same for everyone (another interface, a property
        that does not exist) at once, so that only well-formed reads wait for the caller's uid;
        False for those."""
        asked = msg.body[0]
        if asked in (constants.INTERFACE, ""):
            if msg.member == "Get" and msg.body[1] not in PROPERTY_SIGNATURES:
                self._send(Message.new_error(
                    msg, "org.freedesktop.DBus.Error.UnknownProperty",
                    f"{constants.INTERFACE} has no property {shown(msg.body[1], 60)}"))
                return True
            return False
        if asked in _STANDARD_INTERFACES and msg.member == "GetAll":
            self._send(Message.new_method_return(msg, "a{sv}", [{}]))
        elif asked in _STANDARD_INTERFACES:
            self._send(Message.new_error(
                msg, "org.freedesktop.DBus.Error.UnknownProperty",
                f"interface {shown(asked, 60)} has no property {shown(msg.body[1], 60)}"))
        else:
            self._send(Message.new_error(
                msg, "org.freedesktop.DBus.Error.UnknownInterface",
                f"no interface {shown(asked, 60)} at {constants.OBJECT_PATH}"))
        return True

    def _answer(self, msg: Message, uid: int) -> None:
        try:
            values = self._interface.view(uid)
        except Exception as e:
            self._log_unexpected("unexpected-read", e, "reading the properties failed")
            self._send(Message.new_error(msg, errors.GENERIC_ERROR,
                                         "the service failed unexpectedly; see its log"))
            return
        if msg.member == "GetAll":
            self._send(Message.new_method_return(
                msg, "a{sv}", [{k: on_the_wire(k, v) for k, v in values.items()}]))
        elif msg.body[1] in values:
            self._send(Message.new_method_return(msg, "v", [on_the_wire(msg.body[1],
                                                                        values[msg.body[1]])]))
        else:
            self._send(Message.new_error(
                msg, "org.freedesktop.DBus.Error.UnknownProperty",
                f"{constants.INTERFACE} has no property {shown(msg.body[1], 60)}"))

    def _refuse(self, msg: Message, exc: errors.ServiceError, sender: str) -> None:
        text = printable(str(exc)) or type(exc).__name__
        self._logs.log(logging.WARNING, (type(exc).__name__, "read"),
                       "property read from %s refused (%s): %s", sender, type(exc).__name__, text)
        self._send(Message.new_error(msg, exc.dbus_name, text))
