"""The D-Bus boundary: a thin adapter exporting the interface, answering RegisterSession and property
reads with the caller's bus identity, bounded per caller, with every error mapped to a named D-Bus
error."""

# No `from __future__ import annotations`: dbus-next reads the signature strings from annotations.

import asyncio
import logging
import traceback
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from dbus_next import Message, MessageType, Variant
from dbus_next import introspection as intr
from dbus_next.aio import MessageBus
from dbus_next.service import PropertyAccess, ServiceInterface, dbus_property, method

from . import constants, errors
from .caller import Caller, credentials_of, uid_of
from .ratelimit import LogLimiter, TokenBucket
from .sessions import SessionRegistry
from .untrusted import printable, shown
from .verifier import RegistrationVerifier

log = logging.getLogger(__name__)

# Property name -> D-Bus signature; the introspection XML documents each one.
PROPERTY_SIGNATURES = {
    "ActiveVT": "u",
    "Sessions": "a(uus)",
    "DevicePresent": "b",
    "WorkerState": "s",
    "WorkerPID": "u",
    "Streaming": "b",
    "StreamingVT": "u",
    "LastError": "s",
    "WorkerStats": "a{sv}",
}
# Counters change with every frame: readable on demand, never signalled (no bus traffic per frame).
UNSIGNALLED = {"WorkerStats"}
STATS_SIGNATURES = {"frames": "t", "bytes": "t", "fps": "d", "restarts": "u"}
NO_STATS = {"frames": 0, "bytes": 0, "fps": 0.0, "restarts": 0}

# Who may read what. Root (an administrator) reads every property. Anyone else reads the public
# ones (what explains "why is nothing streamed": ActiveVT, DevicePresent, WorkerState, Streaming,
# StreamingVT) and, of the others, only what is theirs: their own Sessions entries, and WorkerPID,
# WorkerStats (its rate is another user's typing rhythm) and LastError only of their own worker.
# PropertiesChanged is a broadcast every local user can receive: the per-user properties are only
# named in it (invalidated), never given; a reader then asks with Get, which knows who asks.
ROOT_UID = 0
PER_USER = ("Sessions", "WorkerPID", "LastError")
EMITS_CHANGED = {name: ("false" if name in UNSIGNALLED else
                        "invalidates" if name in PER_USER else "true")
                 for name in PROPERTY_SIGNATURES}
PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"
_STANDARD_INTERFACES = (PROPERTIES_INTERFACE, "org.freedesktop.DBus.Introspectable",
                        "org.freedesktop.DBus.Peer")


class Owners(NamedTuple):
    """Whose the worker's details are: uids, -1 for none."""

    worker: int  # the relayed worker's (WorkerPID, WorkerStats)
    target: int  # the session the worker is for (LastError: why it does not run)


NOBODY = Owners(-1, -1)


def owners_of(supervisor: Any) -> Owners:
    """The WorkerSupervisor's owners: during a switch the old worker is still relayed while the
    target (and its LastError) is already the next session's."""
    return Owners(worker=int(supervisor.worker_uid), target=int(supervisor.status.get("uid", -1)))


def visible_to(values: dict[str, Any], uid: int | None, owners: Owners) -> dict[str, Any]:
    """The properties as the caller `uid` may read them (None: a caller nobody identified)."""
    if uid == ROOT_UID:
        return values
    shown_values = dict(values)
    shown_values["Sessions"] = [s for s in values.get("Sessions", []) if s[1] == uid]
    if uid is None or owners.worker != uid:
        shown_values["WorkerPID"] = 0
        shown_values["WorkerStats"] = dict(NO_STATS)
    if uid is None or owners.target != uid:
        shown_values["LastError"] = ""
    return shown_values


def on_the_wire(name: str, value: Any) -> Variant:
    """A property's value as the Variant Get and GetAll return."""
    if name == "WorkerStats":
        value = {k: Variant(STATS_SIGNATURES[k], v) for k, v in value.items()}
    return Variant(PROPERTY_SIGNATURES[name], value)


class _AnnotatedProperty(intr.Property):
    """A property's introspection with its EmitsChangedSignal annotation (dbus-next has none)."""

    def to_xml(self) -> ET.Element:
        element = super().to_xml()
        ET.SubElement(element, "annotation", name="org.freedesktop.DBus.Property.EmitsChangedSignal",
                      value=EMITS_CHANGED[self.name])
        return element


