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

