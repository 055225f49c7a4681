"""A handler on the service's bus connection that answers calls itself (it needs the caller's
unique name, which dbus-next's method handlers do not see): started, closed with the tasks it runs,
told when a caller leaves, its unexpected errors logged once as text."""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Coroutine
from typing import Any

from dbus_next import Message, MessageType
from dbus_next.aio import MessageBus

from spice_stream_common import constants
from spice_stream_common.ratelimit import LogLimiter


async def watch_name_owners(bus: MessageBus) -> None:
    """NameOwnerChanged from the bus daemon reaches this connection's handlers."""
    rule = (f"type='signal',sender='{constants.DBUS_NAME}',path='{constants.DBUS_PATH}',"
            f"interface='{constants.DBUS_NAME}',member='NameOwnerChanged'")
    reply = await bus.call(Message(
        destination=constants.DBUS_NAME, path=constants.DBUS_PATH,
        interface=constants.DBUS_NAME, member="AddMatch", signature="s", body=[rule]))
    if reply is None or reply.message_type == MessageType.ERROR:
        raise RuntimeError(f"cannot watch NameOwnerChanged: {reply and reply.body}")


def left_the_bus(msg: Message) -> str | None:
    """The unique name a NameOwnerChanged from the bus daemon says has gone, else None."""
    if (msg.message_type == MessageType.SIGNAL and msg.member == "NameOwnerChanged"
            and msg.sender == constants.DBUS_NAME and msg.signature == "sss"):
        name, _old, new = msg.body
        if not new and name.startswith(":"):
            return name
    return None


class BusEndpoint:
    """Base of the service's own message handlers: `_on_message` sees every message first and
    returns True for the ones it answers (then dbus-next does not)."""

    def __init__(self, bus: MessageBus, logger: logging.Logger) -> None:
        self._bus = bus
        self._log = logger
        self._logs = LogLimiter(logger, interval=10.0)
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._bus.add_message_handler(self._on_message)
        await watch_name_owners(self._bus)

    async def close(self) -> None:
        self._bus.remove_message_handler(self._on_message)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_message(self, msg: Message) -> bool:
        raise NotImplementedError

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Runs `coro` as a task this endpoint owns (cancelled by close())."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _log_unexpected(self, key: Any, exc: BaseException, what: str, *args: Any) -> None:
        """One rate-limited error line, and the traceback once per burst, as text: a record
        holding the exception holds its frames, the call's arguments with them, for as long as
        any log handler keeps the record."""
        if self._logs.log(logging.ERROR, key, what, *args):
            self._log.error("the unexpected error, once:\n%s",
                            "".join(traceback.format_exception(exc)).rstrip())

    def _send(self, reply: Message) -> None:
        if reply.destination is None:
            return
        try:
            self._bus.send(reply)
        except Exception:  # the bus went away: nobody to answer
            self._log.debug("could not answer %s", reply.destination)
