"""Keeps at most one worker running for the active session, relayed to the port by the service."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

from spice_stream_common import protocol as p
from spice_stream_common.exitcodes import ExitCode

from . import cgroup, errors, guestmessages, workerprocess
from .framebuffers import FramebufferGrants
from .portrelay import PortRelay
from .restartpolicy import RestartPolicy
from .workerchannel import WorkerChannel, socket_pair
from .workerlog import relay_stderr
from .workerprocess import UserProcess, WorkerTarget, check_target, exit_text

log = logging.getLogger(__name__)

STATES = ("idle", "starting", "running", "backoff", "failed", "no-device")
TICK_S = 1.0
# With nothing new to send, a worker says so every 2 s (its HEARTBEAT_S): UNCHANGED on a static
# screen, NO_PICTURE when it has no picture (a locked screen). One that sends neither a frame nor
# these for this long while the host asks for frames is stuck.
WATCHDOG_S = 10.0
# "Streaming" means frames reached the host this recently, or, on a static screen, that the worker
# said this recently that the picture the host has from it is still current (UNCHANGED).
STREAMING_WINDOW_S = 5.0
STARTUP_PERIODS = 3
# How long a relayed worker without a picture is not covered by the scanout while the kernel shows
# another VT than its session's (logind's word of the switch is on its way: 0.2-2.2 s under TCG).
# Its NO_PICTURE comes again every HEARTBEAT_S (2 s): covered at the first one past this.
LEFT_GRACE_S = 3.0
STOPPED_TEXT = ("stopped by its user (the desktop's Stop for screen sharing): not restarted "
                "until the session registers again")

__all__ = ["STATES", "WorkerSupervisor", "WorkerTarget", "check_target"]


class _Worker:
    """One running worker: its process and the service's end of its socket."""

    def __init__(self, target: WorkerTarget, child: UserProcess, channel: WorkerChannel,
                 grants: FramebufferGrants | None = None) -> None:
        self.target = target
        self.child = child
        self.proc = child.proc
        self.pid = child.pid
        self.channel = channel
        self.grants = grants  # a scanout reader's device and handle grants
        self.started = time.monotonic()
        loop = asyncio.get_running_loop()
        self.log_task = loop.create_task(relay_stderr(self.proc.stderr, str(self))) \
            if self.proc.stderr is not None else None
        self.wait_task: asyncio.Task[int] = loop.create_task(self._wait())
        self.reported = False
        self.detached = False
        self.caps: Any = None  # its CAPABILITIES, kept while it waits in standby
        self.first_message_at: float | None = None
        self.left_at: float | None = None  # its NO_PICTURE, when the kernel showed another VT
        # Relayed again after the scanout covered for it: its frames are dropped until the FORMAT
        # its new START_STOP makes it send (those before were sent for a stream it no longer has).
        self.awaiting_format = False

    async def _wait(self) -> int:
        """Its exit status once it has exited and everything it started has ended too."""
        rc = await self.child.exited()
        await self.child.end_rest()
        if self.log_task is not None:
            # Its last lines (why it ended) come before the service's line about the exit; a
            # child of its own holding the pipe must not keep us waiting.
            await asyncio.wait({self.log_task}, timeout=1.0)
            self.log_task.cancel()
        self.child.close_pipes()
        return rc

    def close_io(self) -> None:
        """The service's ends of what the worker was given: its socket (and a scanout reader's
        device and grant socket)."""
        self.channel.close()
        if self.grants is not None:
            self.grants.close()

    def __str__(self) -> str:
        if self.target.scanout:
            return f"scanout uid={self.target.uid} pid={self.pid}"
        return f"uid={self.target.uid} vt={self.target.vt} pid={self.pid}"