class StreamingAgentInterface(ServiceInterface):
    """Declares the method and properties (introspection, PropertiesChanged); Get and GetAll are
    answered by PropertyReader, which knows the caller."""

    def __init__(self, properties: Callable[[], dict[str, Any]],
                 owners: Callable[[], Owners] = lambda: NOBODY) -> None:
        super().__init__(constants.INTERFACE)
        self._properties = properties
        self._owners = owners
        self._last: dict[str, Any] = {}

    def view(self, uid: int | None) -> dict[str, Any]:
        """Every property as the caller `uid` may read it."""
        return visible_to(self._properties(), uid, self._owners())

    def refresh(self) -> None:
        """Emits PropertiesChanged for the values that differ from the last ones seen: the public
        ones with their values, the per-user ones by name only."""
        new = {k: v for k, v in self._properties().items() if k not in UNSIGNALLED}
        changed = {k: v for k, v in new.items() if self._last.get(k) != v}
        self._last = new
        invalidated = [k for k in PER_USER if k in changed]
        for k in invalidated:
            del changed[k]
        if changed or invalidated:
            self.emit_properties_changed(changed, invalidated)

    def introspect(self) -> intr.Interface:
        iface = super().introspect()
        iface.properties = [_AnnotatedProperty(p.name, p.signature, p.access)
                            for p in iface.properties]
        return iface

    def _get(self, name: str) -> Any:
        # Reached only through dbus-next's own Properties handler, which does not say who asks
        # (PropertyReader answers first): what an unidentified caller may see.
        return self.view(None)[name]

    @method()
    def RegisterSession(self, display: 's', xauthority: 's') -> 'u':  # noqa: F821, N802
        # Never reached: RegistrationEndpoint answers first, because it needs the sender.
        raise errors.ServiceError("RegisterSession is handled elsewhere")

    @dbus_property(access=PropertyAccess.READ)
    def ActiveVT(self) -> 'u':  # noqa: F821, N802
        return self._get("ActiveVT")

    @dbus_property(access=PropertyAccess.READ)
    def Sessions(self) -> 'a(uus)':  # noqa: F821, F722, N802
        return self._get("Sessions")

    @dbus_property(access=PropertyAccess.READ)
    def DevicePresent(self) -> 'b':  # noqa: F821, N802
        return self._get("DevicePresent")

    @dbus_property(access=PropertyAccess.READ)
    def WorkerState(self) -> 's':  # noqa: F821, N802
        return self._get("WorkerState")

    @dbus_property(access=PropertyAccess.READ)
    def WorkerPID(self) -> 'u':  # noqa: F821, N802
        return self._get("WorkerPID")

    @dbus_property(access=PropertyAccess.READ)
    def Streaming(self) -> 'b':  # noqa: F821, N802
        return self._get("Streaming")

    @dbus_property(access=PropertyAccess.READ)
    def StreamingVT(self) -> 'u':  # noqa: F821, N802
        return self._get("StreamingVT")

    @dbus_property(access=PropertyAccess.READ)
    def LastError(self) -> 's':  # noqa: F821, N802
        return self._get("LastError")

    @dbus_property(access=PropertyAccess.READ)
    def WorkerStats(self) -> 'a{sv}':  # noqa: F821, F722, N802
        return on_the_wire("WorkerStats", self._get("WorkerStats")).value


