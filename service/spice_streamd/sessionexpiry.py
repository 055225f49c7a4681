"""Drops registrations whose logind session has ended: closing (logged out, processes left behind) or gone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from spice_stream_common.untrusted import shown

from .sessioninfo import GONE, LogindError
from .sessions import SessionRegistry

log = logging.getLogger(__name__)

# How often the sessions of live registrations are asked for their State while any is registered.
# logind signals no change of State, so a logout with processes left behind ("closing") is only
# found by asking; this also makes good a lost SessionRemoved or seat0 PropertiesChanged. The cost
# is bounded: two calls per distinct session, at most max_sessions of them, one check at a time.
RECHECK_S = 2.0


class _States(Protocol):
    async def session_state(self, session_id: str) -> str: ...

    def on_session_removed(self, callback: Callable[[str], None]) -> None: ...


class _Seat(Protocol):
    def on_change(self, callback: Callable[[int | None], None]) -> None: ...

    async def refresh(self, why: str) -> None: ...


class SessionExpiry:
    """Removes a registration from the registry once its session is closing or gone.

    Checks when logind says a session was removed (SessionRemoved: that one, at once), when seat0's
    active session changes (a login on the VT of a closed session), and every `recheck_s` while a
    registration with a session id exists; each periodic check also reads seat0's active session
    again. Registrations without a session id (the /proc fallback) are never checked: there is no
    session to ask about.
    """

    def __init__(self, registry: SessionRegistry, sessions: _States, seat: _Seat,
                 recheck_s: float = RECHECK_S) -> None:
        self._registry = registry
        self._sessions = sessions
        self._seat = seat
        self._recheck_s = recheck_s
        self._task: asyncio.Task[None] | None = None
        self._again = False  # a reason to check arrived while a check ran
        self._timer: asyncio.TimerHandle | None = None
        self._failing = False  # logind did not answer the last check (logged once per streak)
        self._closed = False

    def start(self) -> None:
        self._sessions.on_session_removed(self._removed)
        self._seat.on_change(lambda _vt: self.check())
        self._registry.on_change(self._arm)
        self._arm()

    def _drop(self, session_id: str, why: str) -> None:
        # One line per registration, whatever removed it: the administrator's record of who was
        # streamed until when.
        for reg in self._registry.remove_session(session_id):
            log.info("registration of uid %d on VT %d dropped: session %s %s", reg.uid, reg.vt,
                     shown(session_id, 40, quoted=False), why)

    def _removed(self, session_id: str) -> None:
        self._drop(session_id, "was removed (logind SessionRemoved)")

    def _arm(self) -> None:
        """Keeps the periodic check scheduled exactly while a registration has a session id."""
        if self._closed or self._timer is not None or self._task is not None:
            return
        if self._registry.session_ids():
            self._timer = asyncio.get_running_loop().call_later(self._recheck_s, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.check(periodic=True)

    def check(self, periodic: bool = False) -> None:
        """Checks the registered sessions now, or right after the check under way."""
        if self._closed:
            return
        if self._task is not None:
            self._again = True
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._task = asyncio.get_running_loop().create_task(self._run(periodic))

    async def _run(self, periodic: bool) -> None:
        try:
            while True:
                self._again = False
                if periodic:
                    await self._seat.refresh("periodic re-check")
                    periodic = False
                await self._check_once()
                if not self._again or self._closed:
                    break
        except Exception:
            log.exception("checking the registered sessions failed")
        finally:
            self._task = None
            self._arm()

    async def _check_once(self) -> None:
        for session_id in sorted(self._registry.session_ids()):
            try:
                state = await self._sessions.session_state(session_id)
            except LogindError as e:
                # Nobody knows: keep the registrations. Without logind the seat has no active
                # session either, so nothing is streamed meanwhile.
                if not self._failing:
                    self._failing = True
                    log.warning("cannot ask logind about registered sessions (%s): kept for now",
                                e)
                return
            self._failing = False
            if state == GONE:
                self._drop(session_id, "is gone (logind no longer knows it)")
            elif state == "closing":
                self._drop(session_id, "is closing (logged out, processes left behind)")

    async def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
