"""Reading a caller's Xauthority with the caller's identity: only small regular files, never as root."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time

import pytest

from spice_streamd.caller import Caller
from spice_streamd.errors import InvalidArgument
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
