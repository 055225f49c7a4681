"""Maps the active session (or VT), the session registry and the device's presence to the
supervisor's target."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from .errors import ServiceError
from .sessions import Registration, SessionRegistry

log = logging.getLogger(__name__)
_UNSET = object()


class _VT(Protocol):
    active_vt: int | None
    active_session: str | None
    has_sessions: bool

    def on_change(self, callback: Callable[[int | None], None]) -> None: ...


class _Device(Protocol):
    present: bool
    node: str | None

    def on_change(self, callback: Callable[[bool], None]) -> None: ...


class _Supervisor(Protocol):
    status: dict

    def set_target(self, target: Any) -> None: ...

    def set_device_present(self, present: bool, path: str | None = None) -> None: ...

    def set_standby(self, targets: list[Any]) -> None: ...


def target_of(reg: Registration | None):
    """The supervisor's WorkerTarget for a registration (imported late: supervisor is C2's module)."""
    if reg is None:
        return None
    from .supervisor import WorkerTarget
    return WorkerTarget(uid=reg.uid, gid=reg.gid, groups=reg.groups, display=reg.display,
                        xauthority=reg.xauthority, vt=reg.vt, kind=reg.kind,
                        runtime_dir=reg.runtime_dir,
                        registration=reg.sender if reg.kind == "wayland" else "",
                        session_id=(reg.session_id or "") if reg.kind == "wayland" else "")


class Coordinator:
    def __init__(self, registry: SessionRegistry, vt_source: _VT, device: _Device,
                 supervisor: _Supervisor,
                 make_target: Callable[[Registration | None], Any] = target_of,
                 fallback: Any = None, scanout_kinds: frozenset[str] = frozenset()) -> None:
        """fallback: the target when no registered session is in front (the scanout reader's),
        or None (nothing is streamed then). scanout_kinds: the kinds of registered sessions
        ("wayland") streamed by the fallback too, with no worker of their own (the setting
        wayland_capture = "scanout")."""
        self.registry = registry
        self._fallback = fallback
        self._scanout_kinds = scanout_kinds if fallback is not None else frozenset()
        self.vt_source = vt_source
        self.device = device
        self.supervisor = supervisor
        self._make_target = make_target
        # _UNSET until the first update: with a fallback, "no session in front" is a target too.
        self._target_reg: Registration | None | object = _UNSET
        self._device_present: tuple[bool, str | None] | None = None
        self._listeners: list[Callable[[], None]] = []
        registry.on_change(self.update)
        vt_source.on_change(lambda _vt: self.update())
        device.on_change(lambda _present: self.update())

    def on_change(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def update(self) -> None:
        present = bool(self.device.present)
        node = getattr(self.device, "node", None) if present else None
        if (present, node) != self._device_present:
            self._device_present = (present, node)
            log.info("stream device %s", f"present at {node}" if present else "absent")
            # Without a udev symlink the port is found by its sysfs name: open the node it found.
            self.supervisor.set_device_present(present, path=node)
        reg = self._in_front()
        if reg != self._target_reg:
            first = self._target_reg is _UNSET
            self._target_reg = reg
            # Nothing streamed before and nothing now: the supervisor starts with no target.
            if not (first and reg is None and self._fallback is None):
                self._set_target(reg)
        # The other registered sessions' workers are kept started: a switch then costs no start.
        # The scanout reader too, while a session is in front: a switch to a text console or the
        # login screen costs no process start either. A session the scanout streams has none.
        standby = [self._make_target(r) for r in self.registry.all()
                   if r is not reg and not self._by_scanout(r)]
        if reg is not None and self._fallback is not None and not self._by_scanout(reg):
            standby.append(self._fallback)
        self.supervisor.set_standby(standby)
        self.notify()

    def _by_scanout(self, reg: Registration) -> bool:
        """Whether the display's scanout streams this session, not a worker of its own."""
        return reg.kind in self._scanout_kinds

    def _set_target(self, reg: Registration | None) -> None:
        if reg is None:
            log.info("no registered session in front (VT %s, session %s): %s",
                     self.vt_source.active_vt, self.vt_source.active_session or "-",
                     "streaming the display's scanout" if self._fallback else "worker stopped")
        elif self._by_scanout(reg):
            log.info("active VT %d: streaming uid %d display %s (session %s) from the display's "
                     "scanout (wayland_capture = scanout)", reg.vt, reg.uid, reg.label,
                     reg.session_id or "-")
        else:
            log.info("active VT %d: streaming uid %d display %s (session %s)", reg.vt,
                     reg.uid, reg.label, reg.session_id or "-")
        try:
            self.supervisor.set_target(self._make_target(reg) if reg is not None
                                       and not self._by_scanout(reg) else self._fallback)
        except ServiceError as exc:
            # A target the supervisor refuses (e.g. a root group) must not stop the service.
            if reg is None:
                log.warning("not streaming the display's scanout: %s", exc)
            else:
                log.warning("not streaming uid %d on VT %d: %s", reg.uid, reg.vt, exc)

    def _in_front(self) -> Registration | None:
        """The registration of the session in front of seat0."""
        if self.vt_source.has_sessions:
            # By session, not VT: a VT can still hold an ended session's registration (a logout
            # that left processes behind keeps it "closing") while another session is in front.
            return self.registry.by_session(self.vt_source.active_session)
        # Without logind (sysfs and /proc: no session ids) the VT is all there is to go by.
        return self.registry.by_vt(self.vt_source.active_vt)

    def notify(self) -> None:
        for cb in list(self._listeners):
            cb()

    def idle(self) -> bool:
        """Nothing to do: no session registered and no device to stream to."""
        return len(self.registry) == 0 and not self.device.present

    def properties(self) -> dict[str, Any]:
        """The values behind the D-Bus properties (names as in the introspection XML)."""
        status = self.supervisor.status or {}
        state = str(status.get("state", "idle"))
        streaming = bool(status.get("streaming", False)) and state == "running"
        return {
            "ActiveVT": int(self.vt_source.active_vt or 0),
            "Sessions": [[r.vt, r.uid, r.label] for r in self.registry.all()],
            "DevicePresent": bool(self.device.present),
            "WorkerState": state,
            "WorkerPID": int(status.get("pid") or 0),
            "Streaming": streaming,
            # The scanout shows whatever VT is in front.
            "StreamingVT": int(status.get("vt") or self.vt_source.active_vt or 0)
            if streaming else 0,
            "LastError": str(status.get("last_error") or ""),
            "WorkerStats": {
                "frames": int(status.get("frames") or 0),
                "bytes": int(status.get("bytes") or 0),
                "fps": float(status.get("fps") or 0.0),
                "restarts": int(status.get("restarts") or 0),
            },
        }
