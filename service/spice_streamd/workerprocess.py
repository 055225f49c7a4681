"""Starting a worker (and, for the verifier, the Xauthority reader) as a session's user: its uid, gid
and groups, never a root group, in a cgroup of its own; knowing when it exits; ending it and all it
started."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from spice_stream_common.exitcodes import ExitCode

from . import cgroup, errors
from .cgroup import Cgroup
from .runtimedir import session_bus_address

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
STREAM_LIMIT = 64 * 1024  # asyncio's own default for a subprocess's stream readers


@dataclass(frozen=True)
class WorkerTarget:
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups, never containing 0
    display: str  # X11 only ("" for Wayland)
    xauthority: str  # X11 only ("" for Wayland)
    vt: int
    kind: str = "x11"  # "x11", "wayland" (--source screencast) or "scanout" (the display itself)
    runtime_dir: str = ""  # Wayland: logind's RuntimePath of the uid, checked by the verifier
    # Wayland: the registration's helper connection. Its user can stop the capture (GNOME's Stop:
    # exit STOPPED_BY_USER) and only a new registration starts it again, so a Wayland target is
    # one registration's; an X11 target is the display's, whichever registration names it.
    registration: str = ""
    # Wayland: the logind session the registration was verified for; the worker reads its
    # LockedHint (gnome-shell closes screen casts on the lock screen, and Closed says not why).
    session_id: str = ""
    # Scanout: the DRM device the service opens for the reader (which runs as the service's own
    # unprivileged user, not a session's).
    card: str = ""

    @property
    def wayland(self) -> bool:
        return self.kind == "wayland"

    @property
    def scanout(self) -> bool:
        return self.kind == "scanout"

    @property
    def label(self) -> str:
        """What log lines show for it: the display, "wayland" or "scanout"."""
        return self.kind if self.wayland or self.scanout else self.display


def check_target(target: WorkerTarget) -> None:
    """Refuse a target that would hand the worker a root group (it must keep none)."""
    if 0 in target.groups:
        raise errors.PermissionDenied(
            f"worker for uid {target.uid} on VT {target.vt} would keep root group 0"
        )
    if target.gid == 0 and target.uid != 0:
        raise errors.PermissionDenied(
            f"worker for uid {target.uid} on VT {target.vt} would run with gid 0"
        )
    if target.uid < 0 or target.gid < 0 or any(g < 0 for g in target.groups):
        raise errors.InvalidArgument(f"negative id in worker target for VT {target.vt}")


def exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    try:
        return f"exit {rc} ({ExitCode(rc).name})"
    except ValueError:
        return f"exit {rc}"


def worker_env(target: WorkerTarget) -> dict[str, str]:
    """A clean environment, nothing of ours: for X11 the display and its cookie; for Wayland the
    user's runtime directory, its session bus (where mutter's ScreenCast and the user's PipeWire
    are) and its logind session (XDG_SESSION_ID), no DISPLAY (GNOME's Xwayland is not what is
    captured); the user's home."""
    env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8"}
    if target.scanout:
        return env | {"HOME": "/"}
    if target.wayland:
        env["XDG_RUNTIME_DIR"] = target.runtime_dir
        env["DBUS_SESSION_BUS_ADDRESS"] = session_bus_address(target.runtime_dir)
        if target.session_id:
            env["XDG_SESSION_ID"] = target.session_id
    else:
        env["DISPLAY"] = target.display
        env["XAUTHORITY"] = target.xauthority
    try:
        home = pwd.getpwuid(target.uid).pw_dir
    except KeyError:
        home = ""
    if home:
        env["HOME"] = home
    return env


