"""spice-stream-helper: registers this graphical session with spice-streamd (an X11 display with
RegisterSession, a Wayland session with RegisterWaylandSession) and stays connected."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

from dbus_next import Message, MessageType
from dbus_next.aio import MessageBus

from spice_stream_common.constants import (
    BUS_NAME,
    DBUS_NAME,
    DBUS_PATH,
    ERROR_PREFIX,
    INTERFACE,
    OBJECT_PATH,
    VERSION,
)
from spice_stream_common.dbusnext_compat import bus_for, describe_bus, disconnected
from spice_stream_common.untrusted import printable

from .sessionwatch import ActiveWatch, own_session_path

# The service is not there (yet): wait for it rather than give up.
ABSENT_ERRORS = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.Spawn.ChildExited",
    "org.freedesktop.DBus.Error.Spawn.ServiceNotFound",
    "org.freedesktop.DBus.Error.TimedOut",
}
CALL_TIMEOUT_S = 60.0
# Refusals that say "not now" rather than "no": the service is busy (another user's flood, or this
# user's own calls) or polkit/logind did not answer. Ask again, ever later, rather than give up.
RETRY_LATER = {ERROR_PREFIX + "LimitReached", ERROR_PREFIX + "AuthorityUnavailable"}
# polkit's allow_active refuses a session in the background (bob's, while alice's VT is shown,
# when the service restarted): ask again when logind says this session became the active one.
WHEN_ACTIVE = {ERROR_PREFIX + "PermissionDenied"}
# The service registers a Wayland session only while it is seat0's active one: a session in the
# background is refused NotInSession, and asks again once it is active (refused then, it is final).
NOT_IN_SESSION = ERROR_PREFIX + "NotInSession"
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_BUS = 3


def say(text: str) -> None:
    # What we print comes in part from the service and the environment: no escape sequence may
    # reach the terminal or the journal through it.
    print(f"spice-stream-helper: {printable(text)}", file=sys.stderr, flush=True)


class Backoff:
    """Capped exponential delays with jitter: first, 2 x first, ... up to `cap`, each drawn in
    [d/2, d] so that helpers refused together do not all come back at the same moment."""

    def __init__(self, first: float = BACKOFF_FIRST_S, cap: float = BACKOFF_MAX_S,
                 rand: Callable[[], float] = random.random) -> None:
        self.first = first
        self.cap = cap
        self._rand = rand
        self._next = first

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay / 2 + self._rand() * delay / 2

    def reset(self) -> None:
        self._next = self.first


@dataclass(frozen=True)
class Target:
    """What this session registers: the method, its arguments, and how to name it to a person."""

    member: str
    signature: str
    body: list
    what: str

    @property
    def wayland(self) -> bool:
        return self.member == "RegisterWaylandSession"


def is_wayland(env: dict[str, str]) -> bool:
    return env.get("XDG_SESSION_TYPE") == "wayland" or bool(
        env.get("WAYLAND_DISPLAY") and not env.get("DISPLAY"))


@dataclass(frozen=True)
class Skip:
    """Nothing to register here, and that is no error: the reason, for the session's log."""

    reason: str


def session_target(env: dict[str, str]) -> Target | Skip | str:
    """What to register for this session, a Skip, or a one-line reason it cannot be done.
    A Wayland session passes nothing: the service finds its session bus through logind."""
    if is_wayland(env):
        if env.get("XDG_SESSION_CLASS") == "greeter":
            # gnome-shell refuses every screencast on the login screen (sessionMode
            # allowScreencast): a worker there could only fail and be restarted.
            return Skip("the login screen on Wayland shares no picture (gnome-shell refuses "
                        "screencasts there): not registered; the user's session will be")
        return Target("RegisterWaylandSession", "a{sv}", [{}], "this Wayland session")
    found = session_display(env)
    if isinstance(found, str):
        return found
    display, xauthority = found
    return Target("RegisterSession", "ss", [display, xauthority], f"display {display}")


def session_display(env: dict[str, str]) -> tuple[str, str] | str:
    """(display, xauthority) of this X11 session, or a one-line reason it cannot be streamed."""
    display = env.get("DISPLAY", "")
    if not display:
        return ("neither DISPLAY nor WAYLAND_DISPLAY is set: not a graphical session; start "
                "the helper from the session's autostart")
    xauthority = env.get("XAUTHORITY") or os.path.join(env.get("HOME", "/"), ".Xauthority")
    return display, os.path.abspath(xauthority)


