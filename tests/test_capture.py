"""Screen against a real Xvfb: damage, grab (MIT-SHM and GetImage), resize, pointer, errors."""

from __future__ import annotations

import os
import pwd
import socket
import struct

import pytest
from Xlib.ext import xtest

from spice_stream_common.exitcodes import DisplayLost, DisplayUnavailable
from spice_stream_worker.sources.x11 import NO_SHM_ENV, Rect, Screen, row_spans
from tests.support.xserver import Painter, set_screen_size, start_xvfb, wait_for

NOBODY = pwd.getpwnam("nobody").pw_uid


@pytest.fixture
def xserver():
    server = start_xvfb(320, 240)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def painter(xserver):
    p = Painter(xserver)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def xenv(xserver, monkeypatch):
    monkeypatch.setenv("DISPLAY", xserver.display)
    monkeypatch.setenv("XAUTHORITY", xserver.xauthority)
    monkeypatch.delenv(NO_SHM_ENV, raising=False)
    return xserver


def open_screen(**kw) -> Screen:
    return Screen(**kw)


def drain(screen: Screen):
    """Everything the server sent up to now: a round trip orders all earlier events before it."""
    screen.pointer_position()
    return screen.poll()


def pixel(frame, x, y):
    off = y * frame.stride + x * 4
    b, g, r = frame.pixels[off], frame.pixels[off + 1], frame.pixels[off + 2]
    return (r, g, b)


def covers(rects, target: Rect) -> bool:
    return all(
        any(r.x <= x < r.x + r.width and r.y <= y < r.y + r.height for r in rects)
        for x in (target.x, target.x + target.width - 1)
        for y in (target.y, target.y + target.height - 1)
    )


@pytest.mark.parametrize("use_shm", [True, False])
def test_damage_reports_only_what_changed(xenv, painter, use_shm):
    screen = open_screen(use_shm=use_shm)
    try:
        assert screen.uses_shm is use_shm
        first = drain(screen)
        assert first.damage == [Rect(0, 0, 320, 240)]  # creation damages everything once
        assert not drain(screen).damage  # nothing drawn: nothing reported
        screen.grab()  # a capture: what is drawn from now on is reported
        target = Rect(40, 50, 30, 20)
        painter.fill(target.x, target.y, target.width, target.height, (10, 200, 30))
        changes = drain(screen)
        assert changes.damage and covers(changes.damage, target)
        for r in changes.damage:
            assert target.x <= r.x and r.x + r.width <= target.x + target.width
            assert target.y <= r.y and r.y + r.height <= target.y + target.height
        assert not drain(screen).damage
        # Drawn there again before a capture: already known, not reported again; drawn
        # elsewhere: reported.
        painter.fill(target.x, target.y, target.width, target.height, (200, 10, 30))
        other = Rect(200, 150, 10, 10)
        painter.fill(other.x, other.y, other.width, other.height, (1, 2, 3))
        changes = drain(screen)
        assert changes.damage and covers(changes.damage, other)
        assert not any(r.overlaps(target) for r in changes.damage)
        # The capture reads the second fill's pixels and re-arms the whole region.
        frame = screen.grab(changes.damage + [target])
        assert pixel(frame, target.x, target.y) == (200, 10, 30)
        painter.fill(target.x, target.y, target.width, target.height, (10, 200, 30))
        changes = drain(screen)
        assert changes.damage and covers(changes.damage, target)
    finally:
        screen.close()


@pytest.mark.parametrize("use_shm", [True, False])
def test_grab_returns_drawn_pixels(xenv, painter, use_shm):
    screen = open_screen(use_shm=use_shm)
    try:
        painter.fill(0, 0, 320, 240, (0, 0, 0))
        painter.fill(10, 20, 5, 7, (255, 128, 1))
        frame = screen.grab()
        assert (frame.width, frame.height, frame.stride) == (320, 240, 1280)
        assert len(frame.pixels) == 320 * 240 * 4
        assert pixel(frame, 10, 20) == (255, 128, 1)
        assert pixel(frame, 14, 26) == (255, 128, 1)
        assert pixel(frame, 15, 26) == (0, 0, 0)
        drain(screen)
        painter.fill(100, 200, 3, 3, (9, 8, 7))
        painter.fill(100, 5, 3, 3, (1, 2, 3))  # drawn, but not asked for below
        frame = screen.grab([Rect(100, 200, 3, 3)])
        # Captured as the 16x16 MCU around it; that is all that changed.
        assert frame.changed == [Rect(96, 192, 16, 16)]
        assert pixel(frame, 101, 201) == (9, 8, 7)
        assert pixel(frame, 101, 6) == (0, 0, 0)  # outside the request: old pixels kept
    finally:
        screen.close()


