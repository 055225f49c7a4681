"""Asks polkit whether a bus caller may perform an action, with a bounded wait."""

from __future__ import annotations

import asyncio

from dbus_next import Message, MessageType, Variant
from dbus_next.aio import MessageBus

from spice_stream_common import constants

from .errors import AuthorityUnavailable, PermissionDenied


class PolkitAuthority:
    def __init__(self, bus: MessageBus, timeout: float = constants.POLKIT_TIMEOUT_S) -> None:
        self._bus = bus
        self.timeout = timeout

    async def check(self, sender: str, action: str) -> None:
        """Returns when polkit authorizes `sender` for `action`; raises PermissionDenied or
        AuthorityUnavailable. No interaction: a background service cannot show a dialog."""
        subject = ["system-bus-name", {"name": Variant("s", sender)}]
        msg = Message(destination=constants.POLKIT_NAME, path=constants.POLKIT_PATH,
                      interface=constants.POLKIT_INTERFACE, member="CheckAuthorization",
                      signature="(sa{sv})sa{ss}us", body=[subject, action, {}, 0, ""])
        try:
            reply = await asyncio.wait_for(self._bus.call(msg), self.timeout)
        except TimeoutError:
            raise AuthorityUnavailable(
                f"polkit did not answer within {self.timeout:g} s; try again later") from None
        if reply is None:
            raise AuthorityUnavailable("polkit gave no answer")
        if reply.message_type == MessageType.ERROR:
            raise AuthorityUnavailable(f"polkit is not available ({reply.error_name})")
        is_authorized, _is_challenge, _details = reply.body[0]
        if not is_authorized:
            raise PermissionDenied(
                "polkit does not authorize you to stream a session "
                f"(action {action}); only the user at the active local session may")
