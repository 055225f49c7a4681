"""Issue 18 end to end: the worker streams H.264, VP8 and VP9 through the real libspice-server to a
real spice-client-glib client, whose decoded picture matches the X screen; a client that decodes
only MJPEG (its GStreamer video decoders hidden) moves the stream to MJPEG while it is connected."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spice_stream_common.codecnames import Codec
from tests.support.spicehost import SpiceHost, psnr
from tests.support.xserver import Painter, XServer, start_xvfb
from tests.test_conformance import WORKER, _capture, _paint_test_card, _worker_log, needs_worker

pytestmark = pytest.mark.slow

MIN_PSNR_DB = 30.0
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
def host() -> Iterator[SpiceHost]:
    h = SpiceHost(multi_client=True)
    try:
        yield h
    finally:
        h.stop()


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


def start_worker(host: SpiceHost, xserver: XServer, tmp_path: Path, codecs: str) -> subprocess.Popen:
    log = open(tmp_path / "worker.log", "wb")
    proc = subprocess.Popen(
        [str(WORKER), "--device", host.pty_path, "--fps", "15", "--quality", "80",
         "--codecs", codecs],
        env=xserver.full_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = tmp_path / "worker.log"  # type: ignore[attr-defined]
    log.close()
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def formats(proc: subprocess.Popen) -> list[str]:
    """The codecs the worker said it streams, in order ("start streaming h264 ...")."""
    return [line.split("start streaming ")[1].split()[0]
            for line in _worker_log(proc).splitlines() if "start streaming " in line]


@needs_worker
@pytest.mark.parametrize("codec", [Codec.H264, Codec.VP8, Codec.VP9], ids=lambda c: c.label)
def test_a_client_decodes_each_video_codec_to_the_x_screen(codec, host, xserver, tmp_path):
    worker = start_worker(host, xserver, tmp_path, codec.label)
    try:
        expected = _capture(xserver)
        try:
            got = host.grab(timeout=30, frames=1).image
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nworker: {_worker_log(worker)}") from None
        assert worker.poll() is None, _worker_log(worker)
        if codec.label not in formats(worker):
            pytest.skip(f"the client does not decode {codec.label} here: {formats(worker)}; "
                        f"{_worker_log(worker)[-400:]}")
        assert got.size == expected.size
        assert psnr(got, expected) > MIN_PSNR_DB, (psnr(got, expected), _worker_log(worker))
        assert host.protocol_errors() == []
    finally:
        stop(worker)


@needs_worker
def test_an_mjpeg_only_client_joining_moves_the_stream_to_mjpeg(host, xserver, tmp_path):
    """libspice-server offers what every connected client decodes, anew at each connection (and
    nothing once the last one has left): a second client that decodes only MJPEG moves the stream
    to MJPEG, from a FORMAT both clients get. When it leaves, the server says nothing (measured:
    libspice-server 0.15): the stream stays MJPEG until the next client connects."""
    worker = start_worker(host, xserver, tmp_path, "h264 vp8")
    try:
        with host.viewer() as viewer:
            wait_for(lambda: formats(worker), "the first codec")
            first = formats(worker)[0]
            if first == "mjpeg":
                pytest.skip(f"the client decodes no video codec here: {_worker_log(worker)[-400:]}")
            got = host.grab(timeout=30, frames=1, env=mjpeg_only(tmp_path)).image
            assert formats(worker)[-1] == "mjpeg", formats(worker)
            assert psnr(got, _capture(xserver)) > MIN_PSNR_DB
            # The first client goes on, in MJPEG now.
            assert psnr(viewer.save()[0], _capture(xserver)) > MIN_PSNR_DB
            # A client that decodes everything connects: the first codec again.
            host.grab(timeout=30, frames=1)
            wait_for(lambda: formats(worker)[-1] == first, f"{first} again")
            assert psnr(viewer.save()[0], _capture(xserver)) > MIN_PSNR_DB
        assert host.protocol_errors() == []
    finally:
        stop(worker)


def wait_for(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"no {what} in {timeout:g} s"
        time.sleep(0.2)  # the interval between two looks at the worker's log
    return value