class PropertyReader:
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
        self._bus = bus
        self._interface = interface
        self._uid_of = uid_of
        self._max_senders = max_senders
        self._max_waiting = max_waiting_per_sender
        self._max_known = max_known
        self._uids: dict[str, int] = {}
        self._waiting: dict[str, list[Message]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._logs = LogLimiter(log, interval=10.0)

    async def start(self) -> None:
        self._bus.add_message_handler(self._on_message)
        await _watch_name_owners(self._bus)

    async def close(self) -> None:
        self._bus.remove_message_handler(self._on_message)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type == MessageType.SIGNAL:
            if (msg.member == "NameOwnerChanged" and msg.sender == constants.DBUS_NAME
                    and msg.signature == "sss" and not msg.body[2]):
                self._uids.pop(msg.body[0], None)
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
        task = asyncio.get_running_loop().create_task(self._identify(sender),
                                                      name=f"property reader {sender}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
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
            if self._logs.log(logging.ERROR, "unexpected", "reading the uid of %s failed", sender):
                log.error("the unexpected error, once:\n%s",
                          "".join(traceback.format_exception(e)).rstrip())
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
            if self._logs.log(logging.ERROR, "unexpected-read", "reading the properties failed"):
                log.error("the unexpected error, once:\n%s",
                          "".join(traceback.format_exception(e)).rstrip())
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

    def _send(self, reply: Message) -> None:
        if reply.destination is None:
            return
        try:
            self._bus.send(reply)
        except Exception:  # the bus went away: nobody to answer
            log.debug("could not answer %s", reply.destination)


async def _watch_name_owners(bus: MessageBus) -> None:
    """NameOwnerChanged from the bus daemon reaches this connection's handlers."""
    rule = (f"type='signal',sender='{constants.DBUS_NAME}',path='{constants.DBUS_PATH}',"
            f"interface='{constants.DBUS_NAME}',member='NameOwnerChanged'")
    reply = await bus.call(Message(
        destination=constants.DBUS_NAME, path=constants.DBUS_PATH,
        interface=constants.DBUS_NAME, member="AddMatch", signature="s", body=[rule]))
    if reply is None or reply.message_type == MessageType.ERROR:
        raise RuntimeError(f"cannot watch NameOwnerChanged: {reply and reply.body}")


# A call's arguments are refused by size before anything else: a display is ":N" or ":N.S" (a
# handful of characters) and a path is at most PATH_MAX; the bus admits strings of up to its
# message size (32 MiB), which a task waiting on polkit and logind would otherwise hold.
MAX_DISPLAY_CHARS = 64
MAX_PATH_CHARS = 4095  # PATH_MAX (4096) less the terminating NUL


def _oversized(display: str, xauthority: str) -> errors.InvalidArgument | None:
    """The refusal of an argument longer than any real one (its length only: never a copy)."""
    if len(display) > MAX_DISPLAY_CHARS:
        return errors.InvalidArgument(
            f"display of {len(display)} characters is not a local X display: expected ':N' or "
            "':N.S' (e.g. ':0')")
    if len(xauthority) > MAX_PATH_CHARS:
        return errors.InvalidArgument(
            f"xauthority path of {len(xauthority)} characters is longer than any path "
            f"({MAX_PATH_CHARS})")
    return None


class RegistrationEndpoint:
    """Answers RegisterSession: flood bounds, identity from the bus daemon, verification, registry.
    Registrations are dropped when their helper's connection goes away."""

    def __init__(self, bus: MessageBus, verifier: RegistrationVerifier, registry: SessionRegistry,
                 *, credentials: Callable[[MessageBus, str], Awaitable[Caller]] = credentials_of,
                 max_in_flight: int = 32, max_in_flight_per_sender: int = 2,
                 max_in_flight_per_uid: int = 4, max_unidentified: int = 1024,
                 uid_rate: float = 1.0, uid_burst: float = 5.0) -> None:
        """Bounds, in the order they apply: per connection (max_in_flight_per_sender), calls
        whose caller is not known yet (max_unidentified), per uid (max_in_flight_per_uid and the
        rate), then the verifications under way (max_in_flight). A bound shared by everyone is
        only checked after a uid's own share, and one uid cannot reach it alone, so one user's
        flood never refuses another user."""
        self._bus = bus
        self._verifier = verifier
        self._registry = registry
        self._credentials = credentials
        self._max_in_flight = max_in_flight
        self._max_per_sender = max_in_flight_per_sender
        self._max_per_uid = max_in_flight_per_uid
        self._max_unidentified = max_unidentified
        self._verifying = 0
        self._uid_bucket = TokenBucket(uid_rate, uid_burst)
        self._by_sender: Counter[str] = Counter()
        self._by_uid: Counter[int] = Counter()
        self._tasks: set[asyncio.Task] = set()
        self._logs = LogLimiter(log, interval=10.0)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        self._bus.add_message_handler(self._on_message)
        await _watch_name_owners(self._bus)

    async def close(self) -> None:
        self._bus.remove_message_handler(self._on_message)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type == MessageType.SIGNAL:
            if (msg.member == "NameOwnerChanged" and msg.sender == constants.DBUS_NAME
                    and msg.signature == "sss"):
                name, _old, new = msg.body
                if not new and name.startswith(":"):
                    self._drop_sender(name)
            return False
        if (msg.message_type != MessageType.METHOD_CALL or msg.path != constants.OBJECT_PATH
                or msg.member != "RegisterSession"
                or msg.interface not in (constants.INTERFACE, None)):
            return False
        self._accept(msg)
        return True

    def _drop_sender(self, sender: str) -> None:
        reg = self._registry.remove_sender(sender)
        if reg is not None:
            log.info("session of uid %d on VT %d dropped: its helper %s disconnected",
                     reg.uid, reg.vt, sender)
            behind = self._registry.by_vt(reg.vt)
            if behind is not None:
                log.info("VT %d: the registration of uid %d display %s (%s) is in use again",
                         behind.vt, behind.uid, behind.display, behind.sender)

    def _accept(self, msg: Message) -> None:
        sender = msg.sender or ""
        if msg.signature != "ss":
            self._refuse(msg, errors.InvalidArgument(
                "RegisterSession takes two strings: display and xauthority path"), f"sender {sender}")
            return
        oversized = _oversized(msg.body[0], msg.body[1])
        if oversized is not None:
            self._refuse(msg, oversized, f"sender {sender}", key=("oversized", sender))
            return
        # Bounds before any work: a flood costs one counter check per message. The uid is not
        # known yet (asking the bus daemon is the first await), so only the connection's own
        # share applies here, and a total far above what one uid can reach: the system bus
        # admits 256 connections per uid (max_connections_per_user), 2 calls each is 512.
        if self._by_sender[sender] >= self._max_per_sender:
            self._refuse(msg, errors.LimitReached(
                "too many RegisterSession calls in progress from this connection"),
                f"sender {sender}", key=("sender", sender))
            return
        if len(self._tasks) >= self._max_unidentified:
            self._refuse(msg, errors.LimitReached(
                "the service is busy with other registrations; try again in a few seconds"),
                f"sender {sender}", key="busy")
            return
        self._by_sender[sender] += 1
        task = asyncio.get_running_loop().create_task(
            self._register(msg, sender), name=f"register-session {sender}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _register(self, msg: Message, sender: str) -> None:
        subject = f"sender {sender}"
        uid: int | None = None
        verifying = False
        try:
            caller = await self._credentials(self._bus, sender)
            subject = f"uid {caller.uid} pid {caller.pid}"
            if self._by_uid[caller.uid] >= self._max_per_uid or \
                    not self._uid_bucket.allow(caller.uid):
                raise errors.LimitReached(
                    f"too many RegisterSession calls from uid {caller.uid}; wait a few seconds")
            uid = caller.uid
            self._by_uid[uid] += 1
            # The shared bound last, after this uid's share: at most max_in_flight_per_uid of
            # these slots are any one uid's.
            if self._verifying >= self._max_in_flight:
                raise errors.LimitReached(
                    "the service is busy with other registrations; try again in a few seconds")
            verifying = True
            self._verifying += 1
            display, xauthority = msg.body
            reg = await self._verifier.verify(caller, display, xauthority)
            replaced = self._registry.add(reg)
            for old in replaced:
                log.info("registration of uid %d on VT %d (%s) replaced", old.uid, old.vt,
                         old.sender)
            # The display passed display_number()'s pattern; the path is anything the caller sent.
            log.info("session registered: uid %d pid %d VT %d display %s xauthority %s session %s",
                     reg.uid, reg.pid, reg.vt, reg.display, shown(reg.xauthority),
                     shown(reg.session_id or "-", 40, quoted=False))
            # The helper may have left while we verified: its NameOwnerChanged came too early.
            if not await self._has_owner(sender):
                self._drop_sender(sender)
            self._bus.send(Message.new_method_return(msg, "u", [reg.vt]))
        except errors.ServiceError as e:
            self._refuse(msg, e, subject)
        except asyncio.CancelledError:
            self._bus.send(Message.new_error(msg, errors.GENERIC_ERROR, "the service is stopping"))
            raise
        except Exception as e:
            self._log_unexpected(subject, e)
            self._bus.send(Message.new_error(
                msg, errors.GENERIC_ERROR, "the service failed unexpectedly; see its log"))
        finally:
            if verifying:
                self._verifying -= 1
            self._by_sender[sender] -= 1
            if self._by_sender[sender] <= 0:
                del self._by_sender[sender]
            if uid is not None:
                self._by_uid[uid] -= 1
                if self._by_uid[uid] <= 0:
                    del self._by_uid[uid]

    def _log_unexpected(self, subject: str, exc: Exception) -> None:
        if self._logs.log(logging.ERROR, "unexpected",
                          "RegisterSession from %s failed unexpectedly", subject):
            # As text: a record holding the exception holds its frames, the call's arguments
            # with them, for as long as any log handler keeps the record.
            log.error("the unexpected error, once:\n%s",
                      "".join(traceback.format_exception(exc)).rstrip())

    async def _has_owner(self, name: str) -> bool:
        reply = await self._bus.call(Message(
            destination=constants.DBUS_NAME, path=constants.DBUS_PATH,
            interface=constants.DBUS_NAME, member="NameHasOwner", signature="s", body=[name]))
        return bool(reply is not None and reply.message_type == MessageType.METHOD_RETURN
                    and reply.body[0])

    def _refuse(self, msg: Message, exc: errors.ServiceError, subject: str,
                key: Any = None) -> None:
        # Messages quote caller text with shown(); this catches any that slipped through.
        text = printable(str(exc)) or type(exc).__name__
        self._logs.log(logging.WARNING, key or (subject, type(exc).__name__),
                       "RegisterSession from %s refused (%s): %s", subject, type(exc).__name__,
                       text)
        try:
            self._bus.send(Message.new_error(msg, exc.dbus_name, text))
        except Exception:  # the bus went away: nobody to answer
            log.debug("could not send the refusal to %s", subject)
