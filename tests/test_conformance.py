"""Conformance: a real libspice-server host and real SPICE clients accept what the guest side writes
(MJPEG, and the video codecs of issue 18)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from Xlib import X

from spice_stream_common import protocol as proto
from spice_stream_common.codecnames import Codec
from spice_stream_worker.streamer import HEARTBEAT_S
from spice_streamd import guestmessages
from tests.support.spicehost import FakeGuest, SpiceHost, psnr, quadrants
from tests.support.waiting import stop_process
from tests.support.xserver import Painter, XServer, start_xvfb

pytestmark = pytest.mark.slow

MIN_PSNR_DB = 30.0
WORKER = Path(sys.executable).with_name("spice-stream-worker")


def _have_tools() -> bool:
    return bool(shutil.which("gcc") and shutil.which("pkg-config"))


if not _have_tools():
    pytest.skip("gcc and pkg-config are needed to build the SPICE harness", allow_module_level=True)


@pytest.fixture
def host() -> Iterator[SpiceHost]:
    h = SpiceHost()
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture
def picture() -> Image.Image:
    return quadrants(320, 240)


@pytest.fixture
def guest(host: SpiceHost, picture: Image.Image) -> Iterator[FakeGuest]:
    g = FakeGuest(host.pty_path, picture)
    try:
        yield g
    finally:
        g.close()


# --- the harness itself, checked with a scripted guest ----------------------------------------------


def test_host_greets_guest_and_asks_for_mjpeg(host: SpiceHost, guest: FakeGuest) -> None:
    caps = guest.wait_message(proto.MsgType.CAPABILITIES, 5)
    assert len(caps.payload) <= proto.CAPABILITIES_MAX_BYTES
    host.grab(timeout=15)
    start = proto.decode_start_stop(guest.wait_message(proto.MsgType.START_STOP, 5).payload)
    assert proto.CODEC_MJPEG in start.codecs
    # The client has gone: the host tells the guest to stop.
    stop = proto.decode_start_stop(guest.wait_message(proto.MsgType.START_STOP, 10, count=2).payload)
    assert stop.codecs == ()


def test_spicy_screenshot_sees_fake_guest_picture(
    host: SpiceHost, guest: FakeGuest, picture: Image.Image, tmp_path: Path
) -> None:
    got = host.screenshot(tmp_path / "shot.ppm", timeout=20)
    assert got.size == picture.size
    assert psnr(got, picture) > MIN_PSNR_DB
    assert host.protocol_errors() == []


def test_grab_client_sees_fake_guest_picture(
    host: SpiceHost, guest: FakeGuest, picture: Image.Image
) -> None:
    got = host.grab(timeout=20, frames=2).image
    assert got.size == picture.size
    assert psnr(got, picture) > MIN_PSNR_DB
    assert guest.frames_sent >= 2
    assert host.protocol_errors() == []


def test_short_format_is_a_protocol_error(host: SpiceHost, guest: FakeGuest) -> None:
    guest.wait_message(proto.MsgType.CAPABILITIES, 5)
    start = host.mark()
    guest.raw_write(proto.header(proto.MsgType.FORMAT, 11) + bytes(11))
    host.wait_line(lambda s: s.startswith("PROTOCOL_ERROR"), 5, start)
    assert any("Wrong size for StreamMsgFormat" in e for e in host.protocol_errors())
    err = proto.decode_notify_error(guest.wait_message(proto.MsgType.NOTIFY_ERROR, 5).payload)
    assert "StreamMsgFormat" in err.text
    host.wait_line(lambda s: s == "STATE 0", 5, start)


def test_reopen_clears_the_error_state(
    host: SpiceHost, guest: FakeGuest, picture: Image.Image
) -> None:
    guest.wait_message(proto.MsgType.CAPABILITIES, 5)
    guest.raw_write(proto.encode(proto.MsgType.QUALITY_INDICATOR, b"q\0"))
    host.wait_line(lambda s: "Invalid message type" in s, 5)
    host.reopen()
    guest.wait_message(proto.MsgType.CAPABILITIES, 5, count=2)
    errors_before = len(host.protocol_errors())
    got = host.grab(timeout=20).image
    assert psnr(got, picture) > MIN_PSNR_DB
    assert len(host.protocol_errors()) == errors_before


def test_fake_guest_cursor_reaches_client(host: SpiceHost, guest: FakeGuest) -> None:
    guest.wait_message(proto.MsgType.CAPABILITIES, 5)
    # SPICE ALPHA cursors are 32-bit ARGB, little-endian: B G R A bytes per pixel.
    top = bytes([10, 20, 30, 255]) * (16 * 8)
    bottom = bytes([200, 100, 50, 128]) * (16 * 8)
    guest.raw_write(proto.cursor_set(16, 16, 3, 4, top + bottom))
    grab = host.grab(timeout=20, wait_cursor=True)
    assert grab.cursor is not None
    assert grab.cursor.size == (16, 16)
    assert grab.cursor_hotspot == (3, 4)
    # The client hands out R G B A.
    assert grab.cursor_bytes == bytes([30, 20, 10, 255]) * 128 + bytes([50, 100, 200, 128]) * 128
    assert host.protocol_errors() == []


def test_oversized_cursor_is_a_protocol_error(host: SpiceHost, guest: FakeGuest) -> None:
    guest.wait_message(proto.MsgType.CAPABILITIES, 5)
    # 2000 x 1 exceeds the 1024 limit: the header's size passes, the shape check fails.
    payload = proto.CURSOR_SET_HEADER.pack(2000, 1, 0, 0, proto.CursorType.ALPHA) + bytes(8000)
    guest.raw_write(proto.encode(proto.MsgType.CURSOR_SET, payload))
    host.wait_line(lambda s: s.startswith("PROTOCOL_ERROR"), 5)
    guest.wait_message(proto.MsgType.NOTIFY_ERROR, 5)


# Bits per pixel as libspice-server 0.15.1 counts them (get_cursor_type_bits in
# server/red-stream-device.cpp): the mask bit of COLOR24/COLOR32 included. Other types: none.
HOST_CURSOR_BITS = {0: 32, 5: 25, 6: 33}


def test_the_service_accepts_exactly_the_cursor_forms_the_host_accepts(
    host: SpiceHost, guest: FakeGuest
) -> None:
    """Every cursor type, sizes around the host's limits, data at, just below and just above what
    the host needs: the service's check refuses what the host refuses (a refusal there costs a
    NOTIFY_ERROR and a reopen of the port), and takes what it takes, except a side of 0."""
    guest.wait_message(proto.MsgType.CAPABILITIES, 5)
    # A message the host refuses whatever its state: once the cursor before it is taken, the
    # host's next error is about this probe; after a refused cursor the host reads nothing more.
    probe = proto.encode(proto.MsgType.QUALITY_INDICATOR, b"probe\0")
    forms = []
    for ctype in range(8):
        for w, h in ((1, 1), (3, 5), (7, 3), (1024, 2), (1025, 1), (2, 1025), (0, 4)):
            need = (w * h * HOST_CURSOR_BITS.get(ctype, 32) + 7) // 8
            forms += [(ctype, w, h, n) for n in (need - 1, need, need + 1) if n >= 0]
    # The largest cursor there is, and one byte past the host's largest message.
    need = (1024 * 1024 * 33 + 7) // 8
    forms += [(6, 1024, 1024, n) for n in (need - 1, need, need + 1)]
    differ, host_took = [], {}
    for ctype, w, h, n in forms:
        payload = proto.CURSOR_SET_HEADER.pack(w, h, 0, 0, ctype) + bytes([0x80]) * n
        service_ok = guestmessages.refusal(
            proto.Message(proto.MsgType.CURSOR_SET, payload), None, True) is None
        start = host.mark()
        guest.raw_write(proto.encode(proto.MsgType.CURSOR_SET, payload) + probe)
        error = host.wait_line(lambda s: s.startswith("PROTOCOL_ERROR"), 10, start)
        host_ok = host_took[ctype, w, h, n] = "Invalid message type" in error
        host.reopen()
        if service_ok != host_ok:
            differ.append(((ctype, w, h, n), service_ok, host_ok))
    # The one difference, on purpose: a cursor of no pixels, which the host takes and no client
    # can draw, is refused by the service too.
    assert differ and all(not svc and hst and 0 in form[1:3] for form, svc, hst in differ), differ
    # The finding: a 1 x 1 COLOR32 cursor of 4 bytes (the host needs 5, its mask bit).
    assert not host_took[6, 1, 1, 4] and host_took[6, 1, 1, 5]
    assert sum(host_took.values()) == 31  # 3 types x 5 shapes x (need, need + 1), the largest


def test_host_exits_cleanly_on_sigterm() -> None:
    h = SpiceHost()
    try:
        assert os.path.exists(h.pty_path)
        h.proc.send_signal(signal.SIGTERM)
        h.proc.wait(5)
        h.wait_line(lambda s: s == "EXIT 0", 5)
        assert h.proc.returncode == 0
    finally:
        h.stop()


# --- the real worker ----------------------------------------------------------------------------


def _worker_available() -> bool:
    return WORKER.exists() and importlib.util.find_spec("spice_stream_worker.main") is not None


needs_worker = pytest.mark.skipif(not _worker_available(), reason="spice-stream-worker not built yet")


def _paint_test_card(painter: Painter, width: int, height: int) -> None:
    """Quadrants plus a band of 64 grey steps, so both flat areas and gradients are compared."""
    hw, hh = width // 2, height // 2
    painter.fill(0, 0, hw, hh, (220, 30, 30))
    painter.fill(hw, 0, width - hw, hh, (30, 200, 60))
    painter.fill(0, hh, hw, height - hh, (40, 60, 220))
    painter.fill(hw, hh, width - hw, height - hh, (240, 240, 240))
    steps = 64
    for i in range(steps):
        x0, x1 = i * width // steps, (i + 1) * width // steps
        grey = i * 255 // (steps - 1)
        painter.fill(x0, hh - height // 16, x1 - x0, height // 8, (grey, grey, grey))


def _capture(server: XServer) -> Image.Image:
    d = server.connect()
    try:
        root = d.screen().root
        raw = root.get_image(0, 0, server.width, server.height, X.ZPixmap, 0xFFFFFFFF).data
        return Image.frombytes("RGB", (server.width, server.height), raw, "raw", "BGRX")
    finally:
        d.close()


def _x_cursor(server: XServer) -> tuple[Image.Image, tuple[int, int]]:
    """The X server's current cursor (XFixes) as RGBA, and its hot spot."""
    d = server.connect()
    try:
        d.xfixes_query_version()  # XFixes refuses other requests before this one
        reply = d.xfixes_get_cursor_image(d.screen().root)
        argb = reply.cursor_image
        raw = bytearray()
        for px in argb:
            raw += bytes([(px >> 16) & 255, (px >> 8) & 255, px & 255, (px >> 24) & 255])
        return Image.frombytes("RGBA", (reply.width, reply.height), bytes(raw)), (
            reply.xhot,
            reply.yhot,
        )
    finally:
        d.close()


