"""Verifies a RegisterSession call: polkit, the caller's own logind session, the display and the
Xauthority (read with the caller's identity, never as root)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol

from . import constants
from .caller import Caller
from .errors import InvalidArgument, NotInSession
from .readfile import EXIT_REFUSED
from .sessions import Registration
from .xauthority import MAX_XAUTHORITY_BYTES, display_number, require_cookie_for

READ_TIMEOUT_S = 5.0


class SessionLookup(Protocol):
    async def session_of_pid(self, pid: int): ...


async def read_as_caller(caller: Caller, path: str, timeout: float = READ_TIMEOUT_S) -> bytes:
    """The file's bytes, read by a child running with the caller's uid and groups."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path or len(path) > 4096:
        raise InvalidArgument("the Xauthority path must be an absolute path")
    argv = [sys.executable, "-I", "-m", "spice_streamd.readfile", path]
    kwargs: dict = {}
    if os.geteuid() == 0:
        kwargs = {"user": caller.uid, "group": caller.gid, "extra_groups": list(caller.groups)}
    elif caller.uid != os.geteuid():
        # Unprivileged (a development run): we cannot become the caller, so we must not read it.
        raise InvalidArgument("this service instance cannot read another user's Xauthority")
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd="/", env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        close_fds=True, **kwargs)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise InvalidArgument(f"reading the Xauthority file {path} took longer than "
                              f"{timeout:g} s") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode == EXIT_REFUSED:
        reason = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["cannot be read"]
        raise InvalidArgument(f"the Xauthority file {path} {reason[0][:200]}")
    if proc.returncode != 0 or len(out) > MAX_XAUTHORITY_BYTES:
        raise InvalidArgument(f"the Xauthority file {path} could not be read "
                              f"(reader exited with {proc.returncode})")
    return out


class RegistrationVerifier:
    def __init__(self, *, authorize: Callable[[str, str], Awaitable[None]],
                 sessions: SessionLookup,
                 read_file: Callable[[Caller, str], Awaitable[bytes]] = read_as_caller) -> None:
        self._authorize = authorize
        self._sessions = sessions
        self._read_file = read_file

    async def verify(self, caller: Caller, display: str, xauthority: str) -> Registration:
        """A Registration for this caller, or a ServiceError saying why not (in the contract's order)."""
        await self._authorize(caller.sender, constants.METHOD_ACTIONS["RegisterSession"])

        # Raises NotInSession or AuthorityUnavailable itself (sessioninfo's contract).
        info = await self._sessions.session_of_pid(caller.pid)
        if info.uid != caller.uid:
            raise NotInSession(f"process {caller.pid} is in a session of uid {info.uid}, "
                               f"not of uid {caller.uid}")
        if info.kind == "wayland":
            raise NotInSession(f"session {info.session_id or '?'} on VT {info.vt} is a Wayland "
                               "session; only X11 sessions can be streamed")

        display_number(display)  # raises InvalidArgument with the reason
        data = await self._read_file(caller, xauthority)
        require_cookie_for(data, display)

        return Registration(sender=caller.sender, uid=caller.uid, gid=caller.gid,
                            groups=caller.groups, pid=caller.pid, session_id=info.session_id,
                            vt=info.vt, display=display, xauthority=xauthority)
