"""A private dbus-daemon on a socket in a temporary directory that other uids can reach."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from .waiting import stop_process, wait_until


class DBusDaemon:
    """Runs dbus-daemon with `config` ({socket} is filled in); stop() ends it and removes its files."""

    def __init__(self, config: str, env: dict[str, str] | None = None, prefix: str = "spice-bus-") -> None:
        self.dir = tempfile.mkdtemp(prefix=prefix)
        os.chmod(self.dir, 0o755)  # helpers running as other uids must reach the socket
        self.socket = os.path.join(self.dir, "bus")
        self.address = f"unix:path={self.socket}"
        conf = os.path.join(self.dir, "bus.conf")
        with open(conf, "w") as f:
            f.write(config.replace("{socket}", self.socket))
        self.proc = subprocess.Popen(
            ["dbus-daemon", "--config-file", conf, "--nofork", "--nopidfile"],
            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            wait_until(lambda: os.path.exists(self.socket) or self.proc.poll() is not None,
                       what="dbus-daemon socket")
            if self.proc.poll() is not None:
                raise RuntimeError(f"dbus-daemon exited with {self.proc.returncode}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