@pytest.fixture(params=[True, False], ids=["shm", "getimage"])
def grey_screen(xenv, painter, request):
    """A Screen whose framebuffer holds black with a grey 200x100 box, and no damage pending."""
    screen = open_screen(use_shm=request.param)
    try:
        painter.fill(0, 0, 320, 240, (0, 0, 0))
        painter.fill(0, 0, 200, 100, (9, 9, 9))
        screen.grab()
        drain(screen)
        yield screen
    finally:
        screen.close()


def test_damage_without_new_pixels_is_no_change(grey_screen, painter):
    painter.fill(30, 40, 50, 20, (9, 9, 9))  # the same pixels drawn again
    changes = drain(grey_screen)
    assert changes.damage  # X reports it...
    assert grey_screen.grab(changes.damage).changed == []  # ...but nothing changed


def test_changed_parts_of_a_large_damage_are_found(grey_screen, painter):
    painter.fill(0, 0, 200, 100, (9, 9, 9))  # all of it drawn again, the same...
    painter.fill(150, 70, 2, 2, (200, 0, 0))  # ...but for one small spot
    frame = grey_screen.grab(drain(grey_screen).damage)
    # Of the 7 bands captured (208x112, the redraw's MCUs), only the one holding the spot.
    assert frame.changed == [Rect(0, 64, 208, 16)]
    assert pixel(frame, 150, 70) == (200, 0, 0)
    assert pixel(frame, 149, 70) == (9, 9, 9)


def test_env_switch_forces_getimage(xenv, monkeypatch):
    monkeypatch.setenv(NO_SHM_ENV, "1")
    with Screen() as screen:
        assert not screen.uses_shm


def test_shm_refused_by_server_of_other_uid_falls_back(monkeypatch):
    # Xvfb runs as nobody; our 0600 root segment cannot be attached by it.
    server = start_xvfb(64, 48, owner_uid=0, server_uid=NOBODY)
    try:
        monkeypatch.setenv("XAUTHORITY", server.xauthority)
        painter = Painter(server)
        try:
            painter.fill(1, 1, 2, 2, (200, 100, 50))
            with Screen(server.display) as screen:
                assert not screen.uses_shm
                assert pixel(screen.grab(), 1, 1) == (200, 100, 50)
        finally:
            painter.close()
    finally:
        server.stop()


def shm_ids() -> set[int]:
    with open("/proc/sysvipc/shm") as f:
        next(f)
        return {int(line.split()[1]) for line in f if line.strip()}


def test_close_frees_shm_segment(xenv):
    before = shm_ids()
    screen = Screen()
    assert screen.uses_shm
    assert shm_ids() - before, "segment attached while open"
    screen.close()
    screen.close()  # idempotent
    assert shm_ids() - before == set()
    with pytest.raises(DisplayLost):
        screen.poll()


@pytest.mark.parametrize("use_shm", [True, False])
def test_resize_reallocates_and_reports(xenv, painter, use_shm):
    screen = Screen(use_shm=use_shm)
    try:
        drain(screen)
        set_screen_size(xenv, 200, 150)
        changes = wait_for(lambda: (c := drain(screen)).resized and c, what="resize event")
        assert screen.size == (200, 150)
        assert all(r.x + r.width <= 200 and r.y + r.height <= 150 for r in changes.damage)
        painter.fill(190, 140, 10, 10, (0, 255, 0))
        frame = screen.grab()
        assert (frame.width, frame.height, frame.stride) == (200, 150, 800)
        assert len(frame.pixels) >= 200 * 150 * 4
        assert pixel(frame, 199, 149) == (0, 255, 0)
        set_screen_size(xenv, 317, 233)  # odd size: not a multiple of 16
        wait_for(lambda: drain(screen).resized, what="second resize")
        assert screen.size == (317, 233)
        assert screen.grab().width == 317
    finally:
        screen.close()


