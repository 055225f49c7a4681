"""One QEMU guest for the VM suite, driven only through QMP and qemu-guest-agent.

QEMU runs with -snapshot (the cached image is never written; the overlay survives guest reboots while
the QEMU process lives), KVM only where it is real (/dev/kvm usable and not kvm_pvm), else TCG with AVX
hidden (NOTES: gnome-shell's llvmpipe crashed under TCG with -cpu max). The guest gets QXL, QEMU's SPICE
server on 127.0.0.1:<free port>, the SPICE stream port exactly as the README shows, the guest agent
port, two 9p shares (read-only `share`, writable `results`) and its serial console in a log file.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.waiting import stop_process, wait_until

PR_SET_PDEATHSIG = 1
STREAM_PORT = "org.spice-space.stream.0"
GUEST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def kvm_usable() -> bool:
    """Real KVM: /dev/kvm opens and it is not kvm_pvm (which runs only PVM-built guest kernels)."""
    if os.path.exists("/sys/module/kvm_pvm"):
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # QEMU must not outlive the suite, even when the suite is killed with SIGKILL.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setpgrp()


class GuestError(RuntimeError):
    pass


@dataclass
class Result:
    cmd: str
    rc: int
    out: str
    err: str

    def check(self) -> Result:
        if self.rc != 0:
            raise GuestError(f"guest command failed ({self.rc}): {self.cmd}\n{self.out[-2000:]}"
                             f"{self.err[-2000:]}")
        return self


class _JsonSocket:
    """A line-oriented JSON peer on a unix socket (QMP or the guest agent)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""
        self.lock = threading.Lock()

    def send(self, obj: dict) -> None:
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def read_line(self, deadline: float) -> bytes:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError("no answer") from None
            if not chunk:
                raise ConnectionError("socket closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class QMP(_JsonSocket):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.events: list[dict] = []
        deadline = time.monotonic() + 10
        json.loads(self.read_line(deadline))  # greeting
        self.command("qmp_capabilities")

    def command(self, name: str, timeout: float = 30.0, **args) -> object:
        with self.lock:
            self.send({"execute": name, **({"arguments": args} if args else {})})
            deadline = time.monotonic() + timeout
            while True:
                reply = json.loads(self.read_line(deadline))
                if "event" in reply:
                    self.events.append(reply)
                    continue
                if "error" in reply:
                    raise GuestError(f"QMP {name}: {reply['error']}")
                return reply.get("return")


class GuestAgent(_JsonSocket):
    """qemu-guest-agent over its virtio port (a socket chardev on the host).

    Every exchange starts with guest-sync-delimited and a fresh id, so replies to requests the agent
    saw late (before a reboot, or sent while it was not running) are skipped, never taken as ours.
    """

    def sync(self, timeout: float = 3.0) -> bool:
        ident = random.randrange(1, 2**31)
        deadline = time.monotonic() + timeout
        try:
            self.buf = b""
            # 0xff makes a half-read request of a previous exchange fail parsing in the agent.
            self.sock.sendall(b"\xff")
            self.send({"execute": "guest-sync-delimited", "arguments": {"id": ident}})
            while True:
                line = self.read_line(deadline)
                line = line[line.rfind(b"\xff") + 1:]
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("return") == ident:
                        return True
        except (TimeoutError, ConnectionError, OSError):
            return False

    synced = False

    def command(self, name: str, timeout: float = 20.0, **args) -> object:
        with self.lock:
            if not self.synced:
                if not self.sync(min(timeout, 5.0)):
                    raise GuestError(f"guest agent not answering ({name})")
                self.synced = True
            try:
                self.send({"execute": name, **({"arguments": args} if args else {})})
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        reply = json.loads(self.read_line(deadline))
                    except ValueError:
                        continue
                    if "error" in reply:
                        raise GuestError(f"guest agent {name}: {reply['error']}")
                    if "return" in reply:
                        return reply["return"]
            except (TimeoutError, ConnectionError, OSError) as exc:
                # A reply may still come: the next exchange starts with a sync.
                self.synced = False
                raise GuestError(f"guest agent {name}: {exc}") from None


class VM:
    """A running guest. Use as a context manager: QEMU is always killed at the end."""

    def __init__(self, image, logdir: Path, share: Path, results: Path, log=print,
                 memory_mb: int = 4096, cpus: int = 2, vga: str = "qxl") -> None:
        """`vga`: QEMU's -vga adapter, "qxl" or "virtio" (virtio-vga: virtio-gpu's 2D device)."""
        self.image = image
        self.logdir = logdir
        self.share = share
        self.results = results
        self.say = log
        self.spice_port = free_port()
        self.rundir = logdir / "qemu"
        self.rundir.mkdir(parents=True, exist_ok=True)
        self.qmp_path = self.rundir / "qmp.sock"
        self.qga_path = self.rundir / "qga.sock"
        self.serial_log = logdir / "serial.log"
        self.cmdlog = open(logdir / "guest-commands.log", "a", buffering=1)
        self.kvm = kvm_usable()
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.vga = vga
        self.proc: subprocess.Popen | None = None
        self.qmp: QMP | None = None
        self.qga: GuestAgent | None = None

    # -- lifetime -------------------------------------------------------------------------------

    def argv(self) -> list[str]:
        if self.kvm:
            accel = ["-accel", "kvm", "-cpu", "host"]
        else:
            accel = ["-accel", "tcg,thread=multi,tb-size=512",
                     "-cpu", "max,avx=off,avx2=off,fma=off,f16c=off,vaes=off,vpclmulqdq=off"]
        return [
            "qemu-system-x86_64", "-name", "spice-streamd-vm", "-nodefaults", "-no-user-config",
            *accel, "-m", str(self.memory_mb), "-smp", str(self.cpus),
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
            # panic=1: the guest restarts after a kernel panic instead of hanging until a timeout.
            # Seen under TCG with Debian 13's kernel 6.12: "Oops: int3" in sched_clock_cpu 4 s into
            # a boot (a static key being patched while the other vCPU ran that code), then "Kernel
            # panic - not syncing: Fatal exception in interrupt". The restart is counted and
            # reported (panics()), never hidden.
            "-append", "root=/dev/vda rw console=tty0 console=ttyS0,115200 systemd.show_status=1 "
                       "panic=1",
            "-drive", f"file={self.image.rootfs},format=raw,if=virtio,cache=unsafe",
            "-snapshot",
            "-vga", self.vga,
            "-display", "none",
            "-nic", "none",
            "-device", "virtio-rng-pci",
            "-serial", f"file:{self.serial_log}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-spice", f"port={self.spice_port},addr=127.0.0.1,disable-ticketing=on",
            "-device", "virtio-serial-pci",
            "-chardev", f"spiceport,id=stream0,name={STREAM_PORT}",
            "-device", f"virtserialport,chardev=stream0,name={STREAM_PORT}",
            "-chardev", f"socket,id=qga0,path={self.qga_path},server=on,wait=off",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-virtfs", f"local,path={self.share},mount_tag=share,security_model=none,readonly=on",
            "-virtfs", f"local,path={self.results},mount_tag=results,security_model=none",
        ]

    def start(self) -> None:
        argv = self.argv()
        (self.logdir / "qemu-command.txt").write_text(shlex.join(argv) + "\n")
        self.say(f"starting QEMU ({'KVM' if self.kvm else 'TCG'}), SPICE on 127.0.0.1:"
                 f"{self.spice_port}, serial console {self.serial_log}")
        # QEMU's -snapshot overlay goes to $TMPDIR: keep it out of a (possibly small) /tmp.
        env = dict(os.environ, TMPDIR=str(self.rundir))
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=open(self.logdir / "qemu.log", "ab"),
                                     stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                     env=env)
        wait_until(lambda: self.qmp_path.exists() and self.qga_path.exists() or self._dead(),
                   30, "QEMU's sockets")
        self._check_alive()
        self.qmp = QMP(self.qmp_path)
        self.qga = GuestAgent(self.qga_path)

    def panics(self) -> list[str]:
        """The guest kernel's panics so far (serial console lines), each followed by a restart."""
        try:
            text = self.serial_log.read_text(errors="replace")
        except OSError:
            return []
        return [line.strip() for line in text.splitlines() if "Kernel panic - not syncing" in line
                and "end Kernel panic" not in line]

    def _dead(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def _check_alive(self) -> None:
        if self._dead():
            tail = (self.logdir / "qemu.log").read_text(errors="replace")[-2000:]
            raise GuestError(f"QEMU exited with {self.proc.returncode}: {tail}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None and self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.command("quit", timeout=5)
        with contextlib.suppress(Exception):
            self.proc.wait(5)
        stop_process(self.proc, timeout=5)
        for peer in (self.qmp, self.qga):
            if peer is not None:
                peer.close()
        self.cmdlog.close()
        self.say(f"QEMU stopped (exit {self.proc.returncode})")

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the guest agent ------------------------------------------------------------------------

    def agent_up(self) -> bool:
        self._check_alive()
        assert self.qga is not None
        with self.qga.lock:
            self.qga.synced = self.qga.sync(2.0)
            return self.qga.synced

    def wait_agent(self, timeout: float) -> None:
        wait_until(self.agent_up, timeout, "the guest agent to answer", interval=0.5)

    def boot_id(self) -> str:
        return self.sh("cat /proc/sys/kernel/random/boot_id").check().out.strip()

    def sh(self, script: str, timeout: float = 60.0, user: str | None = None,
           env: dict[str, str] | None = None, quiet: bool = False) -> Result:
        """Run a shell script in the guest (as root, or as `user` through runuser) and wait for it."""
        self._check_alive()
        assert self.qga is not None
        argv = ["/bin/sh", "-c", script]
        if user:
            argv = ["/usr/sbin/runuser", "-u", user, "--", *argv]
        envlist = [f"PATH={GUEST_PATH}", "LANG=C.UTF-8", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0",
                   *(f"{k}={v}" for k, v in (env or {}).items())]
        if user:
            argv = ["/usr/bin/env", *envlist, *argv]
        t0 = time.monotonic()
        started = self.qga.command("guest-exec", path=argv[0], arg=argv[1:], env=envlist,
                                   **{"capture-output": True})
        pid = started["pid"]
        status: dict = {}

        def done() -> bool:
            nonlocal status
            status = self.qga.command("guest-exec-status", pid=pid)
            return bool(status.get("exited"))

        try:
            wait_until(done, timeout, f"guest command {script[:80]!r}", interval=0.1)
        except AssertionError:
            self.cmdlog.write(f"[{time.strftime('%H:%M:%S')}] TIMEOUT {script}\n")
            raise GuestError(f"guest command timed out after {timeout:g} s: {script}") from None
        out = base64.b64decode(status.get("out-data", "")).decode("utf-8", "replace")
        err = base64.b64decode(status.get("err-data", "")).decode("utf-8", "replace")
        rc = status.get("exitcode", -(status.get("signal") or 255))
        if not quiet:
            self.cmdlog.write(f"[{time.strftime('%H:%M:%S')}] ({time.monotonic() - t0:.1f} s) rc={rc}"
                              f"{' as ' + user if user else ''}: {script}\n")
            for text in (out, err):
                if text.strip():
                    self.cmdlog.write("    " + text.rstrip()[-4000:].replace("\n", "\n    ") + "\n")
        return Result(script, rc, out, err)

    def spawn(self, script: str) -> None:
        """Start a guest command without waiting for it (e.g. a reboot)."""
        assert self.qga is not None
        self.cmdlog.write(f"[{time.strftime('%H:%M:%S')}] spawn: {script}\n")
        self.qga.command("guest-exec", path="/bin/sh", arg=["-c", script],
                         env=[f"PATH={GUEST_PATH}"])

    def reboot(self, timeout: float) -> None:
        """`systemctl reboot` in the guest; returns once the agent answers in the new boot."""
        old = self.boot_id()
        self.spawn("systemctl reboot")

        def new_boot() -> bool:
            if not self.agent_up():
                return False
            try:
                return self.sh("cat /proc/sys/kernel/random/boot_id", timeout=10,
                               quiet=True).out.strip() not in ("", old)
            except GuestError:
                return False

        wait_until(new_boot, timeout, "the guest to reboot", interval=1.0)

    def read_file(self, path: str) -> bytes:
        """A guest file's bytes, through guest-file-open/read."""
        assert self.qga is not None
        handle = self.qga.command("guest-file-open", path=path, mode="r")
        data = b""
        try:
            while True:
                chunk = self.qga.command("guest-file-read", handle=handle, count=4 * 1024 * 1024)
                data += base64.b64decode(chunk.get("buf-b64", ""))
                if chunk.get("eof") or not chunk.get("count"):
                    break
        finally:
            self.qga.command("guest-file-close", handle=handle)
        return data
