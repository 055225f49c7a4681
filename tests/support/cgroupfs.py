"""A scratch cgroup v2 directory for a test (the service's cgroup code is pointed at it), and
questions about processes: alive, in which cgroup."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def cgroup2_mount() -> str | None:
    """A writable cgroup2 mount of the whole hierarchy (root "/"): /sys/fs/cgroup on a pure v2
    machine, /sys/fs/cgroup/unified on a hybrid one."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if right.split()[:1] == ["cgroup2"] and len(fields) >= 5 and fields[3] == "/":
            if os.access(fields[4], os.W_OK):
                return fields[4]
    return None


def _empty_and_remove(path: str, timeout: float = 5.0) -> None:
    for name in sorted(os.listdir(path)):
        sub = os.path.join(path, name)
        if os.path.isdir(sub):
            _empty_and_remove(sub, timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(os.path.join(path, "cgroup.kill"), "w") as f:
                f.write("1")
        except OSError:
            pass
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@contextmanager
def scratch_cgroup() -> Iterator[str]:
    """An empty cgroup of this test's own, emptied (cgroup.kill) and removed with all it holds."""
    mount = cgroup2_mount()
    if mount is None:
        pytest.skip("no writable cgroup v2 hierarchy")
    path = os.path.join(mount, f"spice-streamd-test-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(path)
    try:
        yield path
    finally:
        _empty_and_remove(path)


def alive(pid: int) -> bool:
    """Exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def cgroup_of(pid: int) -> str | None:
    """The pid's cgroup v2 path ("0::" line), None once it is gone."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def relative(mount_path: str) -> str:
    """/sys/fs/cgroup/unified/a/b -> /a/b, as /proc/PID/cgroup names it."""
    mount = cgroup2_mount()
    assert mount is not None
    return "/" + os.path.relpath(mount_path, mount)
