"""The real worker on a real Xvfb, speaking to a host peer on a raw pty."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image, ImageChops, ImageStat
from Xlib import X
from Xlib.ext import xtest

from spice_stream_common import protocol as p
from spice_stream_common.exitcodes import ExitCode
from spice_stream_worker.streamer import HEARTBEAT_S, REFRESH_AFTER_S
from tests.support.hostpeer import HostPeer, RawPty
from tests.support.xserver import Painter, set_screen_size, start_xvfb, wait_for

WIDTH, HEIGHT = 640, 480
RED, BLUE, GREEN = (220, 30, 30), (30, 30, 220), (30, 200, 60)


class WorkerRun:
    def __init__(self, xserver, extra_args=(), env=None, device=None, status=False):
        self.pty = RawPty()
        self.peer = HostPeer(self.pty.master)
        self.status_r = None
        pass_fds = ()
        args = [sys.executable, "-m", "spice_stream_worker", "--device", device or self.pty.path,
                "--fps", "30", *extra_args]
        if status:
            self.status_r, status_w = os.pipe()
            args += ["--status-fd", str(status_w)]
            pass_fds = (status_w,)
        self.proc = subprocess.Popen(
            args, env=env if env is not None else xserver.full_env(), pass_fds=pass_fds,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        if status:
            os.close(status_w)

    def wait(self, timeout=15):
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return code, self.proc.stderr.read().decode()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.peer.close()
        self.pty.close()
        if self.status_r is not None:
            os.close(self.status_r)


@pytest.fixture
def xserver():
    server = start_xvfb(WIDTH, HEIGHT)
    painter = Painter(server)
    server.painter = painter
    yield server
    painter.close()
    server.stop()


@pytest.fixture
def run(xserver):
    runs = []

    def start(*args, **kw):
        r = WorkerRun(xserver, *args, **kw)
        runs.append(r)
        return r

    yield start
    for r in runs:
        r.stop()


def jpeg(msg: p.Message) -> Image.Image:
    img = Image.open(io.BytesIO(msg.payload))
    img.load()
    return img.convert("RGB")


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return sum(ImageStat.Stat(ImageChops.difference(a, b)).mean) / 3


def expected_picture(painter: Painter) -> Image.Image:
    raw = painter.root.get_image(0, 0, WIDTH, HEIGHT, 2, 0xFFFFFFFF).data
    return Image.frombytes("RGB", (WIDTH, HEIGHT), raw, "raw", "BGRX")


def test_no_frame_before_start_then_format_and_matching_frames(xserver, run):
    xserver.painter.fill(0, 0, WIDTH, HEIGHT, BLUE)
    xserver.painter.fill(100, 100, 200, 150, RED)
    w = run()
    w.peer.wait_count(p.MsgType.CAPABILITIES, 1)
    time.sleep(0.3)  # a window in which a wrong worker would already have sent frames
    assert not w.peer.of_type(p.MsgType.DATA) and not w.peer.of_type(p.MsgType.FORMAT)
    w.peer.start()
    data = w.peer.wait_count(p.MsgType.DATA, 1)
    fmt = w.peer.of_type(p.MsgType.FORMAT)
    assert p.decode_format(fmt[0].payload) == p.Format(WIDTH, HEIGHT, p.CODEC_MJPEG)
    types = [m.type for m in w.peer.messages]
    assert types.index(p.MsgType.FORMAT) < types.index(p.MsgType.DATA)
    assert mean_abs_diff(jpeg(data[0]), expected_picture(xserver.painter)) < 3
    assert not w.peer.violations


def test_damage_sends_the_change_and_a_static_screen_sends_nothing(xserver, run):
    xserver.painter.fill(0, 0, WIDTH, HEIGHT, BLUE)
    w = run(["--start-codecs", "1"])
    w.peer.wait_count(p.MsgType.DATA, 1)
    xserver.painter.fill(300, 200, 64, 64, GREEN)
    w.peer.wait_for(lambda: jpeg(w.peer.of_type(p.MsgType.DATA)[-1]).getpixel((330, 230))[1] > 150,
                    what="a frame showing the green square")
    assert mean_abs_diff(jpeg(w.peer.of_type(p.MsgType.DATA)[-1]), expected_picture(xserver.painter)) < 3
    # The last frame again, REFRESH_AFTER_S after it (a client drops a late MJPEG frame) ...
    last = len(w.peer.of_type(p.MsgType.DATA))
    frames = w.peer.wait_count(p.MsgType.DATA, last + len(REFRESH_AFTER_S))
    assert [bytes(f.payload) for f in frames[last - 1:]] == [bytes(frames[last - 1].payload)] * (
        1 + len(REFRESH_AFTER_S))
    # ... then on a static screen no frame at all (more than a heartbeat period).
    settled = len(w.peer.messages)
    time.sleep(HEARTBEAT_S + 1.0)
    after = [m.type for m in w.peer.messages[settled:]]
    assert p.MsgType.DATA not in after, f"{after.count(p.MsgType.DATA)} frames on a static screen"
    assert after == [], after


def test_drawing_faster_than_frames_ends_on_the_screen_s_picture(xserver, run):
    # Drawn again and again into the same places between captures: X reports such an area once
    # per capture (the capture empties its damage region), and the last picture must still come.
    xserver.painter.fill(0, 0, WIDTH, HEIGHT, BLUE)
    w = run(["--start-codecs", "1"])
    w.peer.wait_count(p.MsgType.DATA, 1)
    for i in range(300):
        xserver.painter.fill(40 + (i * 37) % 400, 100, 64, 64, RED if i % 2 else GREEN)
        xserver.painter.fill(0, 300, WIDTH, 40, (i % 251, 90, 90))
    expected = expected_picture(xserver.painter)

    def shows_it() -> bool:
        frames = w.peer.of_type(p.MsgType.DATA)
        return mean_abs_diff(jpeg(frames[-1]), expected) < 3

    w.peer.wait_for(shows_it, what="a frame showing the last drawing")
    assert not w.peer.violations


def test_codecs_without_mjpeg_and_stop(xserver, run):
    w = run()
    w.peer.wait_count(p.MsgType.CAPABILITIES, 1)
    w.peer.start((2, 3))  # VP8, H264 only
    time.sleep(0.5)
    assert not w.peer.of_type(p.MsgType.DATA)
    w.peer.start((3, 1))
    w.peer.wait_count(p.MsgType.DATA, 1)
    w.peer.stop()
    time.sleep(0.3)  # let frames already in the pipe arrive
    before = len(w.peer.of_type(p.MsgType.DATA))
    for i in range(5):
        xserver.painter.fill(10 * i, 10, 10, 10, RED)
    time.sleep(1.0)
    assert len(w.peer.of_type(p.MsgType.DATA)) == before


def test_garbage_from_host_is_logged_once_and_streaming_goes_on(xserver, run):
    w = run(["--start-codecs", "1"])
    w.peer.wait_count(p.MsgType.DATA, 1)
    for _ in range(50):
        w.peer.send(b"\xff\x00garbage" * 100)
    w.peer.send(p.notify_error(3, "test error"))
    # A stop and a start make the worker announce the stream again: proof it read everything before.
    w.peer.stop()
    w.peer.start()
    w.peer.wait_count(p.MsgType.FORMAT, 2, timeout=20)
    xserver.painter.fill(0, 0, 50, 50, GREEN)
    n = len(w.peer.of_type(p.MsgType.DATA))
    w.peer.wait_count(p.MsgType.DATA, n + 1)
    w.proc.send_signal(signal.SIGTERM)
    code, err = w.wait()
    assert code == ExitCode.OK
    assert err.count("invalid data from host") <= 2, err
    assert "host reported error 3: test error" in err
    assert "Traceback" not in err


def test_sigterm_mid_stream_leaves_no_torn_message(xserver, run):
    w = run(["--start-codecs", "1", "--fps", "60"])
    w.peer.wait_count(p.MsgType.DATA, 1)
    # Keep the screen busy so a frame is almost always being written when the signal lands.
    for i in range(30):
        xserver.painter.fill(0, 0, WIDTH, HEIGHT, (i * 8, 255 - i * 8, 100))
    w.proc.send_signal(signal.SIGTERM)
    code, err = w.wait()
    assert code == ExitCode.OK, err
    w.peer.wait_for(lambda: w.peer.parser.buffered == 0, timeout=5, what="every byte parsed")
    assert not w.peer.violations
    assert all(len(m.payload) > 0 for m in w.peer.of_type(p.MsgType.DATA))


def test_cursor_set_and_move(xserver, run):
    w = run(["--start-codecs", "1"])
    cur = w.peer.wait_count(p.MsgType.CURSOR_SET, 1)[0]
    c = p.decode_cursor_set(cur.payload)
    assert c.type == p.CursorType.ALPHA and 0 < c.width <= 1024
    # A device motion, as a real pointer makes it (a warp by a program raises no raw motion).
    xtest.fake_input(xserver.painter.display, X.MotionNotify, x=123, y=234)
    xserver.painter.sync()
    w.peer.wait_for(lambda: any(p.CURSOR_MOVE.unpack(m.payload) == (123, 234)
                                for m in w.peer.of_type(p.MsgType.CURSOR_MOVE)), what="CURSOR_MOVE 123,234")


def test_status_pipe_reports_state(xserver, run):
    w = run(["--start-codecs", "1"], status=True)
    w.peer.wait_count(p.MsgType.DATA, 1)
    buf = b""
    deadline = time.monotonic() + 10
    state = {}
    while time.monotonic() < deadline and not (state.get("streaming") and state.get("frames")):
        buf += os.read(w.status_r, 65536)
        *lines, buf = buf.split(b"\n")
        for line in lines:
            state = json.loads(line)
    assert state["streaming"] is True and state["frames"] >= 1
    assert state["codecs"] == [1] and (state["width"], state["height"]) == (WIDTH, HEIGHT)


def test_bad_xauthority_is_one_clear_line_and_exit_code(xserver, run, tmp_path):
    bad = tmp_path / "Xauthority"
    subprocess.run(["xauth", "-q", "-f", str(bad), "add", xserver.display, "MIT-MAGIC-COOKIE-1",
                    "00" * 16], check=True)
    env = xserver.full_env() | {"XAUTHORITY": str(bad)}
    w = run(env=env)
    code, err = w.wait()
    assert code == ExitCode.DISPLAY_UNAVAILABLE, err
    assert "Traceback" not in err and xserver.display in err


def test_missing_device_exit_code(xserver, run):
    w = run(device="/nonexistent/org.spice-space.stream.0")
    code, err = w.wait()
    assert code == ExitCode.DEVICE_UNAVAILABLE
    assert "cannot open device /nonexistent" in err and "Traceback" not in err


def test_regular_file_as_device_is_refused_in_one_line(xserver, run, tmp_path):
    path = tmp_path / "not-a-port"
    path.write_bytes(b"x")
    w = run(device=str(path))
    code, err = w.wait()
    assert code == ExitCode.DEVICE_UNAVAILABLE, err
    assert f"cannot use device {path}: not a character device" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_display_going_away_exits_with_display_lost(xserver, run):
    w = run(["--start-codecs", "1"])
    w.peer.wait_count(p.MsgType.DATA, 1)
    xserver.proc.kill()
    code, err = w.wait()
    assert code == ExitCode.DISPLAY_LOST, err
    assert "Traceback" not in err


def test_host_closing_the_device_exits_with_device_lost(xserver, run):
    w = run(["--start-codecs", "1"])
    w.peer.wait_count(p.MsgType.DATA, 1)
    w.peer.close()
    os.close(w.pty.master)
    code, err = w.wait()
    w.pty.master = -1
    assert code == ExitCode.DEVICE_LOST, err
    assert "Traceback" not in err


def test_resize_sends_a_new_format(xserver, run):
    w = run(["--start-codecs", "1"])
    w.peer.wait_count(p.MsgType.FORMAT, 1)
    set_screen_size(xserver, 400, 300)
    wait_for(lambda: any(p.decode_format(m.payload) == p.Format(400, 300, p.CODEC_MJPEG)
                         for m in w.peer.of_type(p.MsgType.FORMAT)), timeout=10, what="FORMAT 400x300")
    w.peer.wait_for(lambda: jpeg(w.peer.of_type(p.MsgType.DATA)[-1]).size == (400, 300), what="400x300 frame")
    types = [m.type for m in w.peer.messages]
    last_format = len(types) - 1 - types[::-1].index(p.MsgType.FORMAT)
    # Every frame after the new FORMAT has the new size.
    assert all(jpeg(m).size == (400, 300) for m in w.peer.messages[last_format:] if m.type == p.MsgType.DATA)
