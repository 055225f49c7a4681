"""A private system-type dbus-daemon enforcing OUR policy file, test users, and the service under test."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .dbusdaemon import DBusDaemon
from .waiting import stop_process, wait_until  # noqa: F401 - re-exported for tests

REPO = Path(__file__).resolve().parents[2]
POLICY_FILE = REPO / "dbus" / "org.spice_space.StreamingAgent1.conf"
POLKIT_BUS_POLICY = Path("/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf")
VENV_BIN = Path(sys.executable).parent

TEST_USERS = ("spice-test-a", "spice-test-b")

# The default policy of Debian's system.conf (deny method calls and ownership unless a file
# allows them), our policy file included verbatim, and test-only ownership for the mocks.
_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
  </policy>
  <!-- test only: the mocks run as root -->
  <policy user="root">
    <allow own="org.freedesktop.login1"/>
    <allow own="org.freedesktop.PolicyKit1"/>
  </policy>
  <policy context="default">
    <allow send_destination="org.freedesktop.login1"/>
    <allow send_destination="org.freedesktop.PolicyKit1"/>
  </policy>
  <include ignore_missing="yes">{polkit_policy}</include>
  <include>{policy}</include>
  {servicedir}
</busconfig>
"""


def ensure_test_user(name: str) -> pwd.struct_passwd:
    """A system user for tests (created once, idempotent): real uids for bus credentials."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        name], check=False, capture_output=True)
        return pwd.getpwnam(name)


class PolicyBus(DBusDaemon):
    """dbus-daemon with the project's real policy, on a socket other uids can reach."""

    def __init__(self, policy: Path = POLICY_FILE, servicedir: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        """servicedir: activation files the bus may start services from (it spawns them itself,
        with `env` as their environment: a test bus has no setuid launch helper)."""
        config = _CONFIG.format(
            socket="{socket}", policy=policy, polkit_policy=POLKIT_BUS_POLICY,
            servicedir=f"<servicedir>{servicedir}</servicedir>" if servicedir else "")
        super().__init__(config, env=env, prefix="spice-policy-bus-")

    def busctl(self, *args: str, user: str | None = None, timeout: float = 10.0
               ) -> subprocess.CompletedProcess:
        kwargs = {}
        if user is not None:
            pw = pwd.getpwnam(user)
            kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        return subprocess.run(["busctl", f"--address={self.address}", *args],
                              capture_output=True, text=True, timeout=timeout, **kwargs)


class ServiceProcess:
    """spice-streamd on a private bus; its stderr goes to a file the test can read."""

    def __init__(self, address: str, *, device: str = "/nonexistent/spice-stream-test",
                 env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        self.log_dir = tempfile.mkdtemp(prefix="spice-streamd-log-")
        self.log_path = os.path.join(self.log_dir, "service.log")
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
                    "SPICE_STREAMD_IDLE_EXIT": "0"}
        full_env.update(env or {})
        # An empty file: the machine's /etc/spice-streamd.conf must not change the test.
        config = os.path.join(self.log_dir, "empty.conf")
        open(config, "w").close()
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "spice-streamd"), "--bus", address, "--device", device,
             "--config", config, *args],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    @property
    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_ready(self, timeout: float = 15.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"spice-streamd exited with {self.proc.returncode}:\n{self.log}")
            return " ready on " in self.log
        wait_until(ready, timeout, "spice-streamd to own its name")

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()
        shutil.rmtree(self.log_dir, ignore_errors=True)


