"""Real Xvfb servers with real Xauthority cookies for tests, and a painter that draws on them."""

from __future__ import annotations

import os
import secrets
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from Xlib import X
from Xlib import display as xdisplay

from .waiting import stop_process, wait_until

START_TIMEOUT = 15.0


class XServerError(RuntimeError):
    """Xvfb could not be started."""


class XServer:
    """One running Xvfb; stop() kills it and removes its Xauthority directory."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        display: str,
        xauthority: str,
        cookie: str,
        tmpdir: str,
        width: int,
        height: int,
    ) -> None:
        self.proc = proc
        self.display = display
        self.xauthority = xauthority
        self.cookie = cookie
        self.width = width
        self.height = height
        self._tmpdir = tmpdir

    @property
    def pid(self) -> int:
        return self.proc.pid

    def env(self) -> dict[str, str]:
        return {"DISPLAY": self.display, "XAUTHORITY": self.xauthority}

    def full_env(self) -> dict[str, str]:
        """os.environ with DISPLAY and XAUTHORITY pointing at this server (for subprocesses)."""
        env = dict(os.environ)
        env.update(self.env())
        return env

    def connect(self) -> xdisplay.Display:
        """A python-xlib connection authenticated with this server's cookie."""
        old = os.environ.get("XAUTHORITY")
        os.environ["XAUTHORITY"] = self.xauthority
        try:
            return xdisplay.Display(self.display)
        finally:
            if old is None:
                os.environ.pop("XAUTHORITY", None)
            else:
                os.environ["XAUTHORITY"] = old

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> XServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_xauthority(path: str, display: str, cookie: str) -> None:
    """Write a real Xauthority file holding one MIT-MAGIC-COOKIE-1 for display."""
    subprocess.run(
        ["xauth", "-q", "-f", path, "add", display, "MIT-MAGIC-COOKIE-1", cookie],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def start_xvfb(
    width: int = 1024,
    height: int = 768,
    owner_uid: int | None = None,
    extra_args: list[str] | None = None,
    server_uid: int | None = None,
) -> XServer:
    """Start Xvfb on a free display with a fresh random cookie; returns once it accepts clients.

    owner_uid: the client Xauthority file (and its directory) belong to that uid, mode 0600.
    server_uid: run Xvfb itself as that uid (e.g. to see MIT-SHM refuse another uid's segment).

    The display number is picked by Xvfb itself (-displayfd), which it writes only when it is ready,
    so there is no race for a free :N and no fixed sleep.
    """
    tmpdir = tempfile.mkdtemp(prefix="xvfb-")
    cookie = secrets.token_hex(16)
    server_auth = os.path.join(tmpdir, "server.auth")
    # The server reads its own file; "*" style entries are not needed since -auth only lists cookies.
    write_xauthority(server_auth, ":0", cookie)
    if server_uid is not None:
        os.chown(tmpdir, server_uid, -1)
        os.chown(server_auth, server_uid, -1)
    rfd, wfd = os.pipe()
    args = [
        "Xvfb",
        "-displayfd",
        str(wfd),
        "-auth",
        server_auth,
        "-noreset",
        "-nolisten",
        "tcp",
        "+extension",
        "MIT-SHM",
        "+extension",
        "DAMAGE",
        "+extension",
        "RANDR",
        "-screen",
        "0",
        f"{width}x{height}x24",
        "-br",
    ]
    if extra_args:
        args += extra_args
    # Xvfb's chatter goes to a file: an unread pipe could fill up and stall the server.
    log_path = os.path.join(tmpdir, "Xvfb.log")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            args,
            pass_fds=(wfd,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            user=server_uid,
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    os.close(wfd)
    try:
        number = _read_display_number(rfd, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    finally:
        os.close(rfd)
    display = f":{number}"
    xauthority = os.path.join(tmpdir, "Xauthority")
    try:
        write_xauthority(xauthority, display, cookie)
        os.chmod(xauthority, 0o600)
        if owner_uid is not None:
            os.chown(xauthority, owner_uid, -1)
            if server_uid is None:
                os.chown(tmpdir, owner_uid, -1)
                os.chmod(tmpdir, 0o700)
            else:
                os.chmod(tmpdir, 0o711)
    except BaseException:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    return XServer(proc, display, xauthority, cookie, tmpdir, width, height)


def _read_display_number(rfd: int, proc: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + START_TIMEOUT
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise XServerError("Xvfb did not report a display in time")
        ready, _, _ = select.select([rfd], [], [], min(left, 0.5))
        if not ready:
            if proc.poll() is not None:
                with open(proc.log_path, errors="replace") as f:  # type: ignore[attr-defined]
                    err = f.read()
                raise XServerError(f"Xvfb exited with {proc.returncode}: {err.strip()[-500:]}")
            continue
        chunk = os.read(rfd, 64)
        if not chunk:
            raise XServerError("Xvfb closed -displayfd without a display number")
        data += chunk
    return int(data.strip())


def set_screen_size(server: XServer, width: int, height: int) -> None:
    """Resize the screen with xrandr (Xvfb allows sizes up to the one it started with)."""
    name = f"spice{width}x{height}"
    env = server.full_env()
    mode = [str(width), str(width + 8), str(width + 16), str(width + 32)]
    vmode = [str(height), str(height + 1), str(height + 2), str(height + 3)]
    current = subprocess.run(["xrandr"], env=env, capture_output=True, text=True, check=True)
    if name not in current.stdout:
        subprocess.run(
            ["xrandr", "--newmode", name, "60", *mode, *vmode],
            env=env, check=True, capture_output=True,
        )
        subprocess.run(
            ["xrandr", "--addmode", "screen", name], env=env, check=True, capture_output=True
        )
    subprocess.run(
        ["xrandr", "--output", "screen", "--mode", name, "--fb", f"{width}x{height}"],
        env=env, check=True, capture_output=True,
    )


@contextmanager
def xvfb(width: int = 1024, height: int = 768, owner_uid: int | None = None) -> Iterator[XServer]:
    server = start_xvfb(width, height, owner_uid)
    try:
        yield server
    finally:
        server.stop()


# The name the capture tests use.
wait_for = wait_until


class Painter:
    """Draws on the root window of an XServer from the test process, and reads pixels back."""

    def __init__(self, server: XServer) -> None:
        self.server = server
        self.display = server.connect()
        self.screen = self.display.screen()
        self.root = self.screen.root
        self.gc = self.root.create_gc(foreground=0, subwindow_mode=X.IncludeInferiors)

    def fill(self, x: int, y: int, width: int, height: int, rgb: tuple[int, int, int]) -> None:
        r, g, b = rgb
        self.gc.change(foreground=(r << 16) | (g << 8) | b)
        self.root.fill_rectangle(self.gc, x, y, width, height)
        self.sync()

    def put_rgb(self, x: int, y: int, width: int, height: int, rgb: bytes) -> None:
        """Draw packed RGB bytes (3 per pixel) at x, y."""
        bgrx = bytearray(width * height * 4)
        bgrx[0::4] = rgb[2::3]
        bgrx[1::4] = rgb[1::3]
        bgrx[2::4] = rgb[0::3]
        # Split so that one request stays under the server's maximum request size.
        rows_per = max(1, (self.display.display.info.max_request_length * 4 - 64) // (width * 4))
        for row in range(0, height, rows_per):
            rows = min(rows_per, height - row)
            chunk = bytes(bgrx[row * width * 4 : (row + rows) * width * 4])
            self.root.put_image(self.gc, x, y + row, width, rows, X.ZPixmap, 24, 0, chunk)
        self.sync()

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        img = self.root.get_image(x, y, 1, 1, X.ZPixmap, 0xFFFFFFFF)
        b, g, r = img.data[0], img.data[1], img.data[2]
        return (r, g, b)

    def sync(self) -> None:
        self.display.sync()

    def close(self) -> None:
        try:
            self.display.close()
        except Exception:
            pass
