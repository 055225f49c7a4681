"""spice-stream-helper without a service: what a session registers (X11 or Wayland), the refusal
without a graphical session, waiting for the service, and SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from spice_stream_helper.main import Backoff, session_display, session_target
from tests.support.bus import PolicyBus, wait_until

HELPER = str(Path(sys.executable).parent / "spice-stream-helper")


@pytest.mark.parametrize("env", [
    {"XDG_SESSION_TYPE": "wayland", "DISPLAY": ":0"},  # GNOME on Wayland, with Xwayland's DISPLAY
    {"WAYLAND_DISPLAY": "wayland-0"},
])
def test_a_wayland_session_registers_with_register_wayland_session(env):
    t = session_target(env)
    assert (t.member, t.signature, t.body, t.wayland) == \
        ("RegisterWaylandSession", "a{sv}", [{}], True)


def test_the_wayland_login_screen_is_skipped_not_registered():
    # GDM's greeter on Wayland: gnome-shell refuses screencasts there; X11 greeters still register.
    out = subprocess.run([HELPER], env={"PATH": "/usr/bin:/bin", "XDG_SESSION_TYPE": "wayland",
                                        "XDG_SESSION_CLASS": "greeter",
                                        "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent"},
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert "login screen on Wayland" in out.stderr and "not registered" in out.stderr
    t = session_target({"DISPLAY": ":0", "XAUTHORITY": "/a", "XDG_SESSION_CLASS": "greeter"})
    assert t.member == "RegisterSession"


@pytest.mark.parametrize("env", [
    {"DISPLAY": ":0", "XAUTHORITY": "/run/x/auth"},
    {"DISPLAY": ":0", "XAUTHORITY": "/run/x/auth", "WAYLAND_DISPLAY": "wayland-0"},
    {"DISPLAY": ":0", "XAUTHORITY": "/run/x/auth", "XDG_SESSION_TYPE": "x11"},
])
def test_an_x11_session_registers_its_display(env):
    t = session_target(env)
    assert (t.member, t.signature, t.body, t.wayland) == \
        ("RegisterSession", "ss", [":0", "/run/x/auth"], False)


def test_no_graphical_session_is_an_error():
    out = subprocess.run([HELPER], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                         timeout=20)
    assert out.returncode == 2
    assert "neither DISPLAY nor WAYLAND_DISPLAY is set" in out.stderr


def test_xauthority_defaults_like_xlib():
    assert session_display({"DISPLAY": ":1", "HOME": "/home/u"}) == (":1", "/home/u/.Xauthority")
    assert session_display({"DISPLAY": ":1", "XAUTHORITY": "/run/x/auth"}) == (":1", "/run/x/auth")


@pytest.mark.skipif(os.geteuid() != 0, reason="the policy bus lets only root own names")
@pytest.mark.parametrize("session", [{"DISPLAY": ":9", "XAUTHORITY": "/nonexistent"},
                                     {"XDG_SESSION_TYPE": "wayland"}])
def test_waits_for_an_absent_service_then_sigterm_exits_zero(session):
    with PolicyBus() as bus:
        proc = subprocess.Popen([HELPER, "--bus", bus.address],
                                env={"PATH": "/usr/bin:/bin", **session},
                                stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stderr.readline()
            assert "not running; waiting" in line
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
        wait_until(lambda: proc.returncode is not None, what="helper exit")


def test_backoff_doubles_from_one_second_to_thirty_with_jitter():
    longest = Backoff(rand=lambda: 1.0)
    assert [longest.next_delay() for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]
    shortest = Backoff(rand=lambda: 0.0)
    assert [shortest.next_delay() for _ in range(3)] == [0.5, 1, 2]
    longest.reset()
    assert longest.next_delay() == 1


def test_a_background_session_registers_when_it_becomes_active(bus, logind):
    """polkit's allow_active refuses a session in the background; its helper waits for logind to
    say the session became active, then registers (as after a VT switch to it)."""
    import asyncio
    import threading

    from dbus_next import Message
    from dbus_next.aio import MessageBus

    from spice_stream_common import constants

    calls: list[str] = []
    allowed = threading.Event()
    mapped = threading.Event()  # the helper's pid is in its logind session
    ready = threading.Event()
    stop = threading.Event()

    def fake_service() -> None:
        async def main() -> None:
            conn = await MessageBus(bus_address=bus.address).connect()

            async def answer(msg: Message) -> None:
                while not mapped.is_set():
                    await asyncio.sleep(0.01)
                # Refused while in the background, and once more right after the switch (polkit
                # may not have seen it yet), then allowed.
                if not allowed.is_set() or len(calls) < 3:
                    conn.send(Message.new_error(msg, constants.ERROR_PREFIX + "PermissionDenied",
                                                "polkit does not authorize you"))
                else:
                    conn.send(Message.new_method_return(msg, "u", [3]))

            def handler(msg: Message):
                if msg.member != "RegisterSession" or msg.interface != constants.INTERFACE:
                    return None
                calls.append(msg.sender)
                asyncio.get_running_loop().create_task(answer(msg))
                return True

            conn.add_message_handler(handler)
            await conn.request_name(constants.BUS_NAME)
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.02)
            conn.disconnect()

        asyncio.run(main())

    thread = threading.Thread(target=fake_service, daemon=True)
    thread.start()
    assert ready.wait(10)
    proc = subprocess.Popen([HELPER, "--bus", bus.address],
                            env={"PATH": "/usr/bin:/bin", "DISPLAY": ":9",
                                 "XAUTHORITY": "/nonexistent"},
                            stderr=subprocess.PIPE, text=True)
    try:
        logind.add_session("c3", uid=os.getuid(), vt=3, pids=[proc.pid])
        mapped.set()
        line = proc.stderr.readline()
        assert "registering again when this session becomes the active one" in line, line
        assert proc.poll() is None and len(calls) == 1
        allowed.set()
        logind.activate("c3")
        line = proc.stderr.readline()
        assert "although this session is active" in line and "trying again in" in line, line
        line = proc.stderr.readline()
        assert "display :9 registered: streamed while VT 3 is active" in line, line
        assert len(calls) == 3
    finally:
        stop.set()
        proc.kill()
        proc.wait()
        proc.stderr.close()
        thread.join(5)
