"""The service's delegated cgroup (v2): one child cgroup per worker and Xauthority reader, with its
limits, joined before exec, and killed whole when that process ends or is stopped."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

# How long a kill may take to empty a cgroup (cgroup.kill is synchronous for the signal; the
# processes then exit on their own time, a few ms unless the machine is swapping).
KILL_TIMEOUT_S = 2.0
_POLL_S = 0.01
CONTROLLERS = ("pids", "memory")
# The leaf the service moves itself into: cgroup v2 lets only a cgroup without processes enable
# controllers for its children.
SERVICE_LEAF = "service"


class CgroupError(OSError):
    """A child cgroup could not be made or given its limits."""


@dataclass(frozen=True)
class Limits:
    pids: int  # tasks (threads count)
    memory: int  # bytes, swap not counted (memory.swap.max is 0)


# Measured: the real worker streaming Xvfb with the whole screen changing, fps 30, is one task
# with a peak RSS of 45-51 MB at 1920x1080 and 94-124 MB at 3840x2160 (Pillow 11 / Debian 12's
# 9.4). Room for twice the 4K peak; a worker does not fork. 16 of them and 32 readers fit the
# unit's MemoryMax=/TasksMax= (tests/test_workerprocess.py checks the sums).
WORKER_LIMITS = Limits(pids=16, memory=256 << 20)
# A Wayland (screencast) worker runs GLib and GStreamer in-process: besides Python's thread it has
# GLib's main context and GDBus worker threads, GLib's GTask pool (up to 10 threads while
# D-Bus calls such as mutter's run), PipeWire's thread loop and data loop, a GStreamer streaming
# thread per source and queue, the system clock's thread, and on its first start in a sandbox
# whose home is read-only gst-plugin-scanner (a child process) building GStreamer's registry:
# about 20 tasks at its busiest (counted from what each library starts; to be measured in a
# guest). 64 leaves three times that, still bounding a fork or thread
# bomb. Memory as for X11: the frames are the same size (a 3840x2160 BGRx copy is 33 MB; PipeWire's
# buffers are mutter's memfds, charged to mutter's cgroup). 16 such workers and 32 readers fit
# the unit's TasksMax=/MemoryMax= too (tests/test_workerprocess.py).
SCREENCAST_WORKER_LIMITS = Limits(pids=64, memory=256 << 20)
# A Python interpreter reading at most 64 KiB: about 10 MB. 32 verifications may run at once.
READER_LIMITS = Limits(pids=4, memory=32 << 20)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def locate(proc_cgroup: str, mountinfo: str) -> tuple[str, str] | None:
    """(cgroup path as the kernel names it, its directory) of the "0::" line of /proc/PID/cgroup
    under a cgroup2 mount of /proc/PID/mountinfo; None when there is none."""
    path = None
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            path = line[3:]
    if not path or not path.startswith("/") or path.endswith(" (deleted)"):
        return None
    best: tuple[str, str] | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or right.split()[:1] != ["cgroup2"]:
            continue
        root, mount = _unescape(fields[3]), _unescape(fields[4])
        prefix = root.rstrip("/")
        if path != root and not path.startswith(prefix + "/"):
            continue
        # The deepest mount that holds it (a ReadWritePaths= bind over a read-only /sys/fs/cgroup).
        if best is None or len(root) >= len(best[0]):
            best = (root, os.path.normpath(mount + "/" + path[len(prefix):]))
    return None if best is None else (path, best[1])


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


class Cgroup:
    """One child cgroup: created with its limits, joined by its process before exec, killed whole."""

    def __init__(self, path: str) -> None:
        self.path = path
        # Opened here, by root: the child writes it after its uid change (join()).
        self._procs_fd: int | None = os.open(os.path.join(path, "cgroup.procs"),
                                             os.O_WRONLY | os.O_CLOEXEC)
        self.removed = False

    def join(self) -> None:
        """Runs in the child between fork and exec (as preexec_fn, after its setreuid): moves it
        here before any code of its user's runs, so nothing it starts can be outside.

        Since Linux 5.16 a write to cgroup.procs is checked against the credentials of whoever
        opened the file (root, in the service), not of the writer, which is already the user.
        Until exec the child is not dumpable (the uid change made it so): its user cannot ptrace
        it in between. O_CLOEXEC: the fd is gone once the program runs."""
        assert self._procs_fd is not None
        os.write(self._procs_fd, b"0")

    def started(self) -> None:
        """The child has exec'ed (or failed to): nobody joins any more."""
        if self._procs_fd is not None:
            os.close(self._procs_fd)
            self._procs_fd = None

    def populated(self) -> bool:
        try:
            events = _read(os.path.join(self.path, "cgroup.events"))
        except FileNotFoundError:
            return False
        return "populated 1" in events.split("\n")

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in _read(os.path.join(self.path, "cgroup.procs")).split()]
        except FileNotFoundError:
            return []

    def kill_now(self) -> None:
        """SIGKILL everything in it, without waiting."""
        try:
            _write(os.path.join(self.path, "cgroup.kill"), "1")
        except FileNotFoundError:
            # Before Linux 5.14 there is no cgroup.kill: each process, until none is left (a
            # fork racing this loop is caught by the next round of kill()).
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    async def kill(self, timeout: float = KILL_TIMEOUT_S) -> bool:
        """SIGKILL everything in it, wait until it is empty, remove it; False (logged) when it
        would not empty or go within `timeout`."""
        self.started()
        if self.removed:
            return True
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.populated():
                    self.kill_now()
                else:
                    os.rmdir(self.path)
                    self.removed = True
                    return True
            except FileNotFoundError:
                self.removed = True
                return True
            except OSError as e:  # EBUSY: a task still on its way out
                err = e
            else:
                err = None
            if time.monotonic() > deadline:
                log.warning("cgroup %s %s after %.1f s; left in place", self.path,
                            "still has processes" if err is None else f"not removed ({err})",
                            timeout)
                return False
            await asyncio.sleep(_POLL_S)


