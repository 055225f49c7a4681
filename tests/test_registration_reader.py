"""Reading a caller's Xauthority with the caller's identity: only small regular files, never as root."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time

import pytest

from spice_streamd.caller import Caller
from spice_streamd.errors import AuthorityUnavailable, InvalidArgument, StartFailed
from spice_streamd.verifier import read_as_caller

NOBODY = Caller(sender=":1.99", uid=65534, pid=1, gid=65534, groups=())

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to read as another uid")


@pytest.fixture
def public_dir():
    # pytest's tmp_path is 0700 root: the reader, running as nobody, could not even traverse it.
    d = tempfile.mkdtemp(prefix="spice-reader-", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def own(path: str, uid: int = 65534, mode: int = 0o600) -> str:
    os.chown(path, uid, uid)
    os.chmod(path, mode)
    return path


def write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def read(path: str) -> bytes:
    return asyncio.run(read_as_caller(NOBODY, path, timeout=10.0))


def test_reads_own_file(public_dir):
    p = own(write(os.path.join(public_dir, "xa"), b"cookie-bytes"))
    assert read(p) == b"cookie-bytes"


def test_root_only_file_refused(public_dir):
    # Root could read this; the caller cannot: a refusal proves the read is not done as root.
    p = own(write(os.path.join(public_dir, "xa"), b"secret"), uid=0, mode=0o600)
    with pytest.raises(InvalidArgument, match="not readable by uid 65534"):
        read(p)


def test_symlink_refused(public_dir):
    target = own(write(os.path.join(public_dir, "real"), b"x"))
    link = os.path.join(public_dir, "link")
    os.symlink(target, link)
    with pytest.raises(InvalidArgument, match="symbolic link"):
        read(link)


def test_fifo_refused_without_hanging(public_dir):
    p = os.path.join(public_dir, "fifo")
    os.mkfifo(p)
    own(p)
    t0 = time.monotonic()
    with pytest.raises(InvalidArgument, match="not a regular file"):
        read(p)
    assert time.monotonic() - t0 < 5


def test_device_refused():
    with pytest.raises(InvalidArgument, match="not a regular file"):
        read("/dev/zero")


def test_huge_file_refused(public_dir):
    p = os.path.join(public_dir, "big")
    with open(p, "wb") as f:
        f.truncate(10 * 1024 * 1024)
    own(p)
    with pytest.raises(InvalidArgument, match="larger than"):
        read(p)


@pytest.mark.parametrize("path", ["relative/path", "", "/tmp/\0x"])
def test_bad_paths_refused(path):
    with pytest.raises(InvalidArgument, match="absolute path"):
        read(path)


def test_missing_file_refused(public_dir):
    with pytest.raises(InvalidArgument, match="does not exist"):
        read(os.path.join(public_dir, "nothing"))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def test_a_reader_that_never_stops_writing_is_cut_off_at_the_limit(public_dir):
    # The reader runs as the caller, who can ptrace or replace it; a caller that made it write
    # 1 GiB had the service peak at 2.1 GB. Stand in with a reader writing without end: the
    # service reads the limit plus one byte, ends the reader and refuses.
    p = own(write(os.path.join(public_dir, "xa"), b"x"))
    endless = ("/usr/bin/yes", "A" * 4000)  # the path is appended as one more word to repeat
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset this process's peak RSS to its RSS now
    before = _status_kib("VmRSS")
    t0 = time.monotonic()
    with pytest.raises(InvalidArgument, match="larger than 65536 bytes") as refused:
        asyncio.run(read_as_caller(NOBODY, p, timeout=10.0, reader=endless))
    assert time.monotonic() - t0 < 5, "the reader was not ended once it passed the limit"
    grown_mib = (_status_kib("VmHWM") - before) / 1024
    assert grown_mib < 16, f"reading the reader's output grew the service by {grown_mib:.0f} MiB"
    assert p in str(refused.value)


def test_the_readers_reason_is_shown_escaped(public_dir):
    # Its stderr is the caller's to write too: no control character gets into the refusal.
    p = own(write(os.path.join(public_dir, "xa"), b"x"))
    liar = ("/bin/sh", "-c", 'printf "is fine\\n\\033[2Kuid 0 registered\\a\\n" >&2; exit 3')
    with pytest.raises(InvalidArgument) as refused:
        asyncio.run(read_as_caller(NOBODY, p, timeout=10.0, reader=liar))
    assert str(refused.value).isprintable()
    assert "\\x1b[2Kuid 0 registered\\x07" in str(refused.value)


def test_a_reader_that_hands_its_pipes_to_an_escaped_process_does_not_hold_the_service(public_dir):
    # A process in a session of its own survives the kill of the reader's group and keeps the
    # pipes open: the refusal must still come at once, not at the timeout (or never).
    p = own(write(os.path.join(public_dir, "xa"), b"x"))
    pid_file = own(write(os.path.join(public_dir, "escaped.pid"), b""))
    escaping = ("/bin/sh", "-c", f"setsid sleep 30 & echo $! > {pid_file}; exec yes AAAAAAAA",
                "reader")
    t0 = time.monotonic()
    try:
        with pytest.raises(InvalidArgument, match="larger than"):
            asyncio.run(read_as_caller(NOBODY, p, timeout=20.0, reader=escaping))
        assert time.monotonic() - t0 < 5
    finally:
        with open(pid_file) as f:
            escaped = f.read().strip()
        if escaped:
            try:
                os.kill(int(escaped), 9)
            except ProcessLookupError:
                pass


def test_a_slow_reader_is_a_refusal_for_now_not_for_good(public_dir):
    """A reader that does not finish in time (a slow guest, a busy disk) gives AuthorityUnavailable,
    which the helper retries, not InvalidArgument, which it would take as final."""
    p = own(write(os.path.join(public_dir, "xa"), b"x"))
    t0 = time.monotonic()
    with pytest.raises(AuthorityUnavailable, match="took longer than 0.5 s"):
        asyncio.run(read_as_caller(NOBODY, p, timeout=0.5, reader=("/bin/sh", "-c", "sleep 30", "reader")))
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("program", ["missing", "not-executable"])
def test_a_reader_that_cannot_be_started_is_a_named_refusal(public_dir, program):
    """Issue 15 (Debian 13): starting the reader failed with PermissionError inside
    subprocess's _execute_child, which reached the caller as "the service failed unexpectedly"
    and the journal as a traceback. A start that fails is StartFailed, naming the reader and
    the error (here: a program that is missing, or not executable: PermissionError too)."""
    p = own(write(os.path.join(public_dir, "xa"), b"x"))
    reader = os.path.join(public_dir, program)
    if program == "not-executable":
        write(reader, b"#!/bin/sh\n")
        os.chmod(reader, 0o644)
    with pytest.raises(StartFailed, match="cannot start the Xauthority reader as uid 65534: "
                       + ("FileNotFoundError" if program == "missing" else "PermissionError")):
        asyncio.run(read_as_caller(NOBODY, p, timeout=10.0, reader=(reader,)))