# Run as a test user with `python -c`: waits for one JSON line on stdin (so the test can first map
# this pid to a logind session), then performs it and prints one JSON line of results.
CLIENT_SCRIPT = r'''
import asyncio, json, sys, time
from dbus_next import Message, MessageType
from dbus_next.aio import MessageBus
from spice_stream_common import dbusnext_compat


async def main():
    dbusnext_compat.install()
    req = json.loads(sys.stdin.readline())
    bus = await MessageBus(bus_address=sys.argv[1]).connect()
    async def call(dest, path, iface, member, sig, body):
        t0 = time.monotonic()
        r = await bus.call(Message(destination=dest, path=path, interface=iface, member=member,
                                   signature=sig, body=body))
        dt = time.monotonic() - t0
        if r.message_type == MessageType.ERROR:
            return ["error", r.error_name, r.body[0] if r.body else "", dt]
        return ["ok", r.body[0] if r.body else None, dt]
    if req["op"] == "register":
        calls = [call("org.spice_space.StreamingAgent1", "/org/spice_space/StreamingAgent1",
                      "org.spice_space.StreamingAgent1", "RegisterSession", "ss", list(c))
                 for c in req["calls"]]
        results = await asyncio.gather(*calls)
    elif req["op"] == "register_wayland":
        # Each call's options: {key: string value}, or {"__count__": n} for n keys made here.
        from dbus_next import Variant
        def options(spec):
            if "__count__" in spec:
                return {"key%d" % i: Variant("s", "") for i in range(spec["__count__"])}
            return {k: Variant("s", v) for k, v in spec.items()}
        calls = [call("org.spice_space.StreamingAgent1", "/org/spice_space/StreamingAgent1",
                      "org.spice_space.StreamingAgent1", "RegisterWaylandSession", "a{sv}",
                      [options(c)])
                 for c in req["calls"]]
        results = await asyncio.gather(*calls)
    elif req["op"] == "own":
        results = [await call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                              "org.freedesktop.DBus", "RequestName", "su", [req["name"], 4])]
    else:
        results = [await call(*req["call"])]
    print(json.dumps(results), flush=True)
    if req.get("stay"):
        sys.stdin.readline()

asyncio.run(main())
'''


class UserClient:
    """CLIENT_SCRIPT running as `user`; start() then map .pid in logind, then send()."""

    def __init__(self, address: str, user: str) -> None:
        pw = pwd.getpwnam(user)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT_SCRIPT, address], user=pw.pw_uid, group=pw.pw_gid,
            extra_groups=[], cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, request: dict, timeout: float = 30.0) -> list:
        import json
        import select
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"client gave no answer within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"client died: {self.proc.stderr.read()}")
        return json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()


