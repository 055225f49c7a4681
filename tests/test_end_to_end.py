"""The whole chain: policy bus, real polkitd, mocked logind seat, two users' Xvfb displays and helpers,
the service, its workers, libspice-server on the host side of the pty and a real SPICE client."""

from __future__ import annotations

import io
import os
import signal

import pytest
from PIL import Image

from spice_stream_common import protocol as p
from tests.support.bus import Stack, wait_until
from tests.support.hostpeer import HostPeer, RawPty
from tests.support.spicehost import SpiceHost, psnr
from tests.support.xserver import Painter, start_xvfb

pytestmark = pytest.mark.slow

if os.geteuid() != 0:
    pytest.skip("the end-to-end chain starts helpers as other uids: run as root", allow_module_level=True)

WIDTH, HEIGHT = 480, 360


def proc_ids(pid: int) -> dict[str, list[int]]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: [int(v) for v in fields[k].split()] for k in ("Uid", "Gid", "Groups")}


def paint(server, colours) -> Image.Image:
    """Four quadrants in the given colours; returns what the X server now shows."""
    painter = Painter(server)
    try:
        w2, h2 = WIDTH // 2, HEIGHT // 2
        for (x, y), rgb in zip([(0, 0), (w2, 0), (0, h2), (w2, h2)], colours, strict=True):
            painter.fill(x, y, w2, h2, rgb)
        raw = painter.root.get_image(0, 0, WIDTH, HEIGHT, 2, 0xFFFFFFFF).data
        return Image.frombytes("RGB", (WIDTH, HEIGHT), raw, "raw", "BGRX")
    finally:
        painter.close()


@pytest.fixture
def chain():
    stack = Stack(authorized=("spice-test-a", "spice-test-b"))
    servers = []
    host = None
    try:
        host = SpiceHost()
        a, b = stack.uid("spice-test-a"), stack.uid("spice-test-b")
        for uid in (a, b):
            servers.append(start_xvfb(WIDTH, HEIGHT, owner_uid=uid, server_uid=uid))
        yield stack, host, servers
    finally:
        stack.close()
        for s in servers:
            s.stop()
        if host is not None:
            host.stop()


