"""A Wayland session's runtime directory (logind's User.RuntimePath, never the caller's word) and
its session bus socket, looked at with the user's own file-system identity.

The service runs as root without CAP_DAC_OVERRIDE or CAP_DAC_READ_SEARCH (the unit's bounding
set), so as root it could not even look into a user's 0700 /run/user/UID; and it must never act on
a user's files with root's rights anyway. The check runs in a thread of its own whose fsuid and
fsgid are the user's (setfsuid(2) and setfsgid(2) change only the calling thread: glibc does not
broadcast them as it does setuid): every lookup is the user's. Nothing is opened or read: the
path is walked component by component with O_PATH | O_NOFOLLOW (no symbolic link anywhere), the
directory must be the user's, and `bus` in it must be a socket (lstat) owned by the user.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import stat
import threading

from spice_stream_common.untrusted import shown

from .errors import AuthorityUnavailable, NotInSession

# logind's is "/run/user/UID"; anything as long as PATH_MAX is not one.
MAX_RUNTIME_CHARS = 4095
CHECK_TIMEOUT_S = 5.0
BUS_SOCKET = "bus"
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NO_ID = 0xFFFFFFFF  # (uid_t)-1: setfsuid(-1) changes nothing and returns the current fsuid

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setfsuid.argtypes = [ctypes.c_uint32]
_libc.setfsuid.restype = ctypes.c_int
_libc.setfsgid.argtypes = [ctypes.c_uint32]
_libc.setfsgid.restype = ctypes.c_int


def session_bus_address(runtime_dir: str) -> str:
    """The session bus of a systemd user instance (dbus-user-session) in that runtime dir."""
    return f"unix:path={runtime_dir}/{BUS_SOCKET}"


def _set_fs_ids(uid: int, gid: int) -> None:
    """This thread's fsuid and fsgid; raises OSError when the kernel did not take them."""
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)
    if _libc.setfsuid(_NO_ID) != uid or _libc.setfsgid(_NO_ID) != gid:
        raise OSError(errno.EPERM, f"cannot take uid {uid} gid {gid} for file lookups")


def _refuse_path(runtime: str, uid: int) -> None:
    if (not runtime.startswith("/") or runtime == "/" or "\0" in runtime
            or len(runtime) > MAX_RUNTIME_CHARS or os.path.normpath(runtime) != runtime):
        raise NotInSession(f"logind's runtime directory {shown(runtime)} of uid {uid} is not a "
                           "plain absolute path")


def check(runtime: str, uid: int) -> None:
    """Raises NotInSession unless `runtime` is a directory of uid's, reached without any symbolic
    link, holding the session bus socket `bus`, owned by uid. Runs with this thread's identity:
    run it through check_as_user()."""
    _refuse_path(runtime, uid)
    fd = os.open("/", _DIR_FLAGS)
    try:
        for part in runtime.strip("/").split("/"):
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    raise NotInSession(f"uid {uid}'s runtime directory {shown(runtime)} does "
                                       "not exist (is the user logged in?)") from None
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise NotInSession(f"uid {uid}'s runtime directory {shown(runtime)} is not "
                                       "a directory reached without symbolic links") from None
                if e.errno == errno.EACCES:
                    raise NotInSession(f"uid {uid} cannot reach its runtime directory "
                                       f"{shown(runtime)}") from None
                raise
            os.close(fd)
            fd = nfd
        owner = os.fstat(fd).st_uid
        if owner != uid:
            raise NotInSession(f"the runtime directory {shown(runtime)} belongs to uid {owner}, "
                               f"not to uid {uid}")
        bus = f"{runtime}/{BUS_SOCKET}"
        try:
            st = os.stat(BUS_SOCKET, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            raise NotInSession(
                f"no session bus at {shown(bus, quoted=False)}: the systemd user instance "
                "(dbus-user-session) is needed") from None
        except PermissionError:
            raise NotInSession(f"uid {uid} cannot look into its runtime directory "
                               f"{shown(runtime)}") from None
        if stat.S_ISLNK(st.st_mode):
            raise NotInSession(f"{shown(bus)} is a symbolic link, not the session bus socket")
        if not stat.S_ISSOCK(st.st_mode):
            raise NotInSession(f"{shown(bus)} is not a socket: no session bus there (the "
                               "systemd user instance, dbus-user-session, is needed)")
        if st.st_uid != uid:
            raise NotInSession(f"the session bus socket {shown(bus)} belongs to uid "
                               f"{st.st_uid}, not to uid {uid}")
    finally:
        os.close(fd)


def _check_as(runtime: str, uid: int, gid: int) -> None:
    if os.geteuid() != 0:
        if uid != os.geteuid():
            # A development run: we cannot look as that user, so we do not look at all.
            raise NotInSession("this service instance cannot look into another user's runtime "
                               "directory")
        check(runtime, uid)
        return
    _set_fs_ids(uid, gid)
    try:
        check(runtime, uid)
    finally:
        # The thread ends after this; restored all the same (root first: CAP_SETUID is kept).
        _libc.setfsuid(0)
        _libc.setfsgid(os.getegid())


async def check_as_user(runtime: str, uid: int, gid: int,
                        timeout: float = CHECK_TIMEOUT_S) -> None:
    """check() with uid/gid as the file-system identity, in a thread of its own that ends with it
    (never a pooled thread, which could keep the identity). NotInSession as check() says;
    AuthorityUnavailable when the lookups take longer than `timeout`."""
    loop = asyncio.get_running_loop()
    # The thread hands over text, never its exception: raised again here, an exception from
    # there would tie the calling frames (the D-Bus call) into a cycle with the thread's frame.
    done: asyncio.Future[tuple[str, str]] = loop.create_future()

    def deliver(outcome: tuple[str, str]) -> None:
        if not done.done():
            done.set_result(outcome)

    def work() -> None:
        try:
            _check_as(runtime, uid, gid)
            outcome = ("ok", "")
        except NotInSession as e:
            outcome = ("refused", str(e))
        except Exception as e:  # noqa: BLE001 - reported through the event loop
            outcome = ("failed", f"{type(e).__name__}: {e}")
        try:
            loop.call_soon_threadsafe(deliver, outcome)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    threading.Thread(target=work, name=f"runtime-dir-check-{uid}", daemon=True).start()
    try:
        kind, text = await asyncio.wait_for(asyncio.shield(done), timeout)
    except TimeoutError:
        raise AuthorityUnavailable(f"looking into {shown(runtime)} took longer than "
                                   f"{timeout:g} s") from None
    if kind == "refused":
        raise NotInSession(text)
    if kind == "failed":
        raise NotInSession(f"cannot check uid {uid}'s runtime directory {shown(runtime)}: {text}")
