"""The registry of verified sessions: one per helper connection, one in use per VT, bounded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import LimitReached


@dataclass(frozen=True)
class Registration:
    sender: str  # the helper's unique bus name: the registration lives as long as it does
    uid: int
    gid: int
    groups: tuple[int, ...]
    pid: int
    session_id: str | None
    vt: int
    display: str  # X11: the display; "" for Wayland
    xauthority: str  # X11: the Xauthority path; "" for Wayland
    kind: str = "x11"  # "x11" (RegisterSession) or "wayland" (RegisterWaylandSession)
    # Wayland: the user's runtime directory as logind gives it (User.RuntimePath), checked by the
    # verifier; the worker's session bus is <runtime_dir>/bus. Never taken from the caller.
    runtime_dir: str = ""

    @property
    def label(self) -> str:
        """What the Sessions property and log lines show: the display, or "wayland"."""
        return "wayland" if self.kind == "wayland" else self.display


class SessionRegistry:
    """Every live registration, one per helper connection; per VT, the newest one of the session on
    that VT is the one in use, and the others of that session wait behind it.

    Why: within one session every caller is the same user, so a later registration (say, a helper
    started by hand for another display) is what that user asked for last and is used; but it must
    not cost the earlier one (the session's own helper): when either leaves, the other one still
    counts, without having to register again. A registration from another session on the same VT
    replaces that session's ones: logind gives a VT to one live session at a time, so the older
    session there has ended (a logout that left processes behind)."""

    def __init__(self, *, max_sessions: int = 16, max_sessions_per_uid: int = 4) -> None:
        self.max_sessions = max_sessions
        self.max_sessions_per_uid = max_sessions_per_uid
        self._by_sender: dict[str, Registration] = {}  # oldest first
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def _changed(self) -> None:
        for cb in list(self._listeners):
            cb()

    @staticmethod
    def _same_session(a: Registration, b: Registration) -> bool:
        # Without logind (session_id None) the uid is all there is to tell sessions apart.
        return a.session_id == b.session_id and a.uid == b.uid

    def add(self, reg: Registration) -> list[Registration]:
        """Adds `reg` in front of its VT's registrations; replaces this sender's earlier one and
        those of another session on the same VT, and returns them. Raises LimitReached (and
        changes nothing) when a bound would be exceeded."""
        replaced = [r for r in self._by_sender.values()
                    if r.sender == reg.sender
                    or (r.vt == reg.vt and not self._same_session(r, reg))]
        remaining = [r for r in self._by_sender.values() if r not in replaced]
        if len(remaining) + 1 > self.max_sessions:
            raise LimitReached(
                f"the service already holds {len(remaining)} sessions (limit {self.max_sessions})")
        same_uid = sum(1 for r in remaining if r.uid == reg.uid)
        if same_uid + 1 > self.max_sessions_per_uid:
            raise LimitReached(
                f"uid {reg.uid} already has {same_uid} registered sessions "
                f"(limit {self.max_sessions_per_uid}); close one first")
        for r in replaced:
            del self._by_sender[r.sender]
        self._by_sender[reg.sender] = reg
        self._changed()
        return replaced

    def remove_sender(self, sender: str) -> Registration | None:
        reg = self._by_sender.pop(sender, None)
        if reg is not None:
            self._changed()
        return reg

    def remove_session(self, session_id: str) -> list[Registration]:
        gone = [r for r in self._by_sender.values() if r.session_id == session_id]
        for r in gone:
            del self._by_sender[r.sender]
        if gone:
            self._changed()
        return gone

    def by_vt(self, vt: int | None) -> Registration | None:
        """The registration in use on `vt`: the newest one there."""
        if vt is None:
            return None
        found = None
        for r in self._by_sender.values():
            if r.vt == vt:
                found = r
        return found

    def by_session(self, session_id: str | None) -> Registration | None:
        """The registration in use for logind session `session_id`: the newest one of it."""
        if session_id is None:
            return None
        found = None
        for r in self._by_sender.values():
            if r.session_id == session_id:
                found = r
        return found

    def session_ids(self) -> set[str]:
        """The logind sessions of every live registration, those waiting included."""
        return {r.session_id for r in self._by_sender.values() if r.session_id is not None}

    def all(self) -> list[Registration]:
        """The registrations in use, one per VT (those waiting behind them are not listed)."""
        in_use: dict[int, Registration] = {}
        for r in self._by_sender.values():
            in_use[r.vt] = r
        return sorted(in_use.values(), key=lambda r: r.vt)

    def __len__(self) -> int:
        """Every live registration, those waiting included (what the bounds count)."""
        return len(self._by_sender)
