"""The registry of verified sessions: one per helper connection and per VT, bounded per uid and total."""

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
    display: str
    xauthority: str


class SessionRegistry:
    def __init__(self, *, max_sessions: int = 16, max_sessions_per_uid: int = 4) -> None:
        self.max_sessions = max_sessions
        self.max_sessions_per_uid = max_sessions_per_uid
        self._by_sender: dict[str, Registration] = {}
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def _changed(self) -> None:
        for cb in list(self._listeners):
            cb()

    def add(self, reg: Registration) -> list[Registration]:
        """Adds `reg`, replacing any registration of the same sender or the same VT; returns those
        replaced. Raises LimitReached (and changes nothing) when a bound would be exceeded."""
        replaced = [r for r in self._by_sender.values()
                    if r.sender == reg.sender or r.vt == reg.vt]
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
        if vt is None:
            return None
        for r in self._by_sender.values():
            if r.vt == vt:
                return r
        return None

    def all(self) -> list[Registration]:
        return sorted(self._by_sender.values(), key=lambda r: r.vt)

    def __len__(self) -> int:
        return len(self._by_sender)
