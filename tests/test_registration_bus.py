"""Refusals of bad displays and Xauthority files through the bus, from a real user's process, and a
polkit that never answers."""

from __future__ import annotations

import os
import time

import pytest

from tests.support.bus import Stack, wait_until

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real polkitd, test users")]

ERR = "org.spice_space.StreamingAgent1.Error."
USER = "spice-test-a"


@pytest.fixture
def stack(stack_module):
    # A fresh service per test: the per-uid call rate limit must not carry over between tests.
    try:
        stack_module.current_service = stack_module.service()
        yield stack_module
    finally:
        stack_module.end_test()


def refused(stack, display: str, xauthority: str) -> str:
    result = stack.register(USER, "a", display, xauthority)
    assert result[:2] == ["error", ERR + "InvalidArgument"], result
    return result[2]


@pytest.mark.parametrize("display", ["host:0", ":0; rm", "", ":", "unix:42", ":42.0.1",
                                     "x" * 5000])
def test_bad_display(stack, display):
    xa = stack.files.xauthority(USER, ":42", name="xa-display")
    assert "not a local X display" in refused(stack, display, xa)


def test_other_users_xauthority_not_readable_by_caller(stack):
    # Root could read it: the refusal proves the service reads it as the caller.
    xa = stack.files.xauthority("spice-test-b", ":42", name="xa-of-b")
    assert "not readable by uid" in refused(stack, ":42", xa)


def test_symlink(stack):
    target = stack.files.xauthority(USER, ":42", name="xa-target")
    link = stack.files.path("xa-link")
    os.symlink(target, link)
    stack.files.own(link, USER)
    assert "symbolic link" in refused(stack, ":42", link)


def test_fifo_does_not_hang(stack):
    fifo = stack.files.path("xa-fifo")
    os.mkfifo(fifo)
    stack.files.own(fifo, USER)
    t0 = time.monotonic()
    assert "not a regular file" in refused(stack, ":42", fifo)
    assert time.monotonic() - t0 < 5


def test_device(stack):
    assert "not a regular file" in refused(stack, ":42", "/dev/zero")


def test_huge_file(stack):
    big = stack.files.path("xa-big")
    with open(big, "wb") as f:
        f.truncate(50 * 1024 * 1024)
    stack.files.own(big, USER)
    assert "larger than" in refused(stack, ":42", big)


def test_not_an_xauthority_file(stack):
    p = stack.files.path("xa-text")
    with open(p, "w") as f:
        f.write("this is not an Xauthority file\n")
    stack.files.own(p, USER)
    text = refused(stack, ":42", p)
    assert "truncated" in text or "no cookie" in text


def test_cookie_for_another_display(stack):
    xa = stack.files.xauthority(USER, ":41", name="xa-41")
    assert "no cookie for local display :42" in refused(stack, ":42", xa)


def test_relative_path(stack):
    assert "absolute path" in refused(stack, ":42", "relative/.Xauthority")


def test_missing_file(stack):
    assert "does not exist" in refused(stack, ":42", stack.files.path("nothing-here"))


def test_the_valid_call_is_accepted(stack):
    # The control for every refusal above: the same caller with a good file succeeds.
    xa = stack.files.xauthority(USER, ":42", name="xa-good")
    assert stack.register(USER, "a", ":42", xa)[:2] == ["ok", 2]


def test_caller_text_cannot_forge_log_lines_nor_reach_a_terminal(stack):
    # A path with a newline once forged a whole "session registered: uid 0" line in the log, and
    # its escape sequences reached the log and the helper's terminal.
    svc = stack.current_service
    forged_line = (f"spice-streamd[{svc.proc.pid}]: INFO session registered: uid 0 pid 1 VT 2 "
                   "display :0 session 1")
    path = stack.files.path("nothing-here") + "\n" + forged_line + "\x1b[2K\x1b]0;owned\x07"
    result = stack.register(USER, "a", ":42", path)
    assert result[:2] == ["error", ERR + "InvalidArgument"], result
    assert "does not exist" in result[2] and result[2].isprintable(), result[2]
    h = stack.helper(USER, "a", ":42", xauthority=path)
    assert h.wait() == 1
    assert "InvalidArgument" in h.output
    assert all(line.isprintable() for line in h.output.splitlines()), repr(h.output)
    wait_until(lambda: "refused (InvalidArgument)" in svc.log, what="the refusal logged")
    lines = svc.log.splitlines()
    assert not [line for line in lines if line.startswith(forged_line)]
    assert all(line.isprintable() for line in lines), [x for x in lines if not x.isprintable()]
    assert "\\nspice-streamd[" in svc.log  # the newline is there, escaped


def test_polkit_that_never_answers():
    s = Stack(polkit="mock")
    try:
        s.polkit.mock.SimulateHang(True)
        svc = s.service(args=("--polkit-timeout", "1"))
        xa = s.files.xauthority(USER, ":42")
        t0 = time.monotonic()
        result = s.register(USER, "a", ":42", xa)
        assert result[:2] == ["error", ERR + "AuthorityUnavailable"], result
        assert 0.9 < time.monotonic() - t0 < 10
        assert "polkit did not answer" in result[2]
        assert svc.proc.poll() is None
    finally:
        s.close()