def test_grab_after_unseen_shrink_recovers(xenv):
    screen = Screen()
    try:
        drain(screen)
        set_screen_size(xenv, 160, 120)
        frame = screen.grab()  # the RandR event is not read yet: full-size GetImage fails
        assert (frame.width, frame.height) == (160, 120)
        assert drain(screen).resized
    finally:
        screen.close()


def test_pointer_motion_and_position(xenv, painter):
    screen = Screen()
    try:
        drain(screen)
        xtest.fake_input(painter.display, 6, x=123, y=45)  # 6 = MotionNotify
        painter.sync()
        wait_for(lambda: drain(screen).pointer_moved, what="raw motion")
        assert screen.pointer_position() == (123, 45)
        assert not drain(screen).pointer_moved
    finally:
        screen.close()


def test_wrong_cookie_is_display_unavailable(xserver, tmp_path, monkeypatch):
    bad = tmp_path / "bad.auth"
    from tests.support.xserver import write_xauthority

    write_xauthority(str(bad), xserver.display, "00" * 16)
    monkeypatch.setenv("XAUTHORITY", str(bad))
    with pytest.raises(DisplayUnavailable) as info:
        Screen(xserver.display)
    message = str(info.value)
    assert xserver.display in message and "\n" not in message


def test_no_server_is_display_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("XAUTHORITY", str(tmp_path / "none"))
    with pytest.raises(DisplayUnavailable) as info:
        Screen(":987")
    assert ":987" in str(info.value)


def test_a_local_display_never_falls_back_to_tcp(monkeypatch, tmp_path):
    """python-xlib tries TCP when ":N"'s socket fails; in the service's sandbox (no AF_INET) that
    turned "no X server" into a misleading "address family not supported"."""
    from Xlib.support import unix_connect

    tried = []
    monkeypatch.setattr(unix_connect, "_get_tcp_socket", lambda *a: tried.append(a) or 1 / 0)
    monkeypatch.setenv("XAUTHORITY", str(tmp_path / "none"))
    with pytest.raises(DisplayUnavailable):
        Screen(":987")
    assert tried == []


def test_server_death_is_display_lost(xenv):
    screen = Screen()
    try:
        drain(screen)
        xenv.proc.kill()
        xenv.proc.wait(5)
        with pytest.raises(DisplayLost) as info:
            for _ in range(3):
                screen.poll()
                screen.grab()
        assert xenv.display in str(info.value)
    finally:
        screen.close()


def test_fileno_is_the_x_socket(xenv):
    with Screen() as screen:
        assert os.fstat(screen.fileno()).st_mode & 0o170000 == 0o140000  # a socket


def test_row_spans_merge():
    rects = [Rect(0, 10, 5, 5), Rect(50, 12, 5, 10), Rect(0, 40, 1, 1), Rect(0, 300, 5, 5)]
    assert row_spans(rects, 100) == [(10, 22), (40, 41)]


def _xauth_entry(family: int, address: bytes, number: bytes, cookie: bytes) -> bytes:
    out = struct.pack(">H", family)
    for part in (address, number, b"MIT-MAGIC-COOKIE-1", cookie):
        out += struct.pack(">H", len(part)) + part
    return out


@pytest.mark.parametrize("family,address", [(65535, b""), (256, socket.gethostname().encode())])
def test_gdm_style_xauthority_with_empty_display_number_connects(xserver, tmp_path, monkeypatch,
                                                                 family, address):
    """GDM writes FamilyWild and host entries with an empty display number; python-xlib alone
    ignores FamilyWild, libXau (and so the service's check) takes both: the worker must too."""
    path = tmp_path / "Xauthority"
    path.write_bytes(_xauth_entry(family, address, b"", bytes.fromhex(xserver.cookie)))
    monkeypatch.setenv("XAUTHORITY", str(path))
    with Screen(xserver.display) as screen:
        assert screen.grab().width == 320


def test_cookie_for_another_host_is_not_used(xserver, tmp_path, monkeypatch):
    path = tmp_path / "Xauthority"
    path.write_bytes(_xauth_entry(256, b"not-" + socket.gethostname().encode(), b"",
                                  bytes.fromhex(xserver.cookie)))
    monkeypatch.setenv("XAUTHORITY", str(path))
    with pytest.raises(DisplayUnavailable):
        Screen(xserver.display)
