"""A periodic timer the worker's selectors loop can wait on: Linux's timerfd, through libc (the os
module has it only from Python 3.13)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time

CLOCK_MONOTONIC = time.CLOCK_MONOTONIC
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec),
                                  ctypes.c_void_p]


def _timespec(seconds: float) -> _Timespec:
    ns = max(0, round(seconds * 1e9))
    return _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)


class PeriodicTimer:
    """Readable every `interval` seconds once armed; read() says how many periods went by."""

    def __init__(self) -> None:
        fd = _libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.fd = fd
        self.interval = 0.0

    def fileno(self) -> int:
        return self.fd

    def arm(self, interval: float, first: float | None = None) -> None:
        """Every `interval` seconds, the first time after `first` seconds (default: `interval`;
        an interval of 0 disarms)."""
        if not interval:
            first = 0.0
        elif first is not None:
            first = max(first, 1e-6)  # 0 would disarm
        spec = _Itimerspec(_timespec(interval), _timespec(interval if first is None else first))
        if _libc.timerfd_settime(self.fd, 0, ctypes.byref(spec), None) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")
        self.interval = interval

    def read(self) -> int:
        try:
            return int.from_bytes(os.read(self.fd, 8), "little")
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
