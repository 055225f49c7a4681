"""The D-Bus boundary: a thin adapter exporting the interface and answering RegisterSession and
RegisterWaylandSession with the caller's bus identity, bounded per caller, with every error mapped
to a named D-Bus error (property reads: propertyreader)."""

# No `from __future__ import annotations`: dbus-next reads the signature strings from annotations.

import asyncio
import logging
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from dbus_next import Message, MessageType, Variant
from dbus_next import introspection as intr
from dbus_next.aio import MessageBus
from dbus_next.service import PropertyAccess, ServiceInterface, dbus_property, method

from spice_stream_common import constants
from spice_stream_common.ratelimit import TokenBucket
from spice_stream_common.untrusted import printable, shown

from . import errors
from .busendpoint import BusEndpoint, left_the_bus
from .caller import Caller, credentials_of
from .readaccess import NOBODY, PER_USER, Owners, visible_to
from .sessions import SessionRegistry
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

EMITS_CHANGED = {name: ("false" if name in UNSIGNALLED else
                        "invalidates" if name in PER_USER else "true")
                 for name in PROPERTY_SIGNATURES}
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

    @method()
    def RegisterWaylandSession(self, options: 'a{sv}') -> 'u':  # noqa: F821, F722, N802
        # Never reached either: RegistrationEndpoint answers first.
        raise errors.ServiceError("RegisterWaylandSession is handled elsewhere")

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


# RegisterWaylandSession's options: none is defined today. A key is refused by name, before any
# work (the bus admits a dict of up to its message size; only its first key is shown).
WAYLAND_OPTIONS: frozenset[str] = frozenset()
SIGNATURES = {"RegisterSession": "ss", "RegisterWaylandSession": "a{sv}"}


def _unknown_options(options: dict) -> errors.InvalidArgument | None:
    """The refusal of an option this version does not know (its name, never a copy of the dict)."""
    unknown = next((k for k in options if k not in WAYLAND_OPTIONS), None)
    if unknown is None:
        return None
    others = len(options) - 1
    return errors.InvalidArgument(
        f"unknown option {shown(unknown, 64)}"
        + (f" (and {others} other{'s' if others > 1 else ''})" if others else "")
        + ": RegisterWaylandSession takes no options in this version (pass an empty a{sv})")


class RegistrationEndpoint(BusEndpoint):
    """Answers RegisterSession and RegisterWaylandSession: flood bounds (one set for both),
    identity from the bus daemon, verification, registry. Registrations are dropped when their
    helper's connection goes away."""

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
        super().__init__(bus, log)
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

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def _on_message(self, msg: Message) -> bool:
        gone = left_the_bus(msg)
        if gone is not None:
            self._drop_sender(gone)
            return False
        if (msg.message_type != MessageType.METHOD_CALL or msg.path != constants.OBJECT_PATH
                or msg.member not in SIGNATURES
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
                         behind.vt, behind.uid, behind.label, behind.sender)

    def _accept(self, msg: Message) -> None:
        sender = msg.sender or ""
        if msg.signature != SIGNATURES[msg.member]:
            self._refuse(msg, errors.InvalidArgument(
                "RegisterSession takes two strings: display and xauthority path"
                if msg.member == "RegisterSession" else
                "RegisterWaylandSession takes one dictionary of options (a{sv}), empty today"),
                f"sender {sender}")
            return
        if msg.member == "RegisterSession":
            refused = _oversized(msg.body[0], msg.body[1])
        else:
            refused = _unknown_options(msg.body[0])
        if refused is not None:
            self._refuse(msg, refused, f"sender {sender}", key=("oversized", sender))
            return
        # Bounds before any work: a flood costs one counter check per message. The uid is not
        # known yet (asking the bus daemon is the first await), so only the connection's own
        # share applies here, and a total far above what one uid can reach: the system bus
        # admits 256 connections per uid (max_connections_per_user), 2 calls each is 512.
        if self._by_sender[sender] >= self._max_per_sender:
            self._refuse(msg, errors.LimitReached(
                "too many registration calls in progress from this connection"),
                f"sender {sender}", key=("sender", sender))
            return
        if len(self._tasks) >= self._max_unidentified:
            self._refuse(msg, errors.LimitReached(
                "the service is busy with other registrations; try again in a few seconds"),
                f"sender {sender}", key="busy")
            return
        self._by_sender[sender] += 1
        self._spawn(self._register(msg, sender), name=f"register-session {sender}")

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
                    f"too many registration calls from uid {caller.uid}; wait a few seconds")
            uid = caller.uid
            self._by_uid[uid] += 1
            # The shared bound last, after this uid's share: at most max_in_flight_per_uid of
            # these slots are any one uid's.
            if self._verifying >= self._max_in_flight:
                raise errors.LimitReached(
                    "the service is busy with other registrations; try again in a few seconds")
            verifying = True
            self._verifying += 1
            if msg.member == "RegisterSession":
                display, xauthority = msg.body
                reg = await self._verifier.verify(caller, display, xauthority)
            else:
                reg = await self._verifier.verify_wayland(caller)
            replaced = self._registry.add(reg)
            for old in replaced:
                log.info("registration of uid %d on VT %d (%s) replaced", old.uid, old.vt,
                         old.sender)
            if reg.kind == "wayland":
                # The runtime dir is logind's, checked; shown() all the same.
                log.info("session registered: uid %d pid %d VT %d wayland runtime %s session %s",
                         reg.uid, reg.pid, reg.vt, shown(reg.runtime_dir),
                         shown(reg.session_id or "-", 40, quoted=False))
            else:
                # The display passed display_number()'s pattern; the path is anything the
                # caller sent.
                log.info("session registered: uid %d pid %d VT %d display %s xauthority %s "
                         "session %s", reg.uid, reg.pid, reg.vt, reg.display,
                         shown(reg.xauthority), shown(reg.session_id or "-", 40, quoted=False))
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
            self._log_unexpected("unexpected", e, "%s from %s failed unexpectedly",
                                 msg.member, subject)
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
                       "%s from %s refused (%s): %s", msg.member, subject, type(exc).__name__,
                       text)
        self._send(Message.new_error(msg, exc.dbus_name, text))