class _ExitProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """asyncio's own protocol for a subprocess with streams, plus the moment the process exits."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=STREAM_LIMIT, loop=loop)
        self.exited: asyncio.Future[int] = loop.create_future()
        self._process: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._process = transport  # type: ignore[assignment]

    def process_exited(self) -> None:
        # Called when the child watcher reaps it, whatever became of its pipes.
        assert self._process is not None
        rc = self._process.get_returncode()
        super().process_exited()
        if not self.exited.done() and rc is not None:
            self.exited.set_result(rc)


class UserProcess:
    """A program started by start_as(): its process, its exit as the process reports it, and
    what it started (its cgroup, or its process group without one)."""

    def __init__(self, proc: asyncio.subprocess.Process, transport: asyncio.SubprocessTransport,
                 exited: asyncio.Future[int], cgroup: Cgroup | None) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.cgroup = cgroup
        self._transport = transport
        self._exited = exited

    async def exited(self) -> int:
        """Its exit status once the process itself has exited. Not proc.wait(): in Python 3.11 it
        also waits until every pipe is closed, and a process it started in a session of its own
        (setsid) can hold its stderr open for ever."""
        return await asyncio.shield(self._exited)

    def kill_all(self) -> None:
        """SIGKILL it and everything it started, now."""
        if self.cgroup is not None and not self.cgroup.removed:
            self.cgroup.kill_now()
        else:
            self._kill_group()

    def _kill_group(self) -> None:
        # Its process group keeps its id while any member lives, so this reaches no one else
        # unless the group is gone and the id went round the whole pid space since.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    async def end_rest(self) -> None:
        """After its exit: what it started ends too. Its cgroup is killed, emptied and removed;
        without one, its process group is killed (a process that left it with setsid stays)."""
        if self.cgroup is not None:
            await self.cgroup.kill()
        else:
            self._kill_group()

    def close_pipes(self) -> None:
        """Our ends of its pipes: a process that escaped end_rest() may hold theirs open."""
        self._transport.close()


async def start_as(argv: Sequence[str], *, uid: int, gid: int, groups: Sequence[int],
                   env: dict[str, str], stdout: int, stderr: int, kind: str,
                   limits: cgroup.Limits, cgroups: cgroup.Tree | None,
                   pass_fds: Sequence[int] = ()) -> UserProcess:
    """Start `argv` as uid/gid/groups (this process's own identity when not root and the same
    uid), in a session of its own, in a new cgroup `kind-N` of `cgroups` (joined before exec),
    stdin /dev/null, cwd /, only `pass_fds` inherited.

    Raises errors.PermissionDenied when this process cannot become that user, OSError
    (cgroup.CgroupError included) or subprocess.SubprocessError when the start fails."""
    kwargs: dict = {}
    if os.geteuid() == 0:
        # extra_groups always, even empty: otherwise the child keeps root's groups.
        kwargs = {"user": uid, "group": gid, "extra_groups": list(groups)}
    elif uid != os.geteuid():
        raise errors.PermissionDenied(f"not root: cannot run a program as uid {uid}")
    cg = cgroups.create(kind, limits) if cgroups is not None else None
    if cg is not None:
        kwargs["preexec_fn"] = cg.join
    loop = asyncio.get_running_loop()
    protocol: _ExitProtocol | None = None

    def make_protocol() -> _ExitProtocol:
        nonlocal protocol
        protocol = _ExitProtocol(loop)
        return protocol

    try:
        transport, _ = await loop.subprocess_exec(
            make_protocol, *argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
            env=env, cwd="/", close_fds=True, pass_fds=tuple(pass_fds), start_new_session=True,
            **kwargs)
    except BaseException:
        if cg is not None:
            await cg.kill()
        raise
    finally:
        if cg is not None:
            cg.started()
    assert protocol is not None
    proc = asyncio.subprocess.Process(transport, protocol, loop)
    return UserProcess(proc, transport, protocol.exited, cg)


async def spawn(argv: list[str], target: WorkerTarget, channel_fd: int, *,
                cgroups: cgroup.Tree | None = None, extra_fds: Sequence[int] = ()) -> UserProcess:
    """Start `argv` as the target's user, with `channel_fd` (and `extra_fds`: the scanout
    reader's device and grant socket) as its only extra fds, in a cgroup `worker-N` of `cgroups`
    with WORKER_LIMITS (SCREENCAST_WORKER_LIMITS for Wayland).

    Raises errors.PermissionDenied when this process cannot become that user, OSError or
    subprocess.SubprocessError when the start fails."""
    check_target(target)
    limits = cgroup.SCREENCAST_WORKER_LIMITS if target.wayland else cgroup.WORKER_LIMITS
    # stderr is a pipe the service reads (workerlog): inherited, it would be the service's own
    # journal stream, where the worker's user could write lines that pass for the service's.
    # stdout too, and nothing of the service reads it: /dev/null.
    return await start_as(argv, uid=target.uid, gid=target.gid, groups=target.groups,
                          env=worker_env(target), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, pass_fds=(channel_fd, *extra_fds), kind="worker",
                          limits=limits, cgroups=cgroups)


async def end(proc: asyncio.subprocess.Process, wait: asyncio.Future[int],
              grace_s: float) -> tuple[int, bool]:
    """SIGTERM, SIGKILL after `grace_s`; (exit status, whether it had to be killed).

    SIGCONT follows SIGTERM: its user may have stopped it, and a stopped process never acts on a
    SIGTERM (SIGKILL works on it anyway)."""
    killed = False
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)
        try:
            await asyncio.wait_for(asyncio.shield(wait), grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            killed = True
    return await wait, killed

