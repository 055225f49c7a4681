"""The real polkitd on a private bus with our action installed and a rule authorizing chosen test users;
python-dbusmock's polkitd template where a test needs a polkit that never answers."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import dbus

from .bus import REPO, stop_process, wait_until

POLKITD = "/usr/lib/polkit-1/polkitd"
POLKIT_NAME = "org.freedesktop.PolicyKit1"
ACTIONS_DIR = Path("/usr/share/polkit-1/actions")
RULES_DIR = Path("/etc/polkit-1/rules.d")
ACTION_FILE = REPO / "polkit" / "org.spice_space.streaming-agent.policy"
ACTION_ID = "org.spice_space.streaming-agent.register-session"
RULE_NAME = "49-spice-streamd-test.rules"

_RULE = """// spice-streamd tests only: removed when the test session ends.
polkit.addRule(function(action, subject) {{
    if (action.id == "{action}" && {users}.indexOf(subject.user) >= 0) {{
        return polkit.Result.YES;
    }}
}});
"""


def _name_owned(address: str) -> bool:
    conn = dbus.bus.BusConnection(address)
    try:
        return bool(conn.name_has_owner(POLKIT_NAME))
    finally:
        conn.close()


class RealPolkit:
    """polkitd serving the private bus; `authorized` users get YES for our action by a rule, any
    other non-root user falls to the action's allow_any (no) since no logind places it in a session."""

    def __init__(self, address: str, authorized: Iterable[str]) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("the real polkitd needs root; use MockPolkit")
        self._installed: list[Path] = []
        try:
            action_dst = ACTIONS_DIR / ACTION_FILE.name
            if not action_dst.exists():
                shutil.copyfile(ACTION_FILE, action_dst)
                self._installed.append(action_dst)
            rule = RULES_DIR / RULE_NAME
            rule.write_text(_RULE.format(action=ACTION_ID, users=repr(sorted(authorized))))
            self._installed.append(rule)
            try:
                pw = pwd.getpwnam("polkitd")
                os.chown(rule, pw.pw_uid, pw.pw_gid)
            except KeyError:
                pass
            os.chmod(rule, 0o644)
            env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address)
            self.proc = subprocess.Popen([POLKITD, "--no-debug"], env=env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            wait_until(lambda: self.proc.poll() is not None or _name_owned(address), 15,
                       "polkitd to own org.freedesktop.PolicyKit1")
            if self.proc.poll() is not None:
                raise RuntimeError(f"polkitd exited with {self.proc.returncode}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None:
            stop_process(proc)
        for path in self._installed:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        self._installed = []


class MockPolkit:
    """python-dbusmock's polkitd template: SetAllowed, AllowUnknown, SimulateHang."""

    def __init__(self, address: str) -> None:
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dbusmock", "--system", "--template", "polkitd"], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            wait_until(lambda: self.proc.poll() is not None or _name_owned(address), 15,
                       "dbusmock polkitd")
            if self.proc.poll() is not None:
                raise RuntimeError(f"dbusmock polkitd exited with {self.proc.returncode}")
            self.conn = dbus.bus.BusConnection(address)
            self.mock = dbus.Interface(
                self.conn.get_object(POLKIT_NAME, "/org/freedesktop/PolicyKit1/Authority"),
                "org.freedesktop.DBus.Mock")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process(self.proc)
        conn = getattr(self, "conn", None)
        if conn is not None:
            conn.close()