def test_client_sees_the_active_session_and_follows_a_vt_switch(chain):
    stack, host, (xa, xb) = chain
    a, b = stack.uid("spice-test-a"), stack.uid("spice-test-b")
    picture_a = paint(xa, [(200, 40, 40), (40, 200, 40), (40, 40, 200), (230, 230, 230)])
    picture_b = paint(xb, [(20, 20, 20), (250, 200, 0), (0, 200, 250), (160, 0, 160)])

    svc = stack.service(device=host.pty_path)
    stack.helper("spice-test-a", "a", display=xa.display, xauthority=xa.xauthority)
    stack.helper("spice-test-b", "b", display=xb.display, xauthority=xb.xauthority)
    wait_until(lambda: sorted(stack.prop("Sessions")) == [(2, a, xa.display), (3, b, xb.display)],
               timeout=20, what="both sessions registered")
    assert stack.prop("ActiveVT") == 2 and stack.prop("DevicePresent") is True

    # Session A's VT is active: its worker runs as A, with no root group, and the client sees A's screen.
    wait_until(lambda: stack.prop("WorkerPID"), timeout=20, what="a worker for VT 2")
    ids = proc_ids(stack.prop("WorkerPID"))
    assert ids["Uid"] == [a] * 4 and 0 not in ids["Gid"] and 0 not in ids["Groups"]
    grab = host.grab(timeout=30)
    assert psnr(grab.image, picture_a) > 30, "the client does not see session A's screen"
    wait_until(lambda: stack.prop("WorkerStats")["frames"] >= 1, timeout=10,
               what="the worker's frame count in WorkerStats")
    assert stack.prop("WorkerStats")["bytes"] > 1000
    # The client has gone again, so the host asked the worker to stop: it stays running, idle.
    wait_until(lambda: stack.prop("WorkerState") == "running" and not stack.prop("Streaming"),
               timeout=10, what="worker running, not streaming, once the client left")

    # Switch to B's VT: B's worker (started ahead, in standby) is relayed, A's waits in standby;
    # the client sees B's screen. No worker ever holds the port: only the service does.
    first_pid = stack.prop("WorkerPID")
    stack.logind.activate("b")
    wait_until(lambda: stack.prop("ActiveVT") == 3, what="ActiveVT 3")
    wait_until(lambda: stack.prop("WorkerPID") not in (0, first_pid), timeout=20, what="B's worker")
    assert proc_ids(stack.prop("WorkerPID"))["Uid"] == [b] * 4
    port = os.path.realpath(host.pty_path)
    for pid in (first_pid, stack.prop("WorkerPID")):
        fds = [os.path.realpath(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert port not in fds, f"worker {pid} holds the port"
    grab = host.grab(timeout=30)
    assert psnr(grab.image, picture_b) > 30, "after the switch the client does not see session B"

    assert host.protocol_errors() == [], host.protocol_errors()
    assert "Traceback" not in svc.log


def test_helper_gone_means_session_gone_and_service_restart_brings_helpers_back(chain):
    stack, host, (xa, xb) = chain
    a = stack.uid("spice-test-a")
    picture_a = paint(xa, [(200, 40, 40), (40, 200, 40), (40, 40, 200), (230, 230, 230)])
    svc = stack.service(device=host.pty_path)
    ha = stack.helper("spice-test-a", "a", display=xa.display, xauthority=xa.xauthority)
    hb = stack.helper("spice-test-b", "b", display=xb.display, xauthority=xb.xauthority)
    wait_until(lambda: len(stack.prop("Sessions")) == 2, timeout=20, what="both sessions registered")

    hb.proc.send_signal(signal.SIGKILL)
    wait_until(lambda: stack.prop("Sessions") == [(2, a, xa.display)], timeout=10, what="B's session dropped")

    # The service dies; its worker must not outlive it (it would fight the next one for the device);
    # the next service is brought back and the remaining helper registers again.
    wait_until(lambda: stack.prop("WorkerPID"), timeout=20, what="a worker for A")
    orphan = stack.prop("WorkerPID")
    svc.proc.send_signal(signal.SIGKILL)
    svc.proc.wait(10)
    wait_until(lambda: not os.path.exists(f"/proc/{orphan}") or
               open(f"/proc/{orphan}/stat").read().split()[2] == "Z", timeout=10,
               what="the dead service's worker to exit")
    stack.service(device=host.pty_path)
    wait_until(lambda: stack.prop("Sessions") == [(2, a, xa.display)], timeout=20,
               what="helper A registered with the new service")
    assert ha.proc.poll() is None
    wait_until(lambda: stack.prop("WorkerPID"), timeout=20, what="a worker for A again")
    assert proc_ids(stack.prop("WorkerPID"))["Uid"] == [a] * 4
    grab = host.grab(timeout=30)
    assert psnr(grab.image, picture_a) > 30
    assert host.protocol_errors() == []


@pytest.fixture
def pty_chain():
    """The same chain with a host peer on the pty instead of libspice-server: every byte is visible."""
    stack = Stack(authorized=("spice-test-a", "spice-test-b"))
    servers = []
    pty = RawPty()
    peer = HostPeer(pty.master)
    try:
        for user in ("spice-test-a", "spice-test-b"):
            uid = stack.uid(user)
            servers.append(start_xvfb(WIDTH, HEIGHT, owner_uid=uid, server_uid=uid))
        yield stack, pty, peer, servers
    finally:
        stack.close()
        for s in servers:
            s.stop()
        peer.close()
        pty.close()


def test_vt_switch_hands_the_host_state_to_the_next_worker(pty_chain):
    stack, pty, peer, (xa, xb) = pty_chain
    paint(xa, [(200, 40, 40)] * 4)
    picture_b = paint(xb, [(20, 20, 20), (250, 200, 0), (0, 200, 250), (160, 0, 160)])
    stack.service(device=pty.path)
    stack.helper("spice-test-a", "a", display=xa.display, xauthority=xa.xauthority)
    stack.helper("spice-test-b", "b", display=xb.display, xauthority=xb.xauthority)
    peer.wait_count(p.MsgType.CAPABILITIES, 1, timeout=20)
    peer.start()  # the one and only START_STOP of this test
    peer.wait_count(p.MsgType.DATA, 1, timeout=20)

    stack.logind.activate("b")
    wait_until(lambda: stack.prop("StreamingVT") == 3, timeout=20, what="B's worker streaming")

    def showing_b() -> bool:
        frames = peer.of_type(p.MsgType.DATA)
        img = Image.open(io.BytesIO(frames[-1].payload)).convert("RGB")
        return img.size == (WIDTH, HEIGHT) and psnr(img, picture_b) > 30

    # No new START_STOP was sent: B's worker streams because it was handed the host's last request.
    peer.wait_for(showing_b, timeout=20, what="frames of session B")
    assert not peer.violations