class Tree:
    """A cgroup the service owns: its children are `<kind>-<n>`, each with its limits.

    holds_service: this is the service's own cgroup (from systemd's Delegate=), so the service
    first moves itself into the leaf `service`; a test points a Tree at an empty cgroup of its own.
    """

    def __init__(self, path: str, *, holds_service: bool = False) -> None:
        self.path = path
        self._ids = itertools.count(1)
        if holds_service:
            leaf = os.path.join(path, SERVICE_LEAF)
            with contextlib.suppress(FileExistsError):
                os.mkdir(leaf, 0o755)
            _write(os.path.join(leaf, "cgroup.procs"), "0")
        self.controllers = self._enable()

    def _enable(self) -> frozenset[str]:
        try:
            available = _read(os.path.join(self.path, "cgroup.controllers")).split()
        except OSError:
            available = []
        for name in CONTROLLERS:
            if name in available:
                try:
                    _write(os.path.join(self.path, "cgroup.subtree_control"), f"+{name}")
                except OSError as e:
                    log.warning("cannot enable the %s controller under %s: %s", name, self.path,
                                e.strerror)
        try:
            enabled = set(_read(os.path.join(self.path, "cgroup.subtree_control")).split())
        except OSError:
            enabled = set()
        return frozenset(enabled & set(CONTROLLERS))

    def create(self, kind: str, limits: Limits) -> Cgroup:
        """A new empty child cgroup with `limits` (those its controllers allow); CgroupError."""
        for _ in range(1000):
            path = os.path.join(self.path, f"{kind}-{next(self._ids)}")
            try:
                os.mkdir(path, 0o755)
                break
            except FileExistsError:
                continue  # left by an earlier instance: never reused
            except OSError as e:
                raise CgroupError(e.errno, f"cannot create cgroup {path}: {e.strerror}") from None
        else:
            raise CgroupError(0, f"no free cgroup name under {self.path}")
        try:
            settings = []
            if "pids" in self.controllers:
                settings.append(("pids.max", str(limits.pids)))
            if "memory" in self.controllers:
                settings += [("memory.max", str(limits.memory)),
                             # Everything it started goes when the kernel runs out for it.
                             ("memory.oom.group", "1")]
                if os.path.exists(os.path.join(path, "memory.swap.max")):
                    settings.append(("memory.swap.max", "0"))
            for name, value in settings:
                _write(os.path.join(path, name), value)
            return Cgroup(path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.rmdir(path)
            raise CgroupError(e.errno, f"cannot set up cgroup {path}: {e.strerror}") from None


def discover(proc_cgroup: str, mountinfo: str, pid: int) -> tuple[Tree | None, str]:
    """The service's own cgroup as a Tree, or None and why not (to be logged once)."""
    found = locate(proc_cgroup, mountinfo)
    if found is None:
        return None, "no cgroup v2 hierarchy holds this process"
    name, path = found
    if name == "/":
        return None, "it runs in the root cgroup (not a systemd unit of its own)"
    if not (os.access(path, os.W_OK) and os.access(os.path.join(path, "cgroup.procs"), os.W_OK)):
        return None, f"its cgroup {path} is not writable (needs Delegate= and a writable path)"
    try:
        members = {int(x) for x in _read(os.path.join(path, "cgroup.procs")).split()}
    except (OSError, ValueError) as e:
        return None, f"cannot read {path}/cgroup.procs: {e}"
    if members != {pid}:
        # A login session's scope or a shared unit: not ours to rearrange.
        return None, f"its cgroup {path} holds other processes too"
    try:
        return Tree(path, holds_service=True), ""
    except OSError as e:
        return None, f"cannot move into {path}/{SERVICE_LEAF}: {e.strerror}"


_service_tree: Tree | None = None
_looked = False


def service_tree() -> Tree | None:
    """The service's own delegated cgroup, found (and the service moved into its leaf) once."""
    global _service_tree, _looked
    if not _looked:
        _looked = True
        try:
            proc_cgroup = _read("/proc/self/cgroup")
            mountinfo = _read("/proc/self/mountinfo")
        except OSError as e:
            proc_cgroup, mountinfo = "", ""
            log.debug("cannot read /proc/self: %s", e)
        _service_tree, why = discover(proc_cgroup, mountinfo, os.getpid())
        if _service_tree is None:
            log.warning("workers and Xauthority readers get no cgroup of their own (%s): what "
                        "one starts is ended through its process group only, and a process "
                        "that leaves that group outlives it", why)
        else:
            log.info("workers and Xauthority readers run in cgroups of their own under %s "
                     "(controllers: %s)", _service_tree.path,
                     " ".join(sorted(_service_tree.controllers)) or "none")
    return _service_tree


def resolve(choice: Tree | None | Literal["auto"]) -> Tree | None:
    return service_tree() if choice == "auto" else choice
