"""Whether the stream port is present: a udev monitor on "virtio-ports", backed by a slow re-check."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from spice_stream_common import constants

log = logging.getLogger(__name__)

SUBSYSTEM = "virtio-ports"
MAX_EVENTS_PER_WAKE = 64


class DeviceWatch:
    """Tracks `present` (and `node`, the path to open) for the stream port.

    The path is udev's DEVLINKS symlink; where no udev rule made it (no udevd, as in a
    container) the port is found by its sysfs "name" attribute and its own /dev node. The
    monitor gives prompt updates; the re-check every `recheck_s` covers a monitor that cannot
    be opened or that never hears anything because udevd is not running.
    """

    def __init__(
        self,
        path: str = constants.DEFAULT_DEVICE,
        *,
        port_name: str | None = None,
        recheck_s: float = 5.0,
    ) -> None:
        self.path = path
        self.port_name = port_name or os.path.basename(path)
        self.present = False
        self.node: str | None = None
        self._recheck_s = recheck_s
        self._callbacks: list[Callable[[bool], None]] = []
        self._context: Any = None
        self._monitor: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def on_change(self, callback: Callable[[bool], None]) -> None:
        self._callbacks.append(callback)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            import pyudev

            self._context = pyudev.Context()
            monitor = pyudev.Monitor.from_netlink(self._context)
            monitor.filter_by(SUBSYSTEM)
            monitor.start()
        except Exception as e:  # pyudev raises OSError, ImportError or its own errors here
            log.warning("no udev monitor for %s (%s): re-checking every %g s",
                        self.path, e, self._recheck_s)
        else:
            self._monitor = monitor
            self._loop.add_reader(monitor.fileno(), self._on_events)
        self._check("start")
        self._schedule_recheck()
        log.info("device %s %s%s", self.path, "present" if self.present else "absent",
                 f" at {self.node}" if self.node and self.node != self.path else "")

    def _on_events(self) -> None:
        assert self._monitor is not None
        actions = []
        for _ in range(MAX_EVENTS_PER_WAKE):
            try:
                device = self._monitor.poll(timeout=0)
            except Exception as e:  # a broken netlink socket: fall back to the timer
                log.warning("udev monitor failed (%s): re-checking every %g s", e,
                            self._recheck_s)
                self._stop_monitor()
                break
            if device is None:
                break
            actions.append(f"{device.action} {device.sys_name}")
        if actions:
            self._check("udev: " + ", ".join(actions[:4]))

    def _schedule_recheck(self) -> None:
        if self._closed or self._loop is None:
            return
        self._timer = self._loop.call_later(self._recheck_s, self._recheck)

    def _recheck(self) -> None:
        self._timer = None
        self._check("re-check")
        self._schedule_recheck()

    def resolve(self) -> str | None:
        """The path to open for the port, or None when it is not there."""
        if os.path.exists(self.path):
            return self.path
        if self._context is None:
            return None
        want = self.port_name.encode()
        try:
            for dev in self._context.list_devices(subsystem=SUBSYSTEM):
                node = dev.device_node
                if not node:
                    continue
                if self.path in dev.device_links or dev.attributes.get("name") == want:
                    if os.path.exists(node):
                        return node
        except Exception as e:  # sysfs entries vanish while we enumerate them
            log.debug("enumerating %s devices: %s", SUBSYSTEM, e)
        return None

    def _check(self, why: str) -> None:
        node = self.resolve()
        present = node is not None
        changed = present != self.present
        self.node = node
        if not changed:
            return
        self.present = present
        log.info("device %s %s (%s)", self.path,
                 f"present at {node}" if present else "gone", why)
        for cb in list(self._callbacks):
            try:
                cb(present)
            except Exception:
                log.exception("device-change callback failed")

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._monitor.fileno())
            self._monitor = None  # pyudev closes the socket when the monitor is collected

    async def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stop_monitor()