class Helper:
    def __init__(self, bus: MessageBus, target: Target) -> None:
        self.bus = bus
        self.target = target
        self._need = asyncio.Event()
        self._retry: asyncio.TimerHandle | None = None
        self._backoff = Backoff()
        self._watch: ActiveWatch | None = None

    def _on_message(self, msg: Message) -> bool:
        if (msg.message_type == MessageType.SIGNAL and msg.member == "NameOwnerChanged"
                and msg.sender == DBUS_NAME and msg.signature == "sss"
                and msg.body[0] == BUS_NAME):
            new_owner = msg.body[2]
            if new_owner:
                say(f"the service is back ({new_owner}): registering again")
                self._backoff.reset()
                self._need.set()
            else:
                # No call now: it would activate the service again behind an administrator's
                # `systemctl stop` or a package removal. A crash is systemd's to restart
                # (Restart=on-failure); the service's return is signalled above.
                say("the service stopped: registering again once it is back")
        return False

    async def _call_bus(self, member: str, body: list) -> Message:
        return await self.bus.call(Message(destination=DBUS_NAME, path=DBUS_PATH,
                                           interface=DBUS_NAME, member=member, signature="s",
                                           body=body))

    async def run(self) -> int:
        self.bus.add_message_handler(self._on_message)
        rule = (f"type='signal',sender='{DBUS_NAME}',interface='{DBUS_NAME}',"
                f"member='NameOwnerChanged',arg0='{BUS_NAME}'")
        await self._call_bus("AddMatch", [rule])
        self._need.set()
        while True:
            await self._need.wait()
            self._need.clear()
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
            code = await self.register()
            if code is not None:
                return code

    async def register(self) -> int | None:
        """None when registered or the service is absent (wait for it); else an exit code."""
        t = self.target
        msg = Message(destination=BUS_NAME, path=OBJECT_PATH, interface=INTERFACE,
                      member=t.member, signature=t.signature, body=list(t.body))
        try:
            reply = await asyncio.wait_for(self.bus.call(msg), CALL_TIMEOUT_S)
        except TimeoutError:
            say("the service did not answer; waiting for it to restart")
            return None
        if reply is None:
            return None
        if reply.message_type == MessageType.METHOD_RETURN:
            self._backoff.reset()
            say(f"{t.what} registered: streamed while VT {reply.body[0]} is active")
            return None
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        if reply.error_name in ABSENT_ERRORS:
            say("the streaming service is not running; waiting for it")
            return None
        name = reply.error_name or ""
        if name in RETRY_LATER:
            delay = self._backoff.next_delay()
            say(f"registration refused for now ({name[len(ERROR_PREFIX):]}): {text}; "
                f"trying again in {delay:.0f} s")
            self._retry = asyncio.get_running_loop().call_later(delay, self._need.set)
            return None
        when_active = name in WHEN_ACTIVE or (t.wayland and name == NOT_IN_SESSION)
        if when_active and await self._watch_session():
            assert self._watch is not None
            active = await self._watch.is_active()
            if active and name == NOT_IN_SESSION:
                # Active, and still not a session the service streams: that is final.
                say(f"registration refused ({name[len(ERROR_PREFIX):]}): {text}")
                return EXIT_REFUSED
            if active:
                # Active, yet refused: polkit may not have seen the switch logind just told us
                # about. Ask again shortly, ever later.
                delay = self._backoff.next_delay()
                say(f"registration refused ({name[len(ERROR_PREFIX):]}) although this session "
                    f"is active: {text}; trying again in {delay:.1f} s")
                self._retry = asyncio.get_running_loop().call_later(delay, self._need.set)
            else:
                say(f"registration refused for now ({name[len(ERROR_PREFIX):]}): {text}; "
                    "registering again when this session becomes the active one")
            return None
        if name.startswith(ERROR_PREFIX):
            say(f"registration refused ({name[len(ERROR_PREFIX):]}): {text}")
            return EXIT_REFUSED
        say(f"registration failed ({name}): {text}")
        return EXIT_REFUSED


    async def _watch_session(self) -> bool:
        """Start watching our logind session for becoming active; False without logind."""
        if self._watch is None:
            path = await own_session_path(self.bus)
            if path is None:
                return False
            watch = ActiveWatch(self.bus, path, self._need.set)
            if not await watch.start():
                return False
            self._watch = watch
            if await watch.is_active():
                self._need.set()  # it became active before the watch began: ask now
        return True


async def run(spec: str, target: Target) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    try:
        bus = await bus_for(spec).connect()
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        say(f"cannot connect to the {spec} bus at {describe_bus(spec)}: {reason}")
        return EXIT_BUS
    helper = Helper(bus, target)
    tasks = {
        loop.create_task(stop.wait(), name="stop signal"): "stop",
        loop.create_task(disconnected(bus), name="bus connection"): "bus",
        loop.create_task(helper.run(), name=f"registration of {target.what}"): "helper",
    }
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    task = done.pop()
    what = tasks[task]
    if bus.connected:
        bus.disconnect()
    if what == "stop":
        return EXIT_OK
    if what == "bus":
        say("lost the bus connection")
        return EXIT_BUS
    return task.result()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="spice-stream-helper",
        description="Register this graphical session (X11 or Wayland) with spice-streamd; "
                    "stays running for the session's life.")
    p.add_argument("--bus", default="system",
                   help="'system' (default), 'session', or a D-Bus address")
    p.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    args = p.parse_args(argv)
    found = session_target(dict(os.environ))
    if isinstance(found, Skip):
        say(found.reason)
        return EXIT_OK
    if isinstance(found, str):
        say(found)
        return EXIT_USAGE
    try:
        return asyncio.run(run(args.bus, found))
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
