"""Directories root may reuse: every component root-owned, not group/other-writable, not a symlink.

Used by .ci/dev (run by path with /usr/bin/python3 -I, before any virtualenv exists: stdlib only)
and by the VM suite's log directory. Each component is opened relative to its parent's descriptor
with O_NOFOLLOW and checked with fstat, so nothing can be swapped between the check and the use;
once a directory passes, only root can change what is in it.

    python3 -I tests/support/safedir.py ensure DIR [SUBDIR...]

creates DIR (mode 0755) if it is absent, then checks DIR and each SUBDIR (relative to DIR) that
exists; exit status 2 and the reason (one line) on stderr if anything is refused.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import PurePosixPath

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeDir(Exception):
    """A directory root must not use: another user could have planted or could change it."""


def _parts(path: str | os.PathLike[str]) -> tuple[str, ...]:
    p = PurePosixPath(os.fspath(path))
    if not p.is_absolute() or any(part in (".", "..") for part in p.parts) or "\0" in str(p):
        raise UnsafeDir(f"{path}: expected an absolute path without '.' or '..'")
    return p.parts[1:]


def _check(fd: int, shown: str, *, allow_shared: bool = False) -> None:
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDir(f"{shown} is not a directory")
    if st.st_uid != 0:
        raise UnsafeDir(f"{shown} is owned by uid {st.st_uid}, not root")
    if st.st_mode & 0o022 and not allow_shared:
        raise UnsafeDir(f"{shown} is writable by group or others (mode {st.st_mode & 0o7777:04o})")


def _open_child(parent: int, name: str, shown: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        # Linux answers ENOTDIR for a symlink opened with O_DIRECTORY | O_NOFOLLOW: name it.
        try:
            link = stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
        except OSError:
            link = e.errno == errno.ELOOP
        what = "a symbolic link" if link else "not a directory"
        raise UnsafeDir(f"{shown} is {what}") from None


def open_checked(path: str | os.PathLike[str]) -> int:
    """A descriptor of directory `path` (the caller closes it), opened from / one component at a
    time: every component a real directory (no symlink), owned by root, not writable by group or
    others. UnsafeDir if not; FileNotFoundError if a component is missing."""
    parts = _parts(path)
    fd = os.open("/", _DIR_FLAGS)
    shown = "/"
    try:
        _check(fd, shown)
        for name in parts:
            shown = os.path.join(shown, name)
            child = _open_child(fd, name, shown)
            os.close(fd)
            fd = child
            _check(fd, shown)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_dir(path: str | os.PathLike[str]) -> None:
    """UnsafeDir (or FileNotFoundError) unless `path` is a directory only root controls."""
    os.close(open_checked(path))


def make_dir(parent: int, name: str, mode: int, *, fresh: bool, shown: str) -> int:
    """A descriptor of directory `name` in the checked directory `parent`, created with exactly
    `mode` if absent. fresh=True: it must not exist yet (root just created it). An existing one must
    be a real directory owned by root and not writable by group or others, unless `mode` is a shared
    one (e.g. 1777), which it is then given."""
    if "/" in name or name in ("", ".", ".."):
        raise UnsafeDir(f"{shown}: not a plain directory name")
    shared = bool(mode & 0o022)
    created = False
    try:
        os.mkdir(name, 0o700, dir_fd=parent)
        created = True
    except FileExistsError:
        if fresh:
            raise UnsafeDir(f"{shown} exists already (expected a new directory)") from None
    fd = _open_child(parent, name, shown)
    try:
        if created:
            os.fchmod(fd, mode)  # exactly this mode, whatever the umask
        _check(fd, shown, allow_shared=shared)
        if shared and (os.fstat(fd).st_mode & 0o7777) != mode:
            os.fchmod(fd, mode)  # on the descriptor: never through a path that could be a link
    except BaseException:
        os.close(fd)
        raise
    return fd


def ensure_dir(path: str | os.PathLike[str], mode: int = 0o755) -> int:
    """A descriptor of directory `path`, made with its missing parents (mode 0755; `path` itself
    `mode`); every existing component must pass the checks of open_checked."""
    fd = os.open("/", _DIR_FLAGS)
    shown = "/"
    try:
        _check(fd, shown)
        parts = _parts(path)
        for i, name in enumerate(parts):
            shown = os.path.join(shown, name)
            child = make_dir(fd, name, mode if i == len(parts) - 1 else 0o755, fresh=False,
                             shown=shown)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def fresh_dir(parent: str | os.PathLike[str], stem: str, mode: int = 0o755) -> str:
    """A new directory in the checked directory `parent`, named `stem` (or stem-2, stem-3... if
    taken), made here and now with `mode`; returns its path."""
    pfd = open_checked(parent)
    try:
        for n in range(1, 100):
            name = stem if n == 1 else f"{stem}-{n}"
            try:
                os.close(make_dir(pfd, name, mode, fresh=True, shown=os.path.join(parent, name)))
            except UnsafeDir:
                if not os.path.lexists(os.path.join(parent, name)):
                    raise
                continue
            return os.path.join(os.fspath(parent), name)
    finally:
        os.close(pfd)
    raise UnsafeDir(f"{parent}: no free name for {stem}")


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "ensure":
        print("usage: safedir.py ensure DIR [SUBDIR...]", file=sys.stderr)
        return 2
    top = argv[1]
    try:
        os.close(ensure_dir(top))
        for sub in argv[2:]:
            path = os.path.join(top, sub)
            if os.path.lexists(path):
                check_dir(path)
    except (UnsafeDir, OSError) as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
