"""RegisterWaylandSession through the bus: real callers under the test uids, the real polkitd, our
bus policy, logind's mock with Type=wayland sessions and User.RuntimePath pointing at a real
directory of the test user's with a real socket as its session bus."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import time

import pytest

from tests.support.bus import wait_until

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real polkitd, test users")]

ERR = "org.spice_space.StreamingAgent1.Error."
A, B = "spice-test-a", "spice-test-b"


class RuntimeDir:
    """A user's runtime directory (0700, theirs) holding a listening socket `bus` of theirs."""

    def __init__(self, files, user: str) -> None:
        self.user = user
        self.pw = pwd.getpwnam(user)
        self.path = files.path(f"run-{user}")
        os.mkdir(self.path)
        os.chown(self.path, self.pw.pw_uid, self.pw.pw_gid)
        os.chmod(self.path, 0o700)
        self.bus = os.path.join(self.path, "bus")
        self.sock: socket.socket | None = None
        self.make_socket()

    def make_socket(self) -> None:
        self.remove_bus()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.bus)
        self.sock.listen()
        os.lchown(self.bus, self.pw.pw_uid, self.pw.pw_gid)

    def remove_bus(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if os.path.lexists(self.bus):
            os.unlink(self.bus)

    def close(self) -> None:
        self.remove_bus()
        shutil.rmtree(self.path, ignore_errors=True)


@pytest.fixture(scope="module")
def wl(stack_module):
    """The stack with Wayland sessions "wa" (spice-test-a, VT 5) and "wb" (spice-test-b, VT 6),
    and each user's runtime directory with its session bus socket."""
    s = stack_module
    s.logind.add_session("wa", s.uid(A), 5, type="wayland", username=A)
    s.logind.add_session("wb", s.uid(B), 6, type="wayland", username=B)
    s.runtime = {u: RuntimeDir(s.files, u) for u in (A, B)}
    for u, r in s.runtime.items():
        s.logind.set_runtime_path(s.uid(u), r.path)
    try:
        yield s
    finally:
        for r in s.runtime.values():
            r.close()


@pytest.fixture
def stack(wl):
    """A fresh service per test (the per-uid rate limit must not carry over), "wa" active."""
    try:
        wl.logind.activate("wa")
        wl.current_service = wl.service()
        yield wl
    finally:
        wl.end_test()
        wl.logind.activate("a")
        for r in wl.runtime.values():
            if r.sock is None:
                r.make_socket()
            wl.logind.set_runtime_path(wl.uid(r.user), r.path)


def refused(result: list, name: str, *says: str) -> None:
    assert result[:2] == ["error", ERR + name], result
    for text in says:
        assert text in result[2], result


def test_the_active_wayland_session_registers_and_is_listed_as_wayland(stack):
    uid = stack.uid(A)
    c = stack.client(A, "wa")
    assert c.send({"op": "register_wayland", "calls": [{}], "stay": True})[0][:2] == ["ok", 5]
    assert stack.prop("Sessions") == [(5, uid, "wayland")]
    log = stack.current_service.log
    runtime = stack.runtime[A].path
    assert re.search(rf"session registered: uid {uid} pid {c.pid} VT 5 wayland runtime "
                     rf"\"{re.escape(runtime)}\" session wa", log), log
    c.stop()
    wait_until(lambda: stack.prop("Sessions") == [], what="the registration gone with its caller")


def test_the_helper_registers_a_wayland_session_and_stays(stack):
    uid = stack.uid(A)
    h = stack.helper(A, "wa", extra_env={"XDG_SESSION_TYPE": "wayland"})
    wait_until(lambda: stack.prop("Sessions") == [(5, uid, "wayland")], what="listed")
    wait_until(lambda: "this Wayland session registered: streamed while VT 5 is active"
               in h.output, what="the helper's line")
    assert h.proc.poll() is None


def outside_any_session(stack, user: str, display_session: str | None):
    """A fresh process of `user` in no session, its user's display session `display_session`."""
    c = stack.client(user, None)
    stack.logind.map_user_pids(stack.uid(user), [c.pid])
    stack.logind.set_user_display(stack.uid(user), display_session)
    return c


def test_a_background_wayland_helper_registers_once_its_session_is_active(stack):
    """The service restarted while a's Wayland session was in the background: refused
    (NotInSession, not active), its helper waits for logind to say it became active."""
    uid = stack.uid(A)
    stack.logind.activate("a")
    h = stack.helper(A, "wa", extra_env={"XDG_SESSION_TYPE": "wayland"})
    wait_until(lambda: "registering again when this session becomes the active one" in h.output,
               what="the helper waiting")
    assert "NotInSession" in h.output and h.proc.poll() is None
    assert stack.prop("Sessions") == []
    stack.logind.activate("wa")
    wait_until(lambda: stack.prop("Sessions") == [(5, uid, "wayland")], timeout=15,
               what="registered once active")


def test_an_active_wayland_session_refused_for_good_ends_its_helper(stack):
    r = stack.runtime[A]
    r.remove_bus()
    h = stack.helper(A, "wa", extra_env={"XDG_SESSION_TYPE": "wayland"})
    assert h.wait() == 1
    assert "registration refused (NotInSession): no session bus at" in h.output
    assert "dbus-user-session" in h.output


def test_the_wayland_helper_registers_again_with_a_restarted_service(stack):
    import signal

    uid = stack.uid(A)
    h = stack.helper(A, "wa", extra_env={"XDG_SESSION_TYPE": "wayland"})
    wait_until(lambda: stack.prop("Sessions") == [(5, uid, "wayland")], what="registered")
    svc = stack.current_service
    svc.proc.send_signal(signal.SIGKILL)
    svc.proc.wait(5)
    stack.current_service = stack.service()
    wait_until(lambda: stack.prop("Sessions") == [(5, uid, "wayland")], timeout=15,
               what="registered with the new service")
    assert h.proc.poll() is None


def test_the_autostart_helper_outside_the_session_gets_the_users_wayland_session(stack):
    # GNOME's autostart runs in systemd --user, outside the session's scope: the user's display
    # session counts if it is seat0's active local Wayland session.
    uid = stack.uid(A)
    try:
        c = outside_any_session(stack, A, "wa")
        assert c.send({"op": "register_wayland", "calls": [{}]})[0][:2] == ["ok", 5]
        # Its display session is the X11 one: refused, as an X11 session calling it.
        stack.logind.activate("a")
        c = outside_any_session(stack, A, "a")
        refused(c.send({"op": "register_wayland", "calls": [{}]})[0], "NotInSession",
                "not a Wayland session")
        # Its display session is not the active one: refused by the fallback itself.
        c = outside_any_session(stack, A, "wa")
        refused(c.send({"op": "register_wayland", "calls": [{}]})[0], "NotInSession",
                "not seat0's active local X11 or Wayland session")
    finally:
        stack.logind.set_user_display(uid, None)


def test_an_x11_session_calling_register_wayland_session_is_refused(stack):
    stack.logind.activate("a")  # spice-test-a's X11 session, active
    refused(stack.register_wayland(A, "a"), "NotInSession", "not a Wayland session",
            "RegisterSession")
    assert stack.prop("Sessions") == []


def test_a_wayland_session_calling_register_session_is_still_refused(stack):
    xa = stack.files.xauthority(A, ":45", name="xa-wayland")
    refused(stack.register(A, "wa", ":45", xa), "NotInSession", "Wayland session",
            "RegisterWaylandSession")


def test_a_wayland_session_in_the_background_is_refused(stack):
    stack.logind.activate("a")
    refused(stack.register_wayland(A, "wa"), "NotInSession", "not seat0's active session")


@pytest.mark.parametrize("name, bad, good, says", [
    ("Remote", True, False, "remote session"),
    ("State", "closing", "active", "has ended"),
    ("Seat", "seat1", "seat0", "not seat0"),
])
def test_remote_closing_or_other_seat_is_refused_whatever_polkit_says(stack, name, bad, good,
                                                                      says):
    import dbus

    def value(v):
        return dbus.Struct((v, dbus.ObjectPath(f"/org/freedesktop/login1/seat/{v}"))) \
            if name == "Seat" else v

    stack.logind.set_property("wa", name, value(bad))
    try:
        refused(stack.register_wayland(A, "wa"), "NotInSession", says)
    finally:
        stack.logind.set_property("wa", name, value(good))
    # The control: the same caller is accepted once logind's view is good again.
    assert stack.register_wayland(A, "wa")[:2] == ["ok", 5]


def test_no_session_bus_socket_is_refused_with_what_is_needed(stack):
    r = stack.runtime[A]
    r.remove_bus()
    refused(stack.register_wayland(A, "wa"), "NotInSession",
            f"no session bus at {r.path}/bus: the systemd user instance (dbus-user-session) "
            "is needed")


def test_a_symlink_as_the_bus_socket_is_refused(stack):
    # To b's real socket: followed, the check would see a socket (of b's).
    r, other = stack.runtime[A], stack.runtime[B]
    r.remove_bus()
    os.symlink(other.bus, r.bus)
    os.lchown(r.bus, r.pw.pw_uid, r.pw.pw_gid)
    refused(stack.register_wayland(A, "wa"), "NotInSession", "symbolic link")


def test_a_symlink_to_an_own_socket_is_refused_too(stack):
    r = stack.runtime[A]
    r.remove_bus()
    own = os.path.join(r.path, "real-bus")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(own)
        os.lchown(own, r.pw.pw_uid, r.pw.pw_gid)
        os.symlink(own, r.bus)
        os.lchown(r.bus, r.pw.pw_uid, r.pw.pw_gid)
        refused(stack.register_wayland(A, "wa"), "NotInSession", "symbolic link")
    finally:
        sock.close()
        os.unlink(own)
        os.unlink(r.bus)


def test_a_bus_socket_of_another_user_is_refused(stack):
    r = stack.runtime[A]
    b = stack.users[B]
    os.lchown(r.bus, b.pw_uid, b.pw_gid)
    refused(stack.register_wayland(A, "wa"), "NotInSession",
            f"belongs to uid {b.pw_uid}, not to uid {stack.uid(A)}")


def test_a_regular_file_as_the_bus_is_refused(stack):
    r = stack.runtime[A]
    r.remove_bus()
    with open(r.bus, "w"):
        pass
    os.chown(r.bus, r.pw.pw_uid, r.pw.pw_gid)
    refused(stack.register_wayland(A, "wa"), "NotInSession", "is not a socket")


def test_the_runtime_dir_is_looked_at_as_the_user_not_as_root(stack):
    # A runtime dir of a's with a's own bus socket, but inside a directory only root may search:
    # everything would pass for root; a cannot reach it, so the service refuses.
    locked = stack.files.path("locked")
    os.mkdir(locked, 0o700)
    try:
        r = RuntimeDir(type("Files", (), {"path": staticmethod(
            lambda name: os.path.join(locked, name))})(), A)
        try:
            stack.logind.set_runtime_path(stack.uid(A), r.path)
            refused(stack.register_wayland(A, "wa"), "NotInSession",
                    f"uid {stack.uid(A)} cannot reach its runtime directory")
            os.chmod(locked, 0o711)  # the control: searchable by a, it passes
            assert stack.register_wayland(A, "wa")[:2] == ["ok", 5]
        finally:
            r.close()
    finally:
        shutil.rmtree(locked, ignore_errors=True)


@pytest.mark.parametrize("path, says", [
    ("relative/run", "not a plain absolute path"),
    ("/run/user/../../tmp", "not a plain absolute path"),
    ("/nonexistent/run/user/4242", "does not exist"),
])
def test_a_runtime_path_that_is_no_plain_absolute_directory_is_refused(stack, path, says):
    stack.logind.set_runtime_path(stack.uid(A), path)
    refused(stack.register_wayland(A, "wa"), "NotInSession", says)


def test_a_runtime_dir_reached_through_a_symlink_is_refused(stack):
    link = stack.files.path("run-link")
    os.symlink(stack.runtime[A].path, link)
    try:
        stack.logind.set_runtime_path(stack.uid(A), link)
        refused(stack.register_wayland(A, "wa"), "NotInSession", "without symbolic links")
    finally:
        os.unlink(link)


def test_an_option_is_refused_by_name_before_polkit_and_logind(stack):
    # spice-test-b is refused by polkit and this process is in no session: the option's refusal
    # comes first, so nothing else was asked.
    result = stack.register_wayland(B, None, {"bus": "unix:path=/tmp/evil"})
    refused(result, "InvalidArgument", 'unknown option "bus"', "takes no options")
    assert result[2].isprintable()


def test_a_huge_options_dict_is_refused_early(stack):
    svc = stack.current_service
    t0 = time.monotonic()
    result = stack.register_wayland(B, None, {"__count__": 200_000})
    refused(result, "InvalidArgument", 'unknown option "key0"', "(and 199999 others)")
    assert time.monotonic() - t0 < 20
    assert svc.proc.poll() is None
    # The service still answers everyone.
    assert stack.register_wayland(A, "wa")[:2] == ["ok", 5]


def test_polkit_no_is_permission_denied(stack):
    stack.logind.activate("wb")
    refused(stack.register_wayland(B, "wb"), "PermissionDenied", "polkit")
    assert stack.prop("Sessions") == []


def test_introspection_and_policy_offer_the_method(stack):
    out = stack.bus.busctl("introspect", "org.spice_space.StreamingAgent1",
                           "/org/spice_space/StreamingAgent1", user=B)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split()[1:3] for line in out.stdout.splitlines()
            if line.startswith(".")}
    assert rows[".RegisterWaylandSession"] == ["method", "a{sv}"]
    assert rows[".RegisterSession"] == ["method", "ss"]


