"""A real SPICE host (libspice-server) and client for conformance tests, plus a fake guest to check them.

How libspice-server 0.15 (server/red-stream-device.cpp) judges what the guest writes on the stream port:
- Header: 8 bytes little-endian (u8 version, u8 padding, u16 type, u32 size). The version and padding are
  NOT checked; the type and size are.
- FORMAT: size must be exactly 12 (u32 w, u32 h, u8 codec, 3 pad), else "Wrong size for StreamMsgFormat".
  Width/height/codec are not checked here; the stream channel creates a w x h surface from them.
- DATA: size <= 32 MiB, else "STREAM_DATA too large". The payload is forwarded as one stream frame.
- CURSOR_SET: size must be >= 12 (the StreamMsgCursorSet header) and <= header + (1024*4 + 128) * 1024,
  else "Cursor size is invalid". Then width and height must be <= 1024, type must be ALPHA (32 bpp),
  COLOR24 (24+1 bpp) or COLOR32 (32+1 bpp: pixels plus a 1-bit mask), and the payload must hold at least
  align8(w*h*bpp)/8 bytes; otherwise it is rejected with the default "Protocol error".
- CURSOR_MOVE: size must be exactly 8 (i32 x, i32 y), else "Wrong size for StreamMsgCursorMove".
- CAPABILITIES: size <= 1024, else "Wrong size for StreamMsgCapabilities"; only known bits are kept.
- DEVICE_DISPLAY_INFO: size <= 12 + 256, else "StreamMsgDeviceDisplayInfo too large"; a zero or overlong
  address length is only warned about and ignored (no protocol error).
- Any other type (0, START_STOP, NOTIFY_ERROR, QUALITY_INDICATOR, unknown) is "Invalid message type":
  QUALITY_INDICATOR is not accepted from the guest even though the header defines it.
- A rejection logs g_warning "Stream device received invalid message: <reason>", writes NOTIFY_ERROR
  (u32 0 + NUL-terminated reason) to the guest, then discards everything the guest writes and disables
  the device (state 0) until the port is closed and reopened (SpiceHost.reopen()).
- While the SPICE client's queue is not empty the server stops reading the device (flow control) and
  resumes when it drains; no client connected means START_STOP with no codecs (stop).

Host-to-guest: on port open the server writes CAPABILITIES (1 zero byte for 0.15.1's single capability
bit); when a client connects to the stream's display channel it writes START_STOP with the codecs every
connected client supports (MJPEG = 1 always included); when the last client leaves, START_STOP with 0.

Clients: SpiceHost.screenshot() runs spicy-screenshot (it needs no display; it saves a PPM on the
first display invalidation) and retries until the picture is not uniformly black, since that first
invalidation can come before the first stream frame. Measured here with the fake guest it got the frame
on every try (~0.5 s). SpiceHost.grab() runs the harness's own libspice-client-glib client,
tests/harness/spice_grab.c, which waits for non-black content itself, can wait for several frames, and
also reports the cursor the client receives (cursor-set), which spicy-screenshot cannot show.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageChops, ImageStat

from spice_stream_common import protocol as proto

from .waiting import stop_process

HARNESS_DIR = Path(__file__).resolve().parent.parent / "harness"
BUILD_DIR = HARNESS_DIR / "build"
STREAM_PORT_NAME = "org.spice-space.stream.0"
INVALID_MESSAGE = "Stream device received invalid message"

_PKG = {
    "spice_host": ["spice-server", "glib-2.0"],
    "spice_grab": ["spice-client-glib-2.0"],
}
_build_lock = threading.Lock()


class SpiceHostError(RuntimeError):
    """The harness could not be built or started."""


def build(name: str) -> Path:
    """Compile tests/harness/<name>.c once per source content; returns the binary's path."""
    source = HARNESS_DIR / f"{name}.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    binary = BUILD_DIR / f"{name}-{digest}"
    with _build_lock:
        if binary.exists():
            return binary
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        try:
            flags = subprocess.run(
                ["pkg-config", "--cflags", "--libs", *_PKG[name]],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
        except (OSError, subprocess.CalledProcessError) as exc:
            raise SpiceHostError(f"pkg-config for {name} failed: {exc}") from exc
        # Build under a temporary name and rename, so a concurrent run never executes half a file.
        tmp = BUILD_DIR / f".{name}-{digest}.{os.getpid()}"
        res = subprocess.run(
            ["gcc", "-O1", "-Wall", "-o", str(tmp), str(source), *flags],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            raise SpiceHostError(f"building {name} failed:\n{res.stderr[-3000:]}")
        os.replace(tmp, binary)
        # Binaries of older sources are never run again.
        for old in BUILD_DIR.glob(f"{name}-*"):
            if old != binary:
                with contextlib.suppress(OSError):
                    old.unlink()
    return binary


def psnr(a: Image.Image, b: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB of two RGB pictures of one size (inf when identical)."""
    if a.size != b.size:
        raise ValueError(f"sizes differ: {a.size} vs {b.size}")
    diff = ImageChops.difference(a.convert("RGB"), b.convert("RGB"))
    sq = sum(ImageStat.Stat(diff).sum2)
    mse = sq / (a.size[0] * a.size[1] * 3)
    return math.inf if mse == 0 else 10 * math.log10(255 * 255 / mse)


def is_black(img: Image.Image) -> bool:
    return img.convert("RGB").getbbox() is None


@dataclass
class Grab:
    """What spice_grab saw: the picture and, if one arrived, the cursor a client would draw."""

    image: Image.Image
    lines: list[str]
    cursor: Image.Image | None = None  # RGBA
    cursor_bytes: bytes | None = None  # as the client hands them out: R G B A per pixel
    cursor_hotspot: tuple[int, int] | None = None
    cursor_moves: list[tuple[int, int]] = field(default_factory=list)


class SpiceHost:
    """spice_host running with its stream port on a pty; use as a context manager.

    .pty_path is where the guest side (fake guest or real worker) opens the "device", .port the SPICE
    TCP port on 127.0.0.1, .log_lines every line the host printed.
    """

    def __init__(self, debug: bool = False, start_timeout: float = 15.0,
                 follow_guest: bool = False, multi_client: bool = False) -> None:
        """`multi_client`: several clients at once (libspice-server's SPICE_DEBUG_ALLOW_MC, as
        QEMU needs too); otherwise a new client disconnects the one before."""
        self._binary = build("spice_host")
        self._cond = threading.Condition()
        self.log_lines: list[str] = []
        self.pty_path = ""
        self.port = 0
        self._tmpdir = tempfile.mkdtemp(prefix="spicehost-")
        args = [str(self._binary)] + (["--debug"] if debug else []) + (
            ["--follow-guest"] if follow_guest else [])
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "SPICE_DEBUG_ALLOW_MC": "1"} if multi_client else None,
        )
        self._reader = threading.Thread(target=self._read, name="spice_host-reader", daemon=True)
        self._reader.start()
        try:
            line = self.wait_line(lambda s: s.startswith(("READY ", "FATAL ")), start_timeout)
            if line.startswith("FATAL"):
                raise SpiceHostError(line)
            fields = dict(kv.split("=", 1) for kv in line.split()[1:])
            self.port = int(fields["port"])
            self.pty_path = fields["pty"]
        except BaseException:
            self.stop()
            raise

    # -- output ----------------------------------------------------------------------------------

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self.log_lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, predicate: Callable[[str], bool], timeout: float, start: int = 0) -> str:
        """First line (from index start) matching predicate; AssertionError after timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.log_lines[start:]:
                    if predicate(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = "\n".join(self.log_lines[-20:])
                    raise AssertionError(f"spice_host printed no matching line in {timeout}s:\n{tail}")
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise SpiceHostError(f"spice_host exited with {self.proc.returncode}")
                self._cond.wait(min(left, 0.2))

    def protocol_errors(self) -> list[str]:
        """Lines showing the host rejected something the guest wrote."""
        with self._cond:
            return [s for s in self.log_lines if s.startswith("PROTOCOL_ERROR ")]

    def warnings(self) -> list[str]:
        """libspice-server warnings and worse (a wrong-but-tolerated message shows up here)."""
        with self._cond:
            return [
                s for s in self.log_lines if s.startswith(("LOG warning", "LOG critical", "LOG error"))
            ]

    def mark(self) -> int:
        """Index to pass as start= to wait_line, to wait only for lines printed from now on."""
        with self._cond:
            return len(self.log_lines)

    # -- control ---------------------------------------------------------------------------------

    def _command(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()

    def reopen(self, timeout: float = 5.0) -> None:
        """Close and reopen the port, as when the guest reopens the device: clears the error state."""
        start = self.mark()
        self._command("reopen")
        self.wait_line(lambda s: s == "PORT opened", timeout, start)

    # -- clients ---------------------------------------------------------------------------------

    def grab(
        self,
        path: str | os.PathLike[str] | None = None,
        timeout: float = 20.0,
        frames: int = 1,
        wait_cursor: bool = False,
        env: dict[str, str] | None = None,
    ) -> Grab:
        """Connect spice_grab, return the first non-black streamed picture (after `frames` frames).
        `env`: the client's environment (GStreamer's, to hide decoders: the codecs it offers)."""
        binary = build("spice_grab")
        path = str(path or os.path.join(self._tmpdir, "grab.ppm"))
        cursor_raw = os.path.join(self._tmpdir, "cursor.rgba")
        args = [str(binary), "-h", "127.0.0.1", "-p", str(self.port), "-o", path]
        args += ["-t", str(max(1, math.ceil(timeout))), "-n", str(frames), "--cursor-out", cursor_raw]
        if wait_cursor:
            args.append("--wait-cursor")
        try:
            res = subprocess.run(args, capture_output=True, text=True, timeout=timeout + 10, env=env)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"spice_grab hung: {exc.stdout!r}") from exc
        lines = res.stdout.splitlines()
        if res.returncode != 0:
            raise AssertionError(
                f"spice_grab failed ({res.returncode}): {lines[-10:]} {res.stderr[-1000:]}\n"
                f"host: {self.log_lines[-15:]}"
            )
        with Image.open(path) as im:
            image = im.convert("RGB")
        grab = Grab(image=image, lines=lines)
        for line in lines:
            parts = line.split()
            if parts[0] == "CURSOR_SET" and len(parts) >= 6:
                w, h, hx, hy = (int(v) for v in parts[1:5])
                with open(cursor_raw, "rb") as f:
                    grab.cursor_bytes = f.read(w * h * 4)
                grab.cursor = Image.frombytes("RGBA", (w, h), grab.cursor_bytes)
                grab.cursor_hotspot = (hx, hy)
            elif parts[0] == "CURSOR_MOVE":
                grab.cursor_moves.append((int(parts[1]), int(parts[2])))
        return grab

    def viewer(self, timeout: float = 120.0) -> Viewer:
        """A client that stays connected (spice_grab --serve) until closed: a viewer left open."""
        return Viewer(self, timeout)

    def screenshot(self, path: str | os.PathLike[str], timeout: float = 20.0) -> Image.Image:
        """spicy-screenshot, retried until its picture is not uniformly black (or AssertionError)."""
        tool = shutil.which("spicy-screenshot")
        if tool is None:
            raise SpiceHostError("spicy-screenshot is not installed (package spice-client-gtk)")
        deadline = time.monotonic() + timeout
        attempts = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"spicy-screenshot gave only black pictures ({attempts} tries)")
            attempts += 1
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(
                    [tool, "-h", "127.0.0.1", "-p", str(self.port), "-o", str(path)],
                    capture_output=True,
                    timeout=min(left, 10),
                )
            if os.path.exists(path):
                with Image.open(path) as im:
                    image = im.convert("RGB")
                if not is_black(image):
                    return image

    # -- lifetime --------------------------------------------------------------------------------

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not go; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()
        self._reader.join(5)
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        return self.proc.returncode

    def __enter__(self) -> SpiceHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Viewer:
    """spice_grab --serve connected to a SpiceHost: its output lines, and its picture on demand."""

    def __init__(self, host: SpiceHost, timeout: float) -> None:
        self._host = host
        self._cond = threading.Condition()
        self.lines: list[str] = []
        self._n = 0
        args = [str(build("spice_grab")), "-h", "127.0.0.1", "-p", str(host.port),
                "-o", os.path.join(host._tmpdir, f"viewer-{id(self)}-first.ppm"),
                "-t", str(max(1, math.ceil(timeout))), "--serve"]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, name="spice_grab-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, predicate: Callable[[str], bool], timeout: float, start: int = 0) -> str:
        """First output line (from index start) matching predicate; AssertionError after timeout
        or once the client has exited without one."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    if predicate(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"spice_grab --serve printed no matching line ({self.proc.poll()}): "
                        f"{self.lines[-10:]}\nhost: {self._host.log_lines[-15:]}")
                self._cond.wait(min(left, 0.2))

    def save(self, timeout: float = 10.0) -> tuple[Image.Image, int]:
        """The client's current picture, and how many invalidations (frames) it has had so far."""
        self._n += 1
        path = os.path.join(self._host._tmpdir, f"viewer-{id(self)}-{self._n}.ppm")
        with self._cond:
            start = len(self.lines)
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(f"save {path}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise AssertionError(f"spice_grab has exited ({self.proc.wait(5)}): "
                                 f"{self.lines[-10:]}") from None
        # (SAVED of a save has 5 fields: the one of the first picture, printed by itself, has 4.)
        line = self.wait_line(lambda s: len(s.split()) == 5 and s.startswith("SAVED ")
                              or s.startswith("ERROR "), timeout, start)
        if line.startswith("ERROR"):
            raise AssertionError(f"spice_grab: {line}")
        with Image.open(path) as im:
            return im.convert("RGB"), int(line.split()[-1])

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(3)
        stop_process(self.proc, timeout=3)
        self._reader.join(5)

    def __enter__(self) -> Viewer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def quadrants(width: int = 320, height: int = 240) -> Image.Image:
    """A test picture: four coloured quadrants (red, green, blue, white)."""
    img = Image.new("RGB", (width, height))
    hw, hh = width // 2, height // 2
    img.paste((220, 30, 30), (0, 0, hw, hh))
    img.paste((30, 200, 60), (hw, 0, width, hh))
    img.paste((40, 60, 220), (0, hh, hw, height))
    img.paste((240, 240, 240), (hw, hh, width, height))
    return img


class FakeGuest:
    """A scripted stream agent on the pty: answers CAPABILITIES, streams a JPEG while asked to.

    Everything the host sent is kept in .received (protocol.Message / Violation). raw_write() lets a
    test send malformed bytes.
    """

    def __init__(self, pty_path: str, picture: Image.Image, interval: float = 0.1) -> None:
        buf = io.BytesIO()
        picture.convert("RGB").save(buf, "JPEG", quality=90)
        self.jpeg = buf.getvalue()
        self.size = picture.size
        self.interval = interval
        self.received: list[proto.Message | proto.Violation] = []
        self.frames_sent = 0
        self._streaming = False
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._need_format = False
        # Non-blocking so a host that stops reading cannot wedge close().
        self._fd = os.open(pty_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self._parser = proto.Parser()
        self._threads = [
            threading.Thread(target=self._read_loop, name="fakeguest-read", daemon=True),
            threading.Thread(target=self._send_loop, name="fakeguest-send", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def raw_write(self, data: bytes) -> None:
        with self._write_lock:
            view = memoryview(data)
            while view:
                if self._stop.is_set():
                    raise OSError("fake guest closed")
                try:
                    n = os.write(self._fd, view)
                except BlockingIOError:
                    select.select([], [self._fd], [], 0.1)
                    continue
                view = view[n:]

    def messages(self, msg_type: int) -> list[proto.Message]:
        with self._cond:
            return [m for m in self.received if isinstance(m, proto.Message) and m.type == msg_type]

    def wait_message(self, msg_type: int, timeout: float, count: int = 1) -> proto.Message:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages(msg_type)) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no message of type {msg_type} from the host in {timeout}s")
                self._cond.wait(min(left, 0.2))
            return self.messages(msg_type)[count - 1]

    def _read_loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                return
            if not data:
                return
            try:
                for item in self._parser.feed(data):
                    self._handle(item)
            except OSError:
                if self._stop.is_set():
                    return  # closed while answering: the test is over, not an error of its
                raise

    def _handle(self, item: proto.Message | proto.Violation) -> None:
        with self._cond:
            self.received.append(item)
            self._cond.notify_all()
        if not isinstance(item, proto.Message):
            return
        if item.type == proto.MsgType.CAPABILITIES:
            self.raw_write(proto.capabilities(b""))
        elif item.type == proto.MsgType.START_STOP:
            codecs = proto.decode_start_stop(item.payload).codecs
            with self._cond:
                self._streaming = proto.CODEC_MJPEG in codecs
                if self._streaming:
                    # A (re)start needs a FORMAT before the next frame.
                    self._need_format = True
                self._cond.notify_all()

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                if not self._streaming:
                    self._cond.wait(0.2)
                    continue
                need_format = self._need_format
                self._need_format = False
            try:
                if need_format:
                    self.raw_write(proto.format_msg(*self.size))
                self.raw_write(proto.data_header(len(self.jpeg)) + self.jpeg)
            except OSError:
                return
            self.frames_sent += 1
            self._stop.wait(self.interval)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def __enter__(self) -> FakeGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
