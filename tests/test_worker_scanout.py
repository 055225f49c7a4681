"""The worker's --source scanout start: a DRM device it cannot use ends it with
DisplayUnavailable's exit code and one line, never a traceback."""

from __future__ import annotations

import errno
import logging
import os
import socket

import pytest

from spice_stream_common import kms
from spice_stream_common.exitcodes import ExitCode
from spice_stream_worker import main as worker_main
from spice_stream_worker import timerfd
from spice_stream_worker.sources import scanout
from tests.support.hostpeer import RawPty


class BrokenCard:
    """A Card that opens but whose CRTCs cannot be listed (EACCES, a device gone)."""

    opened: list[BrokenCard] = []

    def __init__(self, path: str, fd: int | None = None) -> None:
        self.path, self.fd, self.closed = path, fd, False
        BrokenCard.opened.append(self)

    def drop_master(self) -> bool:
        return False

    def crtcs(self) -> list[kms.Crtc]:
        raise kms.KmsError(errno.EACCES, "GETRESOURCES: Permission denied")

    def close(self) -> None:
        self.closed = True
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@pytest.fixture
def device():
    pty = RawPty()
    yield pty.path
    pty.close()


@pytest.fixture
def quiet_setup(monkeypatch):
    monkeypatch.setattr(worker_main.logsetup, "setup", lambda *a, **kw: False)  # keep caplog's
    BrokenCard.opened.clear()
    monkeypatch.setattr(kms, "Card", BrokenCard)


def run_main(argv: list[str], caplog) -> int:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = worker_main.main(argv)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].exc_info is None  # one line, no traceback
    return code


def test_crtcs_failing_with_card(device, quiet_setup, caplog):
    code = run_main(["--device", device, "--source", "scanout", "--card", "/dev/dri/card0"], caplog)
    assert code == ExitCode.DISPLAY_UNAVAILABLE
    assert "Permission denied" in caplog.text
    assert BrokenCard.opened[0].closed


def test_crtcs_failing_with_the_services_fds(device, quiet_setup, caplog, monkeypatch):
    timers = []

    def timer():
        timers.append(timerfd.PeriodicTimer())
        return timers[-1]

    monkeypatch.setattr(scanout, "PeriodicTimer", timer)
    card_fd = os.open("/dev/null", os.O_RDONLY)
    ours, theirs = socket.socketpair()
    code = run_main(["--device", device, "--source", "scanout", "--card-fd", str(card_fd),
                     "--grant-fd", str(theirs.detach())], caplog)
    assert code == ExitCode.DISPLAY_UNAVAILABLE
    assert BrokenCard.opened[0].closed  # and with it the service's fd
    assert timers and timers[0].fd == -1
    ours.settimeout(1)
    assert ours.recv(16) == b""  # the grant socket closed
    ours.close()


def test_an_os_error_building_the_source(device, quiet_setup, caplog, monkeypatch):
    def no_timer():
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(scanout, "PeriodicTimer", no_timer)
    code = run_main(["--device", device, "--source", "scanout", "--card", "/dev/dri/card0"], caplog)
    assert code == ExitCode.DISPLAY_UNAVAILABLE
    assert "Too many open files" in caplog.text
    assert BrokenCard.opened[0].closed


def test_a_card_fd_that_is_no_drm_device_closes_the_grant_socket(device, caplog, monkeypatch):
    monkeypatch.setattr(worker_main.logsetup, "setup", lambda *a, **kw: False)
    card_fd = os.open("/dev/null", os.O_RDONLY)  # the real Card: SET_CLIENT_CAP fails, ENOTTY
    ours, theirs = socket.socketpair()
    code = run_main(["--device", device, "--source", "scanout", "--card-fd", str(card_fd),
                     "--grant-fd", str(theirs.detach())], caplog)
    assert code == ExitCode.DISPLAY_UNAVAILABLE
    assert "SET_CLIENT_CAP" in caplog.text
    ours.settimeout(1)
    assert ours.recv(16) == b""
    ours.close()