class HelperProcess:
    """spice-stream-helper as `user`; it waits for a line on stdin before exec (pid mapping)."""

    def __init__(self, address: str, user: str, display: str, xauthority: str,
                 extra_env: dict[str, str] | None = None) -> None:
        pw = pwd.getpwnam(user)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "DISPLAY": display,
               "XAUTHORITY": xauthority, "HOME": "/nonexistent"}
        env.update(extra_env or {})
        fd, self.output_path = tempfile.mkstemp(prefix="spice-helper-out-")
        self._out = os.fdopen(fd, "wb")
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", 'read go; exec "$0" "$@"', str(VENV_BIN / "spice-stream-helper"),
             "--bus", address], user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], cwd="/",
            stdin=subprocess.PIPE, stdout=self._out, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def go(self) -> None:
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    @property
    def output(self) -> str:
        with open(self.output_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc.stdin.close()
        self._out.close()
        try:
            os.unlink(self.output_path)
        except FileNotFoundError:
            pass


class UserFiles:
    """A world-traversable directory for files owned by test users (pytest's tmp_path is 0700)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="spice-user-files-")
        os.chmod(self.dir, 0o755)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def own(self, path: str, user: str, mode: int = 0o600) -> str:
        pw = pwd.getpwnam(user)
        os.lchown(path, pw.pw_uid, pw.pw_gid)
        if not os.path.islink(path):
            os.chmod(path, mode)
        return path

    def xauthority(self, user: str, display: str = ":42", name: str | None = None) -> str:
        """A real Xauthority file holding a cookie for `display`, owned by `user`, mode 0600."""
        import secrets
        path = self.path(name or f"xauth-{user}-{display.strip(':')}")
        subprocess.run(["xauth", "-q", "-f", path, "add", display, "MIT-MAGIC-COOKIE-1",
                        secrets.token_hex(16)], check=True, capture_output=True)
        return self.own(path, user)

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Stack:
    """Policy bus + logind mock + polkit (real, or dbusmock's), and everything a test starts on it.
    Logind sessions: "a" (spice-test-a, VT 2, active), "a4" (spice-test-a, VT 4), "b" (spice-test-b,
    VT 3). polkit authorizes `authorized` (spice-test-a by default)."""

    def __init__(self, polkit: str = "real", authorized: tuple[str, ...] = ("spice-test-a",),
                 servicedir: str | None = None, bus_env: dict[str, str] | None = None) -> None:
        from .logind import LogindMock
        from .polkit import MockPolkit, RealPolkit

        self.users = {u: ensure_test_user(u) for u in TEST_USERS}
        self._started: list = []
        self.bus = PolicyBus(servicedir=servicedir, env=bus_env)
        try:
            self.logind = LogindMock(self.bus.address)
            self._started.append(self.logind)
            if polkit == "real" and os.geteuid() == 0:
                self.polkit = RealPolkit(self.bus.address, list(authorized))
            else:
                self.polkit = MockPolkit(self.bus.address)
            self._started.append(self.polkit)
            self.files = UserFiles()
            a, b = self.uid("spice-test-a"), self.uid("spice-test-b")
            self.logind.add_session("a", a, 2, active=True, username="spice-test-a")
            self.logind.add_session("b", b, 3, username="spice-test-b")
            self.logind.add_session("a4", a, 4, username="spice-test-a")
            import dbus
            self.conn = dbus.bus.BusConnection(self.bus.address)
        except BaseException:
            self.close()
            raise
        self._per_test: list = []

    def uid(self, user: str) -> int:
        return self.users[user].pw_uid

    def service(self, env: dict[str, str] | None = None, args: tuple[str, ...] = (),
                ready: bool = True, device: str | None = None) -> ServiceProcess:
        kw = {"device": device} if device else {}
        svc = ServiceProcess(self.bus.address, env=env, args=args, **kw)
        self._per_test.append(svc)
        if ready:
            svc.wait_ready()
        return svc

    def helper(self, user: str, session: str, display: str = ":42",
               xauthority: str | None = None, extra_env: dict[str, str] | None = None
               ) -> HelperProcess:
        if xauthority is None:
            xauthority = self.files.xauthority(user, display)
        h = HelperProcess(self.bus.address, user, display, xauthority, extra_env)
        self._per_test.append(h)
        self.logind.map_pids(session, [h.pid])
        h.go()
        return h

    def client(self, user: str, session: str | None) -> UserClient:
        c = UserClient(self.bus.address, user)
        self._per_test.append(c)
        if session is not None:
            self.logind.map_pids(session, [c.pid])
        return c

    def register(self, user: str, session: str | None, display: str, xauthority: str) -> list:
        """One RegisterSession call from a fresh process of `user`; ["ok", vt, t] or
        ["error", name, text, t]."""
        c = self.client(user, session)
        try:
            return c.send({"op": "register", "calls": [[display, xauthority]]})[0]
        finally:
            c.stop()

    def register_wayland(self, user: str, session: str | None, options: dict | None = None
                         ) -> list:
        """One RegisterWaylandSession call from a fresh process of `user` (options: {key: str},
        or {"__count__": n} for n keys); ["ok", vt, t] or ["error", name, text, t]."""
        c = self.client(user, session)
        try:
            return c.send({"op": "register_wayland", "calls": [options or {}]})[0]
        finally:
            c.stop()

    def prop(self, name: str):
        obj = self.conn.get_object("org.spice_space.StreamingAgent1",
                                   "/org/spice_space/StreamingAgent1")
        value = obj.Get("org.spice_space.StreamingAgent1", name,
                        dbus_interface="org.freedesktop.DBus.Properties")
        if name == "Sessions":
            return [(int(v), int(u), str(d)) for v, u, d in value]
        if name in ("DevicePresent", "Streaming"):
            return bool(value)
        if name == "WorkerStats":
            return {str(k): (float(v) if k == "fps" else int(v)) for k, v in value.items()}
        return str(value) if isinstance(value, str) else int(value)

    def end_test(self) -> None:
        for p in reversed(self._per_test):
            try:
                p.stop()
            except Exception:  # noqa: BLE001 - cleanup must go on
                pass
        self._per_test = []

    def close(self) -> None:
        self.end_test()
        for p in reversed(self._started):
            p.stop()
        if getattr(self, "conn", None) is not None:
            self.conn.close()
        if getattr(self, "files", None) is not None:
            self.files.cleanup()
        self.bus.stop()
