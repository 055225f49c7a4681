"""The worker's error types and the exit code each one ends the process with."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0  # stopped by SIGTERM/SIGINT, or the host closed the device
    FAILURE = 1  # unexpected error (logged with a traceback once)
    USAGE = 2  # bad command line
    DISPLAY_UNAVAILABLE = 3  # the display could not be opened (no server, refused Xauthority)
    DISPLAY_LOST = 4  # the X connection broke while running
    DEVICE_UNAVAILABLE = 5  # the device could not be opened or is not usable
    DEVICE_LOST = 6  # the device went away (EIO, hang-up) while running
    # The user ended the capture in their desktop (GNOME's screen-sharing indicator: Stop): the
    # service does not start a worker for that session again until the user registers anew.
    STOPPED_BY_USER = 7


class WorkerError(Exception):
    exit_code = ExitCode.FAILURE


class DisplayUnavailable(WorkerError):
    exit_code = ExitCode.DISPLAY_UNAVAILABLE


class DisplayLost(WorkerError):
    exit_code = ExitCode.DISPLAY_LOST


class DeviceUnavailable(WorkerError):
    exit_code = ExitCode.DEVICE_UNAVAILABLE


class DeviceLost(WorkerError):
    exit_code = ExitCode.DEVICE_LOST


class StoppedByUser(WorkerError):
    exit_code = ExitCode.STOPPED_BY_USER

