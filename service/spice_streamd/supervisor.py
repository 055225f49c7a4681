"""Runs at most one worker for the active session; owns the device fd, the worker and its status pipe."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spice_stream_worker.errors import ExitCode

from . import errors
from .ratelimit import LogLimiter

log = logging.getLogger(__name__)

MAX_STATUS_LINE = 4096
MAX_HOST_CAPS_CHARS = 512
MAX_CODECS = 64
BAD_STATUS_LOG_INTERVAL_S = 10.0
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"

STATES = ("idle", "starting", "running", "backoff", "failed", "no-device")


@dataclass(frozen=True)
class WorkerTarget:
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups, never containing 0
    display: str
    xauthority: str
    vt: int


def check_target(target: WorkerTarget) -> None:
    """Refuse a target that would hand the worker a root group (it must keep none)."""
    if 0 in target.groups:
        raise errors.PermissionDenied(
            f"worker for uid {target.uid} on VT {target.vt} would keep root group 0"
        )
    if target.gid == 0 and target.uid != 0:
        raise errors.PermissionDenied(
            f"worker for uid {target.uid} on VT {target.vt} would run with gid 0"
        )
    if target.uid < 0 or target.gid < 0 or any(g < 0 for g in target.groups):
        raise errors.InvalidArgument(f"negative id in worker target for VT {target.vt}")


def _exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    try:
        return f"exit {rc} ({ExitCode(rc).name})"
    except ValueError:
        return f"exit {rc}"


class _Worker:
    """One running worker process and the read end of its status pipe."""

    def __init__(self, target: WorkerTarget, proc: asyncio.subprocess.Process, status_fd: int):
        self.target = target
        self.proc = proc
        self.pid = proc.pid
        self.status_fd: int | None = status_fd
        self.started = time.monotonic()
        self.buf = bytearray()
        self.discarding = False
        self.wait_task: asyncio.Task[int] = asyncio.get_running_loop().create_task(proc.wait())
        self.reported = False


class WorkerSupervisor:
    """Keeps the worker matching (target, device presence): start, switch, restart with backoff.

    Everything that changes processes or fds happens in one task (_run), woken by the sync
    setters, so a switch is never interleaved with a restart.
    """

    def __init__(
        self,
        *,
        device_path: str,
        fps: int,
        quality: int,
        worker_argv: list[str] | None = None,
        on_change: Callable[[], None] | None = None,
        grace_s: float = 2.0,
        quick_run_s: float = 10.0,
        max_quick_failures: int = 5,
        backoff_s: float = 0.5,
        backoff_max_s: float = 8.0,
        device_present: bool | None = None,
    ) -> None:
        self._device_path = device_path
        self._fps = int(fps)
        self._quality = int(quality)
        self._argv = list(worker_argv or [sys.executable, "-m", "spice_stream_worker"])
        self._on_change = on_change
        self._grace_s = grace_s
        self._quick_run_s = quick_run_s
        self._max_quick_failures = max_quick_failures
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s

        self._target: WorkerTarget | None = None
        self._device_present = (
            os.path.exists(device_path) if device_present is None else bool(device_present)
        )
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

        self._worker: _Worker | None = None
        self._dev_fd: int | None = None
        self._device_moved = False
        self.device_opens = 0  # how often the device was (re)opened: a reopen resets the host
        # What the reconciling task would say before it first runs (no target yet).
        self._state = "idle" if self._device_present else "no-device"
        self._last_error = ""
        self._quick_failures = 0
        self._restarts = 0
        self._failed = False
        self._backoff_until = 0.0
        self._wstatus: dict[str, Any] = self._empty_worker_status()
        # Host state the last worker saw, handed to the next one so a switch does not have to
        # wait for the client to reconnect. Forgotten when the device is reopened.
        self._codecs: list[int] | None = None
        self._host_caps: str | None = None
        self._bad_status_log = LogLimiter(log, BAD_STATUS_LOG_INTERVAL_S)
        self._last_notified: dict[str, Any] | None = None

    def _bad_status(self, fmt: str, *args: object) -> None:
        # A worker is the session user's process: what it writes on the pipe is untrusted input.
        self._bad_status_log.log(logging.WARNING, "bad status", fmt, *args)

    # ---- public API -------------------------------------------------------------------------

    @property
    def status(self) -> dict[str, Any]:
        """state, vt (0: none), uid (-1: none), pid (0: none), worker counters, restarts, last_error."""
        t = self._target
        return {
            "state": self._state,
            "vt": t.vt if t else 0,
            "uid": t.uid if t else -1,
            "pid": self._worker.pid if self._worker else 0,
            "streaming": bool(self._wstatus["streaming"]),
            "frames": int(self._wstatus["frames"]),
            "bytes": int(self._wstatus["bytes"]),
            "fps": float(self._wstatus["fps"]),
            "restarts": self._restarts,
            "last_error": self._last_error,
        }

    @property
    def host_state(self) -> tuple[list[int] | None, str | None]:
        """(codecs, host_caps) the last worker reported, as passed to the next one."""
        return (list(self._codecs) if self._codecs is not None else None, self._host_caps)

    def set_target(self, target: WorkerTarget | None) -> None:
        """None stops the worker; a different target switches to it (resetting the backoff)."""
        if target is not None:
            check_target(target)
        if target == self._target:
            return
        log.info(
            "worker target: %s",
            f"uid={target.uid} vt={target.vt} display={target.display}" if target else "none",
        )
        self._target = target
        self._reset_failures()
        self._kick()

    def set_device_present(self, present: bool, path: str | None = None) -> None:
        """path: where the port was found (DeviceWatch.node), when that differs from before."""
        present = bool(present)
        if path and path != self._device_path:
            log.info("device path %s -> %s", self._device_path, path)
            self._device_path = path
            if self._dev_fd is not None:
                # Another node is another device: the next worker must not get the old fd.
                self._device_moved = True
                self._kick()
        if present == self._device_present:
            return
        log.info("device %s %s", self._device_path, "present" if present else "absent")
        self._device_present = present
        if present:
            self._reset_failures()
        self._kick()

    async def close(self) -> None:
        self._closing = True
        self._target = None
        if self._task is not None:
            self._wake.set()
            try:
                await self._task
            except Exception:
                log.exception("supervisor task failed")
            self._task = None
        if self._worker is not None:  # the task died: still never leave a worker behind
            await self._stop_worker("service stopping")
        self._close_device("service stopping")

    # ---- the reconciling task ---------------------------------------------------------------

    def _kick(self) -> None:
        if self._closing:
            return
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    def _reset_failures(self) -> None:
        self._quick_failures = 0
        self._restarts = 0
        self._failed = False
        self._backoff_until = 0.0
        self._last_error = ""

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            desired = self._target if (self._device_present and not self._closing) else None
            w = self._worker
            if w is not None and w.target != desired:
                reason = "service stopping" if self._closing else (
                    "device gone" if not self._device_present else
                    "target changed" if self._target else "no active session")
                await self._stop_worker(reason)
                continue
            if self._closing:
                return
            if self._device_moved:
                self._device_moved = False
                if self._worker is not None:
                    await self._stop_worker("device path changed")
                self._close_device("device path changed")
                continue
            if not self._device_present:
                self._close_device("device absent")
                self._set_state("no-device")
            elif desired is None:
                self._set_state("idle")
            elif w is None:
                if self._failed:
                    self._set_state("failed")
                else:
                    delay = self._backoff_until - time.monotonic()
                    if delay > 0:
                        self._set_state("backoff")
                        await self._wait(delay)
                        continue
                    await self._start_worker(desired)
                    continue
            else:
                await self._wait(None, w.wait_task)
                still_wanted = self._target if self._device_present else None
                if w.wait_task.done() and self._worker is w and w.target == still_wanted:
                    self._on_unexpected_exit(w)
                # Otherwise the next round stops it (or notes that it already exited).
                continue
            await self._wait(None)

    async def _wait(self, timeout: float | None, *others: asyncio.Future[Any]) -> None:
        wake = asyncio.get_running_loop().create_task(self._wake.wait())
        try:
            await asyncio.wait({wake, *others}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            wake.cancel()

    # ---- device -----------------------------------------------------------------------------

    def _open_device(self) -> int:
        if self._dev_fd is None:
            self._dev_fd = os.open(self._device_path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            self._codecs = None
            self._host_caps = None
            self.device_opens += 1
            log.info("device %s opened (fd %d)", self._device_path, self._dev_fd)
        return self._dev_fd

    def _close_device(self, why: str) -> None:
        if self._dev_fd is not None:
            os.close(self._dev_fd)
            self._dev_fd = None
            log.info("device %s closed (%s)", self._device_path, why)

    # ---- worker lifecycle -------------------------------------------------------------------

    def _worker_argv(self, dev_fd: int, status_fd: int) -> list[str]:
        argv = [*self._argv, "--device-fd", str(dev_fd), "--status-fd", str(status_fd),
                "--fps", str(self._fps), "--quality", str(self._quality)]
        if self._codecs is not None:
            argv += ["--start-codecs", ",".join(map(str, self._codecs)) or "none"]
        if self._host_caps is not None:
            argv += ["--host-caps", self._host_caps]
        return argv

    @staticmethod
    def _worker_env(target: WorkerTarget) -> dict[str, str]:
        env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "DISPLAY": target.display,
               "XAUTHORITY": target.xauthority}
        try:
            home = pwd.getpwuid(target.uid).pw_dir
        except KeyError:
            home = ""
        if home:
            env["HOME"] = home
        # The worker writes into our stderr: under journald it may then mark its priorities.
        if "JOURNAL_STREAM" in os.environ:
            env["JOURNAL_STREAM"] = os.environ["JOURNAL_STREAM"]
        return env

    async def _start_worker(self, target: WorkerTarget) -> None:
        try:
            dev = self._open_device()
        except OSError as e:
            self._failure(target, f"cannot open {self._device_path}: {e.strerror}", 0.0)
            return
        r, w = os.pipe2(os.O_CLOEXEC)
        kwargs: dict[str, Any] = {}
        if os.geteuid() == 0:
            # extra_groups always, even empty: otherwise the child keeps root's groups.
            kwargs = {"user": target.uid, "group": target.gid,
                      "extra_groups": list(target.groups)}
        elif target.uid != os.geteuid():
            os.close(r)
            os.close(w)
            self._failure(target, f"not root: cannot run a worker as uid {target.uid}", 0.0)
            return
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._worker_argv(dev, w),
                stdin=asyncio.subprocess.DEVNULL,
                env=self._worker_env(target),
                cwd="/",
                pass_fds=(dev, w),
                start_new_session=True,
                **kwargs,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            os.close(r)
            os.close(w)
            self._failure(target, f"cannot start worker: {e}", 0.0)
            return
        os.close(w)
        os.set_blocking(r, False)
        worker = _Worker(target, proc, r)
        self._worker = worker
        self._wstatus = self._empty_worker_status()
        asyncio.get_running_loop().add_reader(r, self._on_status_readable, worker)
        log.info("worker started uid=%d vt=%d pid=%d display=%s",
                 target.uid, target.vt, worker.pid, target.display)
        self._set_state("starting")

    def _failure(self, target: WorkerTarget, error: str, ran_s: float) -> None:
        self._last_error = error
        if ran_s < self._quick_run_s:
            self._quick_failures += 1
        else:
            self._quick_failures = 0
        if self._quick_failures >= self._max_quick_failures:
            self._failed = True
            log.error("worker for uid=%d vt=%d failed %d times in a row, giving up: %s",
                      target.uid, target.vt, self._quick_failures, error)
            self._set_state("failed")
            return
        n = max(self._quick_failures, 1)
        delay = min(self._backoff_s * 2 ** (n - 1), self._backoff_max_s)
        self._backoff_until = time.monotonic() + delay
        self._restarts += 1
        log.warning("worker for uid=%d vt=%d: %s; restart in %.1f s",
                    target.uid, target.vt, error, delay)
        self._set_state("backoff")

    def _on_unexpected_exit(self, w: _Worker) -> None:
        rc = w.proc.returncode
        assert rc is not None
        ran = time.monotonic() - w.started
        self._release_worker(w)
        log.info("worker exited uid=%d vt=%d pid=%d %s after %.1f s",
                 w.target.uid, w.target.vt, w.pid, _exit_text(rc), ran)
        if rc in (ExitCode.DEVICE_LOST, ExitCode.DEVICE_UNAVAILABLE) or rc < 0:
            # A worker killed mid-write may have left a torn message: reset the host side.
            self._close_device(f"worker pid={w.pid} {_exit_text(rc)}")
        self._failure(w.target, f"worker pid {w.pid} {_exit_text(rc)}", ran)

    async def _stop_worker(self, reason: str) -> None:
        w = self._worker
        assert w is not None
        killed = False
        if w.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(w.wait_task), self._grace_s)
            except TimeoutError:
                log.warning("worker uid=%d vt=%d pid=%d ignored SIGTERM for %.1f s: SIGKILL",
                            w.target.uid, w.target.vt, w.pid, self._grace_s)
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                killed = True
        rc = await w.wait_task
        self._release_worker(w)
        log.info("worker stopped uid=%d vt=%d pid=%d (%s): %s",
                 w.target.uid, w.target.vt, w.pid, reason, _exit_text(rc))
        if killed:
            self._close_device(f"worker pid={w.pid} was killed")
        self._wstatus = self._empty_worker_status()
        self._notify()

    def _release_worker(self, w: _Worker) -> None:
        """Read what is left in the status pipe, close it, and forget the process."""
        if w.status_fd is not None:
            self._on_status_readable(w)
            self._close_status(w)
        if self._worker is w:
            self._worker = None

    def _close_status(self, w: _Worker) -> None:
        if w.status_fd is not None:
            asyncio.get_running_loop().remove_reader(w.status_fd)
            os.close(w.status_fd)
            w.status_fd = None

    # ---- status pipe ------------------------------------------------------------------------

    @staticmethod
    def _empty_worker_status() -> dict[str, Any]:
        return {"streaming": False, "frames": 0, "bytes": 0, "fps": 0.0}

    def _on_status_readable(self, w: _Worker) -> None:
        # Bounded per call so a flooding worker cannot starve the loop.
        for _ in range(16):
            if w.status_fd is None:
                return
            try:
                chunk = os.read(w.status_fd, 65536)
            except BlockingIOError:
                return
            except OSError as e:
                log.warning("worker pid=%d status pipe: %s", w.pid, e.strerror)
                self._close_status(w)
                return
            if not chunk:
                self._close_status(w)
                return
            self._feed(w, chunk)

    def _feed(self, w: _Worker, chunk: bytes) -> None:
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                if not w.discarding:
                    w.buf += chunk[start:]
                    if len(w.buf) > MAX_STATUS_LINE:
                        self._bad_status(
                            "worker uid=%d vt=%d pid=%d: status line over %d bytes dropped",
                            w.target.uid, w.target.vt, w.pid, MAX_STATUS_LINE)
                        w.buf.clear()
                        w.discarding = True
                return
            if w.discarding:
                w.discarding = False
            else:
                w.buf += chunk[start:nl]
                if len(w.buf) > MAX_STATUS_LINE:
                    self._bad_status(
                        "worker uid=%d vt=%d pid=%d: status line over %d bytes dropped",
                        w.target.uid, w.target.vt, w.pid, MAX_STATUS_LINE)
                else:
                    self._status_line(w, bytes(w.buf))
                w.buf.clear()
            start = nl + 1

    def _status_line(self, w: _Worker, line: bytes) -> None:
        if not line.strip():
            return
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError):
            msg = None
        if not isinstance(msg, dict):
            self._bad_status("worker uid=%d vt=%d pid=%d: unparsable status line",
                             w.target.uid, w.target.vt, w.pid)
            return
        if self._worker is not w or w.proc.returncode is not None:
            return
        new = dict(self._wstatus)
        if isinstance(msg.get("streaming"), bool):
            new["streaming"] = msg["streaming"]
        for key in ("frames", "bytes"):
            v = msg.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63:
                new[key] = v
        fps = msg.get("fps")
        if isinstance(fps, (int, float)) and not isinstance(fps, bool) and 0 <= fps < 1e6:
            new["fps"] = float(fps)
        codecs = msg.get("codecs", None)
        if (isinstance(codecs, list) and len(codecs) <= MAX_CODECS
                and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 256
                        for c in codecs)):
            self._codecs = list(codecs)
        caps = msg.get("host_caps", None)
        if (isinstance(caps, str) and len(caps) <= MAX_HOST_CAPS_CHARS
                and all(c in "0123456789abcdefABCDEF" for c in caps)):
            self._host_caps = caps
        self._wstatus = new
        if not w.reported:
            w.reported = True
            log.info("worker running uid=%d vt=%d pid=%d", w.target.uid, w.target.vt, w.pid)
            self._set_state("running")
        else:
            self._notify()

    # ---- change notification ----------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        self._state = state
        self._notify()

    def _notify(self) -> None:
        status = self.status
        if status == self._last_notified:
            return
        self._last_notified = status
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                log.exception("status-change callback failed")