@pytest.fixture
def xserver() -> Iterator[XServer]:
    server = start_xvfb(640, 480)
    try:
        painter = Painter(server)
        try:
            _paint_test_card(painter, server.width, server.height)
        finally:
            painter.close()
        yield server
    finally:
        server.stop()


@pytest.fixture
def worker(host: SpiceHost, xserver: XServer, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_worker(host, xserver, tmp_path, "mjpeg")
    try:
        yield proc
    finally:
        stop_process(proc)


def start_worker(host: SpiceHost, xserver: XServer, tmp_path: Path, codecs: str) -> subprocess.Popen:
    """The worker on the host's pty, its output in tmp_path/worker.log (_worker_log)."""
    with open(tmp_path / "worker.log", "wb") as log:
        proc = subprocess.Popen(
            [str(WORKER), "--device", host.pty_path, "--fps", "15", "--quality", "80",
             "--codecs", codecs],
            env=xserver.full_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = tmp_path / "worker.log"  # type: ignore[attr-defined]
    return proc


def _worker_log(proc: subprocess.Popen[bytes]) -> str:
    return Path(proc.log_path).read_text(errors="replace")[-3000:]  # type: ignore[attr-defined]


@needs_worker
@pytest.mark.parametrize("codec", [Codec.MJPEG, Codec.H264, Codec.VP8, Codec.VP9],
                         ids=lambda c: c.label)
def test_worker_stream_matches_x_screen(codec: Codec, hosts: SpiceHost, xserver: XServer,
                                        tmp_path: Path) -> None:
    # Issue 18: each video codec too, decoded by the real client (its GStreamer decoders).
    worker = start_worker(hosts, xserver, tmp_path, codec.label)
    try:
        expected = _capture(xserver)
        try:
            # One frame: on a static screen the worker sends its picture once (no resend since
            # issue 16; the second frame this waited for was the 2 s resend of the same picture).
            got = hosts.grab(timeout=30, frames=1).image
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nworker: {_worker_log(worker)}") from None
        assert worker.poll() is None, _worker_log(worker)
        if codec.label not in formats(worker):
            pytest.skip(f"the client does not decode {codec.label} here: {formats(worker)}; "
                        f"{_worker_log(worker)[-400:]}")
        assert got.size == expected.size
        assert psnr(got, expected) > MIN_PSNR_DB, (psnr(got, expected), _worker_log(worker))
        assert hosts.protocol_errors() == []
    finally:
        stop_process(worker)


@needs_worker
def test_worker_stream_reaches_spicy_screenshot(
    host: SpiceHost, xserver: XServer, worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    expected = _capture(xserver)
    got = host.screenshot(tmp_path / "shot.ppm", timeout=30)
    assert got.size == expected.size
    assert psnr(got, expected) > MIN_PSNR_DB
    assert host.protocol_errors() == []


@needs_worker
def test_worker_cursor_reaches_client(
    host: SpiceHost, xserver: XServer, worker: subprocess.Popen[bytes]
) -> None:
    # Xvfb's root window has the default X cursor (opaque or transparent pixels only, so
    # premultiplied or not, the colours compare exactly).
    expected, hotspot = _x_cursor(xserver)
    try:
        grab = host.grab(timeout=30, wait_cursor=True)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nworker: {_worker_log(worker)}") from None
    assert grab.cursor is not None
    assert grab.cursor.size == expected.size
    assert grab.cursor_hotspot == hotspot
    assert grab.cursor.getchannel("A").getbbox() is not None  # not an invisible cursor
    assert grab.cursor.tobytes() == expected.tobytes()
    assert host.protocol_errors() == []
    assert worker.poll() is None, _worker_log(worker)


@needs_worker
def test_a_client_connecting_to_a_static_screen_gets_its_picture(
    host: SpiceHost, xserver: XServer, worker: subprocess.Popen[bytes]
) -> None:
    """Issue 16: nothing is sent again on a static screen. A client that connects once the screen
    has been static for longer than a heartbeat period still gets the current picture: the host
    tells the worker START_STOP again (a single-client host: stop for the client it drops, start
    for the new one), and the worker sends FORMAT and a whole frame."""
    expected = _capture(xserver)
    with host.viewer() as first:
        first.wait_line(lambda s: s.startswith("SAVED "), 30)
        shown, _ = first.save()
        assert psnr(shown, expected) > MIN_PSNR_DB
        time.sleep(HEARTBEAT_S + 1.5)  # static: no frame since
        t0 = time.monotonic()
        try:
            got = host.grab(timeout=10).image
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nworker: {_worker_log(worker)}") from None
        took = time.monotonic() - t0
    assert psnr(got, expected) > MIN_PSNR_DB
    assert took < 10, took
    # How: the host dropped the first client (stop) and streams to the new one (start).
    assert _worker_log(worker).count("start streaming") >= 2, _worker_log(worker)
    assert worker.poll() is None, _worker_log(worker)
    assert host.protocol_errors() == []


# --- issue 18: the video codecs end to end ---------------------------------------------------------

# The GStreamer plugins with video decoders: spice-gtk offers a codec when the registry lists a
# decoder for it, at any rank (gstvideo_has_codec()), so a client that decodes only MJPEG is one
# whose registry lacks these plugins.
VIDEO_DECODER_PLUGINS = ("libgstlibav.so", "libgstvpx.so", "libgstopenh264.so", "libgstde265.so",
                         "libgstva.so", "libgstvaapi.so", "libgstv4l2codecs.so",
                         "libgstvideo4linux2.so", "libgstcodecalpha.so", "libgstaom.so",
                         "libgstdav1d.so", "libgstrsav1.so")


def mjpeg_only(tmp_path: Path) -> dict[str, str]:
    """A client environment whose GStreamer has every plugin but those with video decoders."""
    from spice_stream_worker.gstreamer import Media

    plugin = Media("the tests").Gst.Registry.get().find_plugin("jpeg")
    assert plugin is not None, "no jpeg plugin: gstreamer1.0-plugins-good"
    system = Path(plugin.get_filename()).parent
    mine = tmp_path / "gst-plugins"
    mine.mkdir()
    for so in system.glob("*.so"):
        if so.name not in VIDEO_DECODER_PLUGINS:
            (mine / so.name).symlink_to(so)
    return {**os.environ, "GST_PLUGIN_SYSTEM_PATH_1_0": str(mine), "GST_PLUGIN_PATH_1_0": "",
            "GST_PLUGIN_PATH": "", "GST_REGISTRY_1_0": str(tmp_path / "registry.bin")}


@pytest.fixture
def hosts() -> Iterator[SpiceHost]:
    """A host that takes several clients at once (libspice-server's SPICE_DEBUG_ALLOW_MC)."""
    h = SpiceHost(multi_client=True)
    try:
        yield h
    finally:
        h.stop()


def formats(proc: subprocess.Popen) -> list[str]:
    """The codecs the worker said it streams, in order ("start streaming h264 ...")."""
    return [line.split("start streaming ")[1].split()[0]
            for line in _worker_log(proc).splitlines() if "start streaming " in line]


@needs_worker
def test_an_mjpeg_only_client_joining_moves_the_stream_to_mjpeg(hosts, xserver, tmp_path):
    """libspice-server offers what every connected client decodes, anew at each connection (and
    nothing once the last one has left): a second client that decodes only MJPEG moves the stream
    to MJPEG, from a FORMAT both clients get. When it leaves, the server says nothing (measured:
    libspice-server 0.15): the stream stays MJPEG until the next client connects."""
    worker = start_worker(hosts, xserver, tmp_path, "h264 vp8")
    try:
        with hosts.viewer() as viewer:
            wait_for(lambda: formats(worker), "the first codec")
            first = formats(worker)[0]
            if first == "mjpeg":
                pytest.skip(f"the client decodes no video codec here: {_worker_log(worker)[-400:]}")
            got = hosts.grab(timeout=30, frames=1, env=mjpeg_only(tmp_path)).image
            assert formats(worker)[-1] == "mjpeg", formats(worker)
            assert psnr(got, _capture(xserver)) > MIN_PSNR_DB
            # The first client goes on, in MJPEG now.
            assert psnr(viewer.save()[0], _capture(xserver)) > MIN_PSNR_DB
            # A client that decodes everything connects: the first codec again.
            hosts.grab(timeout=30, frames=1)
            wait_for(lambda: formats(worker)[-1] == first, f"{first} again")
            assert psnr(viewer.save()[0], _capture(xserver)) > MIN_PSNR_DB
        assert hosts.protocol_errors() == []
    finally:
        stop_process(worker)


def wait_for(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"no {what} in {timeout:g} s"
        time.sleep(0.2)  # the interval between two looks at the worker's log
    return value
