"""Verifies a registration: polkit, the caller's own logind session, and then for RegisterSession
the display and the Xauthority (read with the caller's identity, never as root), for
RegisterWaylandSession the session's Type and logind's runtime directory with its session bus
(looked at with the caller's identity: runtimedir)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, Protocol

from spice_stream_common import constants
from spice_stream_common.untrusted import shown
from spice_stream_common.xauthority import (
    MAX_XAUTHORITY_BYTES,
    BadXauthority,
    display_number,
    require_cookie_for,
)

from . import cgroup, runtimedir, workerprocess
from .caller import Caller
from .errors import AuthorityUnavailable, InvalidArgument, NotInSession, StartFailed
from .readfile import EXIT_REFUSED
from .sessioninfo import SessionInfo
from .sessions import Registration

# The reader is a Python interpreter started as the caller: seconds on a guest emulated
# instruction by instruction, or while the session's login keeps the disk busy (seen in the
# real-VM suite at 5 s).
READ_TIMEOUT_S = 15.0
# The reader runs as the caller, so the caller can replace or drive it (ptrace): read no more than
# a file we would accept plus one byte, and a line or so of its reason for refusing.
MAX_REASON_BYTES = 4096
# The reader's command line; the path is appended. A test may substitute a misbehaving reader.
READER_ARGV: tuple[str, ...] = (sys.executable, "-I", "-m", "spice_streamd.readfile")


class SessionLookup(Protocol):
    async def session_of_pid(self, pid: int): ...

    async def runtime_path(self, uid: int) -> str: ...


async def _read_at_most(stream: asyncio.StreamReader, limit: int) -> bytes:
    """Up to `limit` bytes of `stream` (fewer at end of file): never more in memory than that."""
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        chunk = await stream.read(limit - total)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


async def read_as_caller(caller: Caller, path: str, timeout: float = READ_TIMEOUT_S, *,
                         reader: Sequence[str] = READER_ARGV,
                         cgroups: cgroup.Tree | None | Literal["auto"] = "auto") -> bytes:
    """The file's bytes, read by a child running with the caller's uid and groups, in a cgroup
    of its own (cgroups: as WorkerSupervisor's) that is killed with everything in it afterwards."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path or len(path) > 4096:
        raise InvalidArgument("the Xauthority path must be an absolute path")
    if os.geteuid() != 0 and caller.uid != os.geteuid():
        # Unprivileged (a development run): we cannot become the caller, so we must not read it.
        raise InvalidArgument("this service instance cannot read another user's Xauthority")
    try:
        child = await workerprocess.start_as(
            [*reader, path], uid=caller.uid, gid=caller.gid, groups=caller.groups,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, kind="reader", limits=cgroup.READER_LIMITS,
            cgroups=cgroup.resolve(cgroups))
    except (OSError, subprocess.SubprocessError) as e:
        # The fork, its cgroup, the change of identity or the exec failed (seen: systemd 255+
        # dropping CAP_SETUID, setreuid() EPERM): one refusal line naming it, not an unexpected
        # error's traceback.
        raise StartFailed(f"cannot start the Xauthority reader as uid {caller.uid}: "
                          f"{type(e).__name__}: {e}") from None
    proc = child.proc

    async def collect() -> tuple[bytes, bytes]:
        assert proc.stdout is not None and proc.stderr is not None
        errors = asyncio.ensure_future(_read_at_most(proc.stderr, MAX_REASON_BYTES))
        try:
            out = await _read_at_most(proc.stdout, MAX_XAUTHORITY_BYTES + 1)
            if len(out) > MAX_XAUTHORITY_BYTES:
                child.kill_all()  # more than any file we accept: stop it here, whatever it does
                return out, b""
            err = await errors
        finally:
            errors.cancel()
        await child.exited()
        return out, err

    try:
        out, err = await asyncio.wait_for(collect(), timeout)
    except TimeoutError:
        # "Not now" rather than "no": a helper asks again later (a slow start, a busy disk).
        raise AuthorityUnavailable(f"reading the Xauthority file {shown(path)} took longer "
                                   f"than {timeout:g} s") from None
    finally:
        # It and whatever it started go (its cgroup, or its process group), and so do the
        # pipes, which a process it started in a session of its own could hold open for ever.
        if proc.returncode is None:
            child.kill_all()
        await child.exited()
        await child.end_rest()
        child.close_pipes()
    if len(out) > MAX_XAUTHORITY_BYTES:
        raise InvalidArgument(f"the Xauthority file {shown(path)} is larger than "
                              f"{MAX_XAUTHORITY_BYTES} bytes")
    if proc.returncode == EXIT_REFUSED:
        # The reason comes from a process the caller controls: escaped like any caller text.
        lines = err.decode("utf-8", "replace").strip().splitlines()
        reason = shown(lines[-1], 200, quoted=False) if lines else "cannot be read"
        raise InvalidArgument(f"the Xauthority file {shown(path)} {reason}")
    if proc.returncode != 0:
        raise InvalidArgument(f"the Xauthority file {shown(path)} could not be read "
                              f"(reader exited with {proc.returncode})")
    return out


class RegistrationVerifier:
    def __init__(self, *, authorize: Callable[[str, str], Awaitable[None]],
                 sessions: SessionLookup,
                 read_file: Callable[[Caller, str], Awaitable[bytes]] = read_as_caller,
                 check_runtime: Callable[[str, int, int], Awaitable[None]] =
                 runtimedir.check_as_user,
                 require_active: bool = False) -> None:
        """require_active: refuse an X11 session that is not seat0's active one at registration.
        Off by default: a session in the background (its VT not in front) registers when the
        service restarts and is streamed only once its VT comes to the front, which makes it the
        active session; turning it on needs helpers that register once their session is active.
        A Wayland session must always be the active one (its helper registers again when it
        becomes active).
        check_runtime(runtime_dir, uid, gid): raises unless the dir holds uid's session bus."""
        self._authorize = authorize
        self._sessions = sessions
        self._read_file = read_file
        self._check_runtime = check_runtime
        self._require_active = require_active

    async def _own_session(self, caller: Caller, method: str) -> tuple[SessionInfo, str]:
        """polkit's answer, then logind's view of the caller's own session: the same checks for
        both kinds of registration. (the session, how to name it in a refusal)"""
        await self._authorize(caller.sender, constants.METHOD_ACTIONS[method])

        # Raises NotInSession or AuthorityUnavailable itself (sessioninfo's contract).
        info = await self._sessions.session_of_pid(caller.pid)
        if info.uid != caller.uid:
            raise NotInSession(f"process {caller.pid} is in a session of uid {info.uid}, "
                               f"not of uid {caller.uid}")
        # polkit's rule decides who may ask; logind's own view of the session decides where the
        # stream may go, so a loose polkit rule cannot give the port to a remote session.
        where = f"session {shown(info.session_id or '?', 40, quoted=False)} on VT {info.vt}"
        if info.remote:
            raise NotInSession(f"{where} is a remote session; only a local one can be streamed")
        if info.seat != "seat0":
            raise NotInSession(f"{where} is on seat {shown(info.seat, 40)}, not seat0; only "
                               "seat0 has the VTs and the stream port")
        if info.closing:
            # A logged-out session's leftover processes: its VT may already hold a new session.
            raise NotInSession(f"{where} has ended (logind state closing)")
        return info, where

    async def verify(self, caller: Caller, display: str, xauthority: str) -> Registration:
        """A Registration for this caller, or a ServiceError saying why not (in the contract's order)."""
        info, where = await self._own_session(caller, "RegisterSession")
        if self._require_active and not info.active:
            raise NotInSession(f"{where} is not the active session; register once it is")
        if info.kind == "wayland":
            raise NotInSession(f"{where} is a Wayland session: it registers with "
                               "RegisterWaylandSession, not RegisterSession (X11 only)")

        try:
            display_number(display)
            data = await self._read_file(caller, xauthority)
            require_cookie_for(data, display)
        except BadXauthority as exc:
            raise InvalidArgument(str(exc)) from None

        return Registration(sender=caller.sender, uid=caller.uid, gid=caller.gid,
                            groups=caller.groups, pid=caller.pid, session_id=info.session_id,
                            vt=info.vt, display=display, xauthority=xauthority)

    async def verify_wayland(self, caller: Caller) -> Registration:
        """A Wayland Registration for this caller (RegisterWaylandSession; its options were
        checked by the D-Bus adapter), or a ServiceError saying why not.

        As strict as verify(): the caller's own session, local, on seat0, not closing; then it
        must be a Wayland session and seat0's active one, and the runtime directory is logind's
        (never the caller's), holding the user's session bus socket."""
        info, where = await self._own_session(caller, "RegisterWaylandSession")
        if info.session_id is None:
            # The /proc fallback knows a VT, not what runs on it nor where its session bus is.
            raise NotInSession("without logind the service cannot tell a Wayland session nor "
                               "find its session bus: Wayland sessions need systemd-logind")
        if info.kind != "wayland":
            raise NotInSession(f"{where} is not a Wayland session (logind type "
                               f"{shown(info.kind, 20)}); an X11 session registers with "
                               "RegisterSession")
        if not info.active:
            raise NotInSession(f"{where} is not seat0's active session; register once it is")
        runtime = await self._sessions.runtime_path(caller.uid)
        await self._check_runtime(runtime, caller.uid, caller.gid)
        return Registration(sender=caller.sender, uid=caller.uid, gid=caller.gid,
                            groups=caller.groups, pid=caller.pid, session_id=info.session_id,
                            vt=info.vt, display="", xauthority="", kind="wayland",
                            runtime_dir=runtime)
