"""spice-stream-helper without a service: Wayland and missing-DISPLAY refusals, waiting for the
service, and SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from spice_stream_helper.main import Backoff, session_display
from tests.support.bus import PolicyBus, wait_until

HELPER = str(Path(sys.executable).parent / "spice-stream-helper")


@pytest.mark.parametrize("env", [
    {"XDG_SESSION_TYPE": "wayland", "DISPLAY": ":0"},
    {"WAYLAND_DISPLAY": "wayland-0"},
])
def test_wayland_is_refused_politely(env):
    out = subprocess.run([HELPER], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 0
    assert "Wayland session" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_no_display_is_an_error():
    out = subprocess.run([HELPER], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                         timeout=20)
    assert out.returncode == 2
    assert "DISPLAY is not set" in out.stderr


def test_xauthority_defaults_like_xlib():
    assert session_display({"DISPLAY": ":1", "HOME": "/home/u"}) == (":1", "/home/u/.Xauthority")
    assert session_display({"DISPLAY": ":1", "XAUTHORITY": "/run/x/auth"}) == (":1", "/run/x/auth")


@pytest.mark.skipif(os.geteuid() != 0, reason="the policy bus lets only root own names")
def test_waits_for_an_absent_service_then_sigterm_exits_zero():
    with PolicyBus() as bus:
        proc = subprocess.Popen([HELPER, "--bus", bus.address],
                                env={"PATH": "/usr/bin:/bin", "DISPLAY": ":9",
                                     "XAUTHORITY": "/nonexistent"},
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