class WorkerSupervisor:
    """Keeps the worker matching (target, device presence): start, switch, restart with backoff.

    Everything that changes processes or fds happens in one task (_run), woken by the sync
    setters, so a switch is never interleaved with a restart. The port itself belongs to the
    PortRelay: a worker only ever holds its end of a socket.
    """

    def __init__(
        self,
        *,
        device_path: str,
        fps: int,
        quality: int,
        codecs: str = "mjpeg",
        worker_argv: list[str] | None = None,
        on_change: Callable[[], None] | None = None,
        grace_s: float = 2.0,
        quick_run_s: float = 10.0,
        max_quick_failures: int = 5,
        backoff_s: float = 0.5,
        backoff_max_s: float = 8.0,
        device_present: bool | None = None,
        watchdog_s: float = WATCHDOG_S,
        pause_after_s: float | None = None,
        cgroups: cgroup.Tree | None | Literal["auto"] = "auto",
        open_grants: Callable[[str], FramebufferGrants] = FramebufferGrants,
        kernel_vt: Callable[[], int | None] = lambda: None,
    ) -> None:
        """cgroups: where each worker gets a cgroup of its own; "auto" is the service's own
        delegated cgroup when there is one (cgroup.service_tree()), None is none at all."""
        self._fps = int(fps)
        self._quality = int(quality)
        self._codecs = codecs
        # -I: the worker runs with its user's HOME; without it, the user's site-packages
        # (usercustomize.py, a spice_stream_worker of their own there) would run inside it.
        self._argv = list(worker_argv or [sys.executable, "-I", "-m", "spice_stream_worker"])
        self._cgroups = cgroups
        self._open_grants_for = open_grants
        self._kernel_vt = kernel_vt  # the kernel's VT now: a switch the seat has not told yet
        self._on_change = on_change
        self._grace_s = grace_s
        self._watchdog_s = watchdog_s
        self._policy = RestartPolicy(quick_run_s=quick_run_s,
                                     max_quick_failures=max_quick_failures,
                                     backoff_s=backoff_s, backoff_max_s=backoff_max_s)
        relay_kw = {} if pause_after_s is None else {"pause_after_s": pause_after_s}
        self.relay = PortRelay(device_path, on_change=self._notify, **relay_kw)

        self._target: WorkerTarget | None = None
        self._device_present = (
            os.path.exists(device_path) if device_present is None else bool(device_present)
        )
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._worker: _Worker | None = None
        # The scanout reader's standby worker while it is relayed in place of the target's worker,
        # which says it has no picture (a locked or just recreated Wayland screen cast).
        self._cover: _Worker | None = None
        # Workers of the other registered sessions, started ahead and holding only their socket:
        # switching to one of them costs no process start (seconds on a slow guest).
        self._standby_targets: frozenset[WorkerTarget] = frozenset()
        self._standby: dict[WorkerTarget, _Worker] = {}
        self._standby_failed: set[WorkerTarget] = set()
        # Targets whose worker its user stopped (exit STOPPED_BY_USER: GNOME's Stop in the
        # screen-sharing indicator): never started again. A Wayland target is one registration's,
        # so a new registration is a new target; forgotten once no longer registered
        # (set_standby).
        self._stopped: set[WorkerTarget] = set()
        # What the reconciling task would say before it first runs (no target yet).
        self._state = "idle" if self._device_present else "no-device"
        self._frames_expected_since: float | None = None
        self._spawn_error = ""
        self._last_notified: dict[str, Any] | None = None

    # ---- public API -------------------------------------------------------------------------

    @property
    def device_opens(self) -> int:
        """How often the port was opened: each open resets the host's side."""
        return self.relay.opens

    @property
    def worker_uid(self) -> int:
        """The uid the relayed worker runs for (-1: none); during a switch, still the old one's."""
        return self._worker.target.uid if self._worker is not None else -1

    @property
    def status(self) -> dict[str, Any]:
        """state, vt (0: none), uid (-1: none), pid (0: none), what reached the host from this
        worker (frames, bytes, fps, streaming), restarts, last_error."""
        t = self._target
        # What the host is shown: the target's worker, or the scanout covering for it.
        w = self._cover or self._worker
        running = self._state == "running" and w is not None
        age = self.relay.frame_age()
        # Frames of this worker, not of the one before a switch, reached the host recently; or
        # its frames reached the host and it says the last one is still its picture (and has not
        # said since that it has none).
        streaming = (running and self.relay.host_wants_frames and self.relay.attached_frames > 0
                     and not self._says_no_picture(w)
                     and ((age is not None and age <= STREAMING_WINDOW_S)
                          or self._still_current(w)))
        return {
            "state": self._state,
            "vt": t.vt if t else 0,
            "uid": t.uid if t else -1,
            "pid": w.pid if w else 0,
            "streaming": bool(streaming),
            "frames": self.relay.attached_frames if running else 0,
            "bytes": self.relay.attached_bytes if running else 0,
            "fps": round(self.relay.fps(), 1) if streaming else 0.0,
            "restarts": self._policy.restarts,
            "last_error": self._policy.last_error,
        }

    @staticmethod
    def _says_no_picture(w: _Worker | None) -> bool:
        """The worker's last word is that it has no picture (a lock screen came after its last
        frame): what the host shows is no longer current, whatever the frame's age."""
        if w is None or w.channel.last_waiting_at is None:
            return False
        said = [t for t in (w.channel.last_frame_at, w.channel.last_unchanged_at) if t is not None]
        return not said or w.channel.last_waiting_at > max(said)

    @staticmethod
    def _still_current(w: _Worker | None) -> bool:
        if w is None:
            return False
        said, waiting = w.channel.last_unchanged_at, w.channel.last_waiting_at
        return (said is not None and time.monotonic() - said <= STREAMING_WINDOW_S
                and (waiting is None or waiting < said))

    @property
    def host_state(self) -> tuple[list[int] | None, bytes | None]:
        """(codecs of the host's last START_STOP, its capabilities), as the port relay keeps them."""
        codecs = self.relay.host_codecs
        return (list(codecs) if codecs is not None else None, self.relay.host_caps)

    def set_target(self, target: WorkerTarget | None) -> None:
        """None stops the worker; a different target switches to it (resetting the backoff)."""
        if target is not None:
            check_target(target)
        if target == self._target:
            return
        log.info(
            "worker target: %s",
            f"uid={target.uid} vt={target.vt} display={target.label}" if target else "none",
        )
        self._target = target
        self._policy.reset()
        self._kick()

    def set_standby(self, targets: list[WorkerTarget]) -> None:
        """The other registered sessions: their workers are kept started, not relayed."""
        allowed = set()
        for t in targets:
            try:
                check_target(t)
            except errors.ServiceError:
                continue
            allowed.add(t)
        wanted = frozenset(allowed)
        # The coordinator gives the target first, then the others: together they are every
        # registered session, and a stopped target no longer among them can never come back.
        self._stopped &= wanted | {self._target}
        if wanted != self._standby_targets:
            self._standby_targets = wanted
            self._standby_failed &= wanted
            self._kick()

    def set_device_present(self, present: bool, path: str | None = None) -> None:
        """path: where the port was found (DeviceWatch.node), when that differs from before."""
        present = bool(present)
        if path and path != self.relay.path:
            # Another node is another device: the relay closes the old one.
            self.relay.set_path(path)
        if present == self._device_present:
            return
        log.info("device %s %s", self.relay.path, "present" if present else "absent")
        self._device_present = present
        if present:
            self._policy.reset()
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
        for t in list(self._standby):
            await self._stop_standby(t, "service stopping")
        self.relay.stop("service stopping")

    # ---- the reconciling task ---------------------------------------------------------------

    def _kick(self) -> None:
        if self._closing:
            return
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            desired = self._target if (self._device_present and not self._closing) else None
            w = self._worker
            if w is not None and w.target != desired:
                if w.target in self._standby_wanted() and not w.wait_task.done():
                    self._demote(w)
                    continue
                reason = "service stopping" if self._closing else (
                    "device gone" if not self._device_present else
                    "target changed" if self._target else "no active session")
                await self._stop_worker(reason)
                continue
            if self._closing:
                return
            settled = desired is None or (w is not None and w.target == desired)
            if settled and await self._reconcile_standby():
                continue
            if not self._device_present:
                self.relay.stop("device absent")
                self._set_state("no-device")
            elif desired is None:
                self._set_state("idle")
            elif w is None:
                if desired in self._stopped:
                    self._set_state("idle")  # its user stopped it: until registered anew
                elif self._policy.gave_up:
                    self._set_state("failed")
                else:
                    delay = self._policy.wait_left()
                    if delay > 0:
                        self._set_state("backoff")
                        await self._wait(delay)
                        continue
                    ready = self._standby.pop(desired, None)
                    if ready is not None and not ready.wait_task.done():
                        self._promote(ready)
                    else:
                        if ready is not None:
                            await self._stop_standby_worker(ready, "it had exited")
                        await self._start_worker(desired)
                    continue
            else:
                await self._wait(TICK_S, w.wait_task,
                                 *(sw.wait_task for sw in self._standby.values()))
                still_wanted = self._target if self._device_present else None
                if self._worker is not w or w.target != still_wanted:
                    continue  # the next round stops it (or notes that it already exited)
                if w.wait_task.done():
                    await self._on_unexpected_exit(w)
                elif self._stuck(w):
                    await self._stop_worker("sent no frame while the host asked for frames")
                    self._failure(w.target, f"worker pid {w.pid} sent no frame for "
                                  f"{self._watchdog_s:g} s while the host asked for frames",
                                  time.monotonic() - w.started)
                else:
                    self._notify()
                continue
            await self._wait(None, *(sw.wait_task for sw in self._standby.values()))

    def _standby_wanted(self) -> frozenset[WorkerTarget]:
        if self._closing or not self._device_present:
            return frozenset()
        return self._standby_targets - {self._target}

    async def _reconcile_standby(self) -> bool:
        """Start and stop standby workers to match the wanted set; True if anything changed."""
        wanted = self._standby_wanted()
        for t, sw in list(self._standby.items()):
            if t not in wanted:
                await self._stop_standby(t, "no longer registered" if t not in
                                         self._standby_targets else "not needed")
                return True
            if sw.wait_task.done():
                if sw.wait_task.result() == ExitCode.STOPPED_BY_USER:
                    self._stopped_by_user(sw, logged=False)
                    await self._stop_standby(t, STOPPED_TEXT)
                else:
                    # Not restarted while in standby: the switch to its session starts it again.
                    self._standby_failed.add(t)
                    await self._stop_standby(t, "it exited")
                return True
        for t in wanted:
            if t not in self._standby and t not in self._standby_failed \
                    and t not in self._stopped:
                sw = await self._spawn(t)
                if sw is None:
                    self._standby_failed.add(t)
                else:
                    self._standby[t] = sw
                    log.info("standby worker started %s display=%s", sw, t.label)
                return True
        return False

    async def _stop_standby(self, target: WorkerTarget, reason: str) -> None:
        sw = self._standby.pop(target)
        await self._stop_standby_worker(sw, reason)

    async def _stop_standby_worker(self, sw: _Worker, reason: str) -> None:
        if sw is self._cover:
            self._end_cover(self._worker, f"the scanout reader stopped: {reason}")
        sw.detached = True
        rc, _ = await workerprocess.end(sw.proc, sw.wait_task, self._grace_s)
        sw.close_io()
        log.info("standby worker stopped %s (%s): %s", sw, reason, exit_text(rc))

    def _promote(self, w: _Worker, fresh: bool = False) -> None:
        """A worker becomes the relayed one; from standby, a switch costs no process start."""
        w.detached = False
        self._worker = w
        self._frames_expected_since = None
        w.channel.relay(True)  # read in full again (a standby's is read only for its CAPABILITIES)
        self.relay.start()
        self.relay.attach(w.channel.send)
        if w.caps is not None:
            self.relay.submit(w.caps)
        if not fresh:
            log.info("worker relayed %s (it was in standby)", w)
        self._set_state("running" if w.reported else "starting")

    def _demote(self, w: _Worker) -> None:
        """The relayed worker's session is no longer active but still registered: it stops
        streaming and waits in standby for its session to come back."""
        self._end_cover(None, "")
        self.relay.detach()
        self._worker = None
        w.channel.send(p.start_stop(()))
        # Not read again until relayed, and holding no frame: a background session costs nothing.
        w.channel.relay(False)
        self._standby[w.target] = w
        log.info("worker %s in standby (its VT is no longer active)", w)
        self._notify()

    async def _wait(self, timeout: float | None, *others: asyncio.Future[Any]) -> None:
        wake = asyncio.get_running_loop().create_task(self._wake.wait())
        try:
            await asyncio.wait({wake, *others}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            wake.cancel()

    def _stuck(self, w: _Worker) -> bool:
        """True when frames were expected for a whole watchdog period and none came."""
        now = time.monotonic()
        expecting = self.relay.is_open and self.relay.host_wants_frames and not self.relay.paused
        if not expecting:
            self._frames_expected_since = None
            return False
        if self._frames_expected_since is None:
            self._frames_expected_since = now
        if w.first_message_at is None:
            # Still starting (an interpreter start takes seconds on a slow guest): only a worker
            # that never says a word for several periods is stuck.
            return now - w.started > STARTUP_PERIODS * self._watchdog_s
        since = max(self._frames_expected_since, w.first_message_at)
        # A frame, or the worker's word that its picture has not changed (a static screen) or that
        # it has none now (a locked screen), resets it: such a worker is alive, not stuck; it still
        # sends nothing stale to the host.
        for last in (w.channel.last_frame_at, w.channel.last_unchanged_at,
                     w.channel.last_waiting_at):
            if last is not None:
                since = max(since, last)
        return now - since > self._watchdog_s

    # ---- worker lifecycle -------------------------------------------------------------------

    def _worker_argv(self, channel_fd: int, target: WorkerTarget) -> list[str]:
        argv = [*self._argv, "--device-fd", str(channel_fd),
                "--fps", str(self._fps), "--quality", str(self._quality),
                "--codecs", self._codecs]
        if target.wayland:
            argv += ["--source", "screencast"]
        return argv

    def _open_grants(self, target: WorkerTarget) -> FramebufferGrants | None:
        """A scanout reader's device and grant socket (None for a session's worker)."""
        if not target.scanout:
            return None
        try:
            return self._open_grants_for(target.card)
        except OSError as e:
            raise errors.ServiceError(f"cannot open the DRM device {target.card} for the "
                                      f"scanout reader: {e}") from None

    async def _spawn(self, target: WorkerTarget) -> _Worker | None:
        """A started worker with its socket, relayed to nothing yet; None (logged) on failure."""
        try:
            grants = self._open_grants(target)
        except errors.ServiceError as e:
            self._spawn_error = str(e)
            return None
        ours, theirs = socket_pair()
        argv = self._worker_argv(theirs.fileno(), target)
        extra: tuple[int, ...] = ()
        if grants is not None:
            extra = grants.reader_fds()
            argv += ["--source", "scanout", "--card-fd", str(extra[0]), "--grant-fd", str(extra[1])]
        try:
            child = await workerprocess.spawn(argv, target, theirs.fileno(), extra_fds=extra,
                                              cgroups=cgroup.resolve(self._cgroups))
        except errors.ServiceError as e:
            ours.close()
            if grants is not None:
                grants.close()
            self._spawn_error = str(e)
            return None
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            ours.close()
            if grants is not None:
                grants.close()
            self._spawn_error = f"cannot start worker: {e}"
            return None
        finally:
            theirs.close()
        if grants is not None:
            grants.started()
        label = f"worker uid={target.uid} vt={target.vt} pid={child.pid}"
        holder: list[_Worker] = []
        channel = WorkerChannel(
            ours, label=label,
            check=lambda msg: self._refusal(holder[0], msg),
            deliver=lambda msg: self._from_worker(holder[0], msg),
            on_closed=self._wake.set,
            on_no_picture=lambda: self._on_no_picture(holder[0]))
        worker = _Worker(target, child, channel, grants)
        worker.detached = True
        holder.append(worker)
        return worker

    async def _start_worker(self, target: WorkerTarget) -> None:
        self.relay.start()
        if not self.relay.is_open:
            self._failure(target, f"cannot open the stream port {self.relay.path}", 0.0)
            return
        worker = await self._spawn(target)
        if worker is None:
            self._failure(target, self._spawn_error, 0.0)
            return
        log.info("worker started uid=%d vt=%d pid=%d display=%s",
                 target.uid, target.vt, worker.pid, target.label)
        self._promote(worker, fresh=True)

    def _refusal(self, w: _Worker, msg: Any) -> str | None:
        if w.awaiting_format and msg.type == p.MsgType.DATA:
            return None  # not refused: dropped in _from_worker, quietly
        return guestmessages.refusal(msg, self.relay.host_caps, self.relay.format_sent,
                                     self.relay.format_codec or p.CODEC_MJPEG, self.relay.host_codecs)

    def _from_worker(self, w: _Worker, msg: Any) -> None:
        if msg.type == p.MsgType.CAPABILITIES:
            w.caps = msg  # sent once at its start: kept for when it is relayed
        first, w.reported = not w.reported, True
        if first:
            w.first_message_at = time.monotonic()
        if w is self._cover:
            self.relay.submit(msg)
            return
        if self._worker is not w or w.detached:
            return
        if first:
            log.info("worker running %s", w)
            self._set_state("running")
        if self._cover is not None:
            if msg.type in (p.MsgType.FORMAT, p.MsgType.DATA):
                self._end_cover(w, "its picture is back")
            return  # said for the stream it had before the cover: FORMAT and a frame follow
        if w.awaiting_format:
            if msg.type == p.MsgType.DATA:
                return
            if msg.type == p.MsgType.FORMAT:
                w.awaiting_format = False
        self.relay.submit(msg)

    # ---- the scanout covering for a worker without a picture --------------------------------

    def _on_no_picture(self, w: _Worker) -> None:
        """The relayed worker has no picture (a lock screen, a screen cast being created again):
        the display's scanout is relayed meanwhile, if its reader waits in standby."""
        if self._worker is not w or w.detached or self._cover is not None or w.target.scanout:
            return
        if w.target != self._target:
            # Its session has just left the screen (its own NO_PICTURE says so, read before the
            # switch is carried out): the next worker is relayed in a moment, and a cover now
            # would start the reader only to stop it, in the middle of a VT switch.
            return
        if not self.relay.host_wants_frames or self._left_the_screen(w):
            return
        cover = next((sw for t, sw in self._standby.items()
                      if t.scanout and not sw.wait_task.done()), None)
        if cover is None:
            return
        self._cover = cover
        cover.channel.relay(True)
        self.relay.attach(cover.channel.send)  # the host's state: it starts with FORMAT
        if cover.caps is not None:
            self.relay.submit(cover.caps)
        log.info("worker %s has no picture: the display's scanout (%s) is shown meanwhile", w, cover)
        self._notify()

    def _left_the_screen(self, w: _Worker) -> bool:
        """Whether the kernel shows another VT than `w`'s session, for less than LEFT_GRACE_S
        since its NO_PICTURE first said so: mutter hears of a switch before logind's signal
        reaches the service, and the next worker is relayed in a moment; a cover now starts the
        reader in the middle of the switch, taking CPU from the session switched to (VM 17 under
        TCG: bob's X11 worker sent its first frame 2.5 s after it was relayed, while the reader
        covered for alice's left session). Past the grace, covered: a kernel VT that no session
        change follows does not keep the picture away."""
        vt = self._kernel_vt()
        if vt is None or not w.target.vt or vt == w.target.vt:
            w.left_at = None
            return False
        now = time.monotonic()
        if w.left_at is None:
            w.left_at = now
            log.info("worker %s has no picture: the kernel shows VT %d, the switch is on its way",
                     w, vt)
        return now - w.left_at < LEFT_GRACE_S

    def _end_cover(self, w: _Worker | None, why: str) -> None:
        """The scanout goes back to standby; `w` (still the relayed worker) is attached again and
        starts over with FORMAT and a whole frame."""
        cover, self._cover = self._cover, None
        if cover is None:
            return
        self.relay.detach()
        if not cover.channel.closed:
            cover.channel.send(p.start_stop(()))
            cover.channel.relay(False)
        if w is not None and self._worker is w and not w.detached:
            w.awaiting_format = True
            self.relay.attach(w.channel.send)
            if w.caps is not None:
                self.relay.submit(w.caps)
            log.info("worker %s relayed again (%s)", w, why)
        self._notify()

    def _detach(self, w: _Worker) -> None:
        """From here on nothing the worker sends reaches the port, and the next worker is relayed
        only after: the relay forgets it before anything else happens."""
        w.detached = True
        if self._worker is w:
            self._end_cover(None, "")
            self.relay.detach()

    def _failure(self, target: WorkerTarget, error: str, ran_s: float) -> None:
        delay = self._policy.failed(error, ran_s)
        if delay is None:
            log.error("worker for uid=%d vt=%d failed %d times in a row, giving up: %s",
                      target.uid, target.vt, self._policy.quick_failures, error)
            self._set_state("failed")
            return
        log.warning("worker for uid=%d vt=%d: %s; restart in %.1f s",
                    target.uid, target.vt, error, delay)
        self._set_state("backoff")

    async def _on_unexpected_exit(self, w: _Worker) -> None:
        rc = await w.wait_task
        ran = time.monotonic() - w.started
        self._detach(w)
        w.close_io()
        if self._worker is w:
            self._worker = None
        if rc == ExitCode.STOPPED_BY_USER:
            self._stopped_by_user(w)
            self._set_state("idle")
            return
        log.info("worker exited %s %s after %.1f s", w, exit_text(rc), ran)
        self._failure(w.target, f"worker pid {w.pid} {exit_text(rc)}", ran)

    def _stopped_by_user(self, w: _Worker, logged: bool = True) -> None:
        """Its user ended the capture in the desktop: not restarted (a restart would start a
        screencast the user just stopped, and again at each Stop: a loop), until the session
        registers anew (a new login, or its helper started again)."""
        self._stopped.add(w.target)
        self._policy.last_error = (f"the user stopped the screen capture (worker pid {w.pid}, "
                                   f"exit {int(ExitCode.STOPPED_BY_USER)}); streamed again "
                                   "once the session registers anew")
        if logged:
            log.info("worker %s %s", w, STOPPED_TEXT)

    async def _stop_worker(self, reason: str) -> None:
        w = self._worker
        assert w is not None
        self._detach(w)
        # The socket closes after the worker has gone: closed first, a worker would take the
        # end of its stream for a lost device and say so as an error.
        rc, killed = await workerprocess.end(w.proc, w.wait_task, self._grace_s)
        w.close_io()
        if killed:
            log.warning("worker %s ignored SIGTERM for %.1f s: killed", w, self._grace_s)
        if self._worker is w:
            self._worker = None
        log.info("worker stopped %s (%s): %s", w, reason, exit_text(rc))
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