def test_the_service_starts_the_wayland_worker_as_the_user(stack):
    """With a port, the service starts a worker for the active Wayland registration, as the
    user, with --source screencast (the worker's side is another part's: here only its start)."""
    from tests.support.hostpeer import RawPty

    uid = stack.uid(A)
    port = RawPty()
    try:
        stack.end_test()
        svc = stack.service(device=port.path)
        stack.helper(A, "wa", extra_env={"XDG_SESSION_TYPE": "wayland"})
        wait_until(lambda: re.search(rf"worker started uid={uid} vt=5 pid=\d+ display=wayland",
                                     svc.log), timeout=20, what="the Wayland worker started")
    finally:
        stack.end_test()
        port.close()


def test_a_refused_wayland_call_is_freed_by_its_reply_without_the_garbage_collector(stack):
    """As for RegisterSession (test_dbus_service): with the collector off, each refused
    RegisterWaylandSession's message is gone once its reply is out, whichever check refused it:
    an option, polkit (the real one), an X11 session, and the runtime directory's check (which
    runs in a thread of its own and hands its reason over as text)."""
    import asyncio

    from spice_streamd.verifier import RegistrationVerifier
    from tests.support.refusals import refused_calls_alive

    stack.end_test()  # this test is the service: the fixture's must not own the name
    # (user, logind session, the active session, options, the error name expected)
    kinds = {
        "an option": (A, "wa", "wa", {"bus": "x"}, "InvalidArgument"),
        "polkit no": (B, "wb", "wb", {}, "PermissionDenied"),
        "an X11 session": (A, "a", "a", {}, "NotInSession"),
        "no bus socket": (A, "wa", "wa", {}, "NotInSession"),
    }

    def case(kind, user, session, active, options, expected):
        def send() -> int:
            stack.logind.activate(active)
            if kind == "no bus socket":
                stack.runtime[A].remove_bus()
            client = stack.client(user, session)
            results = client.send({"op": "register_wayland", "calls": [options]})
            client.stop()
            assert [r[1] for r in results] == [ERR + expected], (kind, results)
            return 1
        return kind, send

    leaks = asyncio.run(refused_calls_alive(stack.bus.address, "RegisterWaylandSession",
                                            RegistrationVerifier,
                                            [case(k, *v) for k, v in kinds.items()]))
    assert leaks == {}, "refused calls still in memory after their reply"


def test_a_wayland_registration_ends_with_its_logind_session(stack):
    """A logout that leaves the helper behind (State closing, told to nobody) drops the Wayland
    registration as it does an X11 one (sessionexpiry's re-check)."""
    uid = stack.uid(A)
    stack.logind.add_session("wc", uid, 7, type="wayland", username=A)
    try:
        stack.logind.activate("wc")
        h = stack.helper(A, "wc", extra_env={"XDG_SESSION_TYPE": "wayland"})
        wait_until(lambda: stack.prop("Sessions") == [(7, uid, "wayland")], what="registered")
        stack.logind.close_session("wc")
        wait_until(lambda: stack.prop("Sessions") == [], timeout=10,
                   what="dropped with its closing session")
        assert h.proc.poll() is None  # its helper still runs: the session's end decided
    finally:
        stack.logind.remove_session("wc")
