"""Refused registration calls and memory: the service's real endpoint, verifier, polkit and session
source in the test's process, with the garbage collector off, and what of each refused call is still
alive once its reply is out."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable

from spice_stream_common import dbusnext_compat
from spice_stream_common.constants import BUS_NAME


async def refused_calls_alive(address: str, member: str, verifier: type,
                              cases: list[tuple[str, Callable[[], int]]]) -> dict[str, int]:
    """Serve `address`'s bus as the service (with `verifier`, a RegistrationVerifier class) and
    run each case's send() in a thread: it makes its calls from a real client, checks the replies
    and returns how many calls it made. Returns kind -> that case's `member` calls still in memory
    after their replies (nothing in the refusal path may keep one in a reference cycle)."""
    from spice_streamd.dbus_service import RegistrationEndpoint
    from spice_streamd.polkit import PolkitAuthority
    from spice_streamd.sessioninfo import open_session_source
    from spice_streamd.sessions import SessionRegistry
    from tests.conftest import connect
    from tests.support.waiting import wait_async

    dbusnext_compat.install()
    loop = asyncio.get_running_loop()
    bus = await connect(address)
    calls: list[weakref.ref] = []

    def keep_a_weak_reference(msg):
        if msg.member == member:
            calls.append(weakref.ref(msg))
        return False

    bus.add_message_handler(keep_a_weak_reference)
    sessions = await open_session_source(bus)
    endpoint = RegistrationEndpoint(
        bus, verifier(authorize=PolkitAuthority(bus).check, sessions=sessions),
        SessionRegistry(), uid_burst=100.0)
    await endpoint.start()
    await bus.request_name(BUS_NAME)
    leaks: dict[str, int] = {}
    gc.collect()
    gc.disable()
    try:
        for kind, send in cases:
            before = len(calls)
            made = await loop.run_in_executor(None, send)
            assert len(calls) == before + made, kind
            # Its reply is out (the client has it): only the task's last lines may be left.
            await wait_async(lambda: endpoint.in_flight == 0, what=f"{kind}: calls ended")
            await asyncio.sleep(0.05)
            alive = sum(r() is not None for r in calls[before:])
            if alive:
                leaks[kind] = alive
    finally:
        gc.enable()
        await endpoint.close()
        await sessions.close()
        bus.disconnect()
    return leaks
