"""Starting a worker as the session's user (its uid, gid and groups, never a root group) and ending it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
from dataclasses import dataclass

from spice_stream_worker.errors import ExitCode

from . import errors

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class WorkerTarget:
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups, never containing 0
    display: str
    xauthority: str
    vt: int


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
    """A clean environment: the display and its cookie, the user's home, nothing of ours."""
    env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "DISPLAY": target.display,
           "XAUTHORITY": target.xauthority}
    try:
        home = pwd.getpwuid(target.uid).pw_dir
    except KeyError:
        home = ""
    if home:
        env["HOME"] = home
    return env


async def spawn(argv: list[str], target: WorkerTarget, channel_fd: int) -> asyncio.subprocess.Process:
    """Start `argv` as the target's user, with `channel_fd` as its only extra fd.

    Raises errors.PermissionDenied when this process cannot become that user, OSError or
    subprocess.SubprocessError when the start fails."""
    check_target(target)
    kwargs: dict = {}
    if os.geteuid() == 0:
        # extra_groups always, even empty: otherwise the child keeps root's groups.
        kwargs = {"user": target.uid, "group": target.gid, "extra_groups": list(target.groups)}
    elif target.uid != os.geteuid():
        raise errors.PermissionDenied(f"not root: cannot run a worker as uid {target.uid}")
    # stderr is a pipe the service reads (workerlog): inherited, it would be the service's own
    # journal stream, where the worker's user could write lines that pass for the service's.
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=worker_env(target),
        cwd="/",
        pass_fds=(channel_fd,),
        start_new_session=True,
        **kwargs,
    )


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

