"""spice-stream-worker: the command line, the device fd, signals and the event loop around the Streamer."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import selectors
import signal
import stat
import sys
import termios
import time
import tty

from spice_stream_common import frameparts, logsetup
from spice_stream_common import protocol as p
from spice_stream_common.codecnames import parse_preference
from spice_stream_common.constants import VERSION
from spice_stream_common.exitcodes import (
    DeviceLost,
    DeviceUnavailable,
    DisplayUnavailable,
    ExitCode,
    StoppedByUser,
    WorkerError,
)
from spice_stream_common.outbox import Outbox

from .status import StatusReporter
from .streamer import HostState, Streamer

log = logging.getLogger("spice-stream-worker")

READ_CHUNK = 64 * 1024
STOP_GRACE_S = 2.0
STATUS_PERIOD_S = 0.5  # how long a stop may wait for the host to take the rest of a message
SOURCES = ("x11", "screencast", "scanout")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="spice-stream-worker",
        description="Capture the session's screen (X11: the display named by $DISPLAY; GNOME on Wayland: "
                    "mutter's ScreenCast on the session bus) and stream it as MJPEG on a SPICE stream port.",
    )
    dev = ap.add_mutually_exclusive_group(required=True)
    dev.add_argument("--device", metavar="PATH",
                     help="the stream port, e.g. /dev/virtio-ports/org.spice-space.stream.0")
    dev.add_argument("--device-fd", metavar="N", type=int, help="an inherited, already open device fd")
    ap.add_argument("--source", choices=SOURCES, default="x11",
                    help="what to capture: x11 ($DISPLAY, the default), screencast (GNOME on Wayland: "
                         "mutter's ScreenCast on $DBUS_SESSION_BUS_ADDRESS) or scanout (what the "
                         "display shows, read from the kernel: --card-fd and --grant-fd, or --card)")
    ap.add_argument("--card-fd", metavar="N", type=int,
                    help="scanout: an inherited, open DRM device (read-only) the service opened")
    ap.add_argument("--grant-fd", metavar="N", type=int,
                    help="scanout: the socket on which the service hands out framebuffer handles")
    ap.add_argument("--card", metavar="PATH",
                    help="scanout without the service (as root): open this DRM device and take "
                         "framebuffer handles directly")
    ap.add_argument("--status-fd", metavar="N", type=int, help="write JSON status lines to this pipe")
    ap.add_argument("--fps", type=int, default=30, help="frame rate cap (1-120, default 30)")
    ap.add_argument("--quality", type=int, default=80,
                    help="picture quality (1-100, default 80): JPEG's, and the video codecs' from it")
    ap.add_argument("--codecs", metavar="LIST", default="mjpeg",
                    help="codecs in order of preference, from mjpeg, h264, vp8, vp9 (default mjpeg; "
                         "the first the host offers and this guest encodes is used)")
    ap.add_argument("--keyframe-interval", metavar="S", type=float, default=10.0,
                    help="a video codec's keyframe at least every S seconds (0: only when needed)")
    ap.add_argument("--start-codecs", metavar="LIST", default=None,
                    help="host state handed over: the last START_STOP codecs, comma separated, or 'none'")
    ap.add_argument("--host-caps", metavar="HEX", default=None,
                    help="host state handed over: its capabilities")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    args = ap.parse_args(argv)
    if args.source == "scanout" and not (args.card or (args.card_fd is not None
                                                       and args.grant_fd is not None)):
        ap.error("--source scanout needs --card-fd and --grant-fd (from the service) or --card")
    if not 1 <= args.fps <= 120:
        ap.error(f"--fps {args.fps}: allowed 1-120")
    if not 1 <= args.quality <= 100:
        ap.error(f"--quality {args.quality}: allowed 1-100")
    if not 0 <= args.keyframe_interval <= 3600:
        ap.error(f"--keyframe-interval {args.keyframe_interval}: allowed 0-3600")
    try:
        args.codecs = parse_preference(args.codecs)
    except ValueError as exc:
        ap.error(f"--codecs: {exc}")
    try:
        args.host = HostState(
            codecs=_parse_codecs(args.start_codecs),
            caps=bytes.fromhex(args.host_caps) if args.host_caps else None,
        )
    except ValueError as exc:
        ap.error(f"bad handed-over host state: {exc}")
    return args


def _parse_codecs(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    if text in ("", "none"):
        return ()
    codecs = tuple(int(c) for c in text.split(","))
    if any(not 0 < c < 256 for c in codecs):
        raise ValueError(f"codec out of range in {text!r}")
    return codecs


def follow_parent() -> None:
    """Die with the service that started us, even while stopped (SIGKILL acts on a stopped
    process, SIGTERM waits for a SIGCONT that may never come): no worker outlives its service."""
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the service died before prctl took effect
        raise DeviceUnavailable("the service that started this worker is gone")


def open_device(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise DeviceUnavailable(f"cannot open device {path}: {exc.strerror}") from None
    if not stat.S_ISCHR(os.fstat(fd).st_mode):
        os.close(fd)
        raise DeviceUnavailable(f"cannot use device {path}: not a character device")
    return fd


def prepare_device(fd: int) -> None:
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise DeviceUnavailable(f"device fd {fd} is not open: {exc.strerror}") from None
    # The port is a character device (a pty in tests); a socket is the service's relay end.
    if not (stat.S_ISCHR(st.st_mode) or stat.S_ISSOCK(st.st_mode)):
        raise DeviceUnavailable(f"device fd {fd} is not a character device or socket "
                                f"(mode {stat.filemode(st.st_mode)})")
    os.set_blocking(fd, False)
    if os.isatty(fd):
        # A pty stand-in must not translate or echo our bytes; a virtio port is not a tty at all.
        try:
            tty.setraw(fd, termios.TCSANOW)
        except termios.error as exc:
            raise DeviceUnavailable(f"cannot make the device raw: {exc}") from None


def open_source(args: argparse.Namespace):
    """The capture source the command line chose (its modules are imported only when chosen)."""
    if args.source == "screencast":
        from .sources.screencast import ScreenCast

        return ScreenCast(fps=args.fps)
    if args.source == "scanout":
        return _open_scanout(args)
    from .sources.x11 import Screen

    return Screen(os.environ.get("DISPLAY"))


def _open_scanout(args: argparse.Namespace):
    from spice_stream_common import kms
    from spice_stream_common.fbgrant import GrantClient

    from .sources.scanout import Scanout

    card: kms.Card | None = None
    client: GrantClient | None = None
    try:
        if args.card:
            card = kms.Card(args.card)
            card.drop_master()

            def grant(fb_id: int) -> int:  # as root: the kernel's handle, directly
                return card.framebuffer(fb_id).handle

            close_grant = None
        else:
            client = GrantClient(args.grant_fd)
            card = kms.Card("service's DRM device", fd=args.card_fd)
            grant, close_grant = client.handle, client.close
        # The Scanout owns the card and the client: it closes them when it fails (its
        # DisplayUnavailable goes on to main(), one line and the exit code).
        return Scanout(card, grant, fps=args.fps, close_grant=close_grant)
    except OSError as exc:
        if card is not None:
            card.close()
        if client is not None:
            client.close()
        raise DisplayUnavailable(f"scanout: cannot use the DRM device: {exc}") from None


class Worker:
    """Owns the loop's sources: the device fd, the capture source, the signal pipe."""

    def __init__(self, args: argparse.Namespace, device_fd: int) -> None:
        self.args = args
        self.fd = device_fd
        self.stop_signal: int | None = None
        self.selector = selectors.DefaultSelector()
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def run(self) -> ExitCode:
        from .display_info import find_display_device
        from .encoder import JpegEncoder
        from .streamcodec import StreamCodec
        from .videoencoder import Settings

        screen = open_source(self.args)
        try:
            log.info("capturing %s, %dx%d, device fd %d", screen.describe(), *screen.size, self.fd)
            outbox = Outbox(self.fd)
            to_service = stat.S_ISSOCK(os.fstat(self.fd).st_mode)  # else the port itself
            codec = StreamCodec(JpegEncoder(self.args.quality), self.args.codecs, Settings(
                fps=self.args.fps, quality=self.args.quality,
                keyframe_interval_s=self.args.keyframe_interval))
            streamer = Streamer(
                screen, codec, outbox,
                fps=self.args.fps, host=self.args.host,
                display_address=find_display_device(),
                read_cursor=screen.cursor_image,
                frame_parts=frameparts.Sender() if to_service else None,
            )
            status = StatusReporter(self.args.status_fd)
            # On the service's socket the service's own word comes too (KEYFRAME).
            parser = p.Parser(frameparts.SERVICE_TO_WORKER_LIMITS if to_service else None)
            try:
                return self._loop(screen, streamer, outbox, status, parser)
            finally:
                codec.close()
        finally:
            screen.close()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stop_signal = signum

    def _loop(self, screen, streamer: Streamer, outbox: Outbox, status: StatusReporter,
              parser: p.Parser) -> ExitCode:
        signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        sel = self.selector
        sel.register(self._sig_r, selectors.EVENT_READ, "signal")
        sel.register(screen.fileno(), selectors.EVENT_READ, "source")
        sel.register(self.fd, selectors.EVENT_READ, "device")
        streamer.start()
        writing = False
        next_report = 0.0
        reported_streaming: bool | None = None
        while self.stop_signal is None:
            # Bookkeeping only when due: a frame is written in many small device writes, and each
            # of them wakes this loop.
            now = time.monotonic()
            if now >= next_report:
                status.report(streamer.state())
                next_report = now + STATUS_PERIOD_S
                if status.lost:
                    log.info("the service closed the status pipe: stopping")
                    break
            if outbox.pending and not outbox.flush() and not writing:
                sel.modify(self.fd, selectors.EVENT_READ | selectors.EVENT_WRITE, "device")
                writing = True
            elif not outbox.pending and writing:
                sel.modify(self.fd, selectors.EVENT_READ, "device")
                writing = False
            deadline = streamer.next_deadline()
            timeout = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            # python-xlib may have read events into its queue already: do not sleep on them.
            if screen.needs_poll():
                timeout = 0.0
            source_ready = False
            for key, mask in sel.select(timeout):
                if key.data == "signal":
                    _drain(self._sig_r)
                elif key.data == "source":
                    source_ready = True
                elif mask & selectors.EVENT_READ:
                    self._read_device(streamer, parser)
            if source_ready or screen.needs_poll():
                streamer.on_screen_changes(screen.poll())
            deadline = streamer.next_deadline()
            if deadline is not None and time.monotonic() >= deadline:
                streamer.tick()
            if streamer.streaming != reported_streaming:
                reported_streaming = streamer.streaming
                next_report = 0.0  # start and stop are reported at once
                # A source that looks at the screen on a timer (the scanout) rests while nothing
                # is streamed: a worker in standby costs no CPU.
                set_wanted = getattr(screen, "set_wanted", None)
                if set_wanted is not None:
                    set_wanted(streamer.streaming)
        if self.stop_signal is not None:
            log.info("stopping on signal %d", self.stop_signal)
        torn = not outbox.finish_current(STOP_GRACE_S)
        status.report(streamer.state() | {"streaming": False}, force=True)
        return ExitCode.DEVICE_LOST if torn else ExitCode.OK

    def _read_device(self, streamer: Streamer, parser: p.Parser) -> None:
        try:
            data = os.read(self.fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno == errno.EIO:
                raise DeviceLost("device closed by the host side (EIO)") from None
            raise DeviceLost(f"device read failed: {exc.strerror}") from None
        if not data:
            raise DeviceLost("device reached end of file")
        streamer.on_host_bytes(data, parser)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logsetup.setup("spice-stream-worker", args.log_level.upper())
    try:
        if args.device_fd is not None:
            follow_parent()
            fd = args.device_fd
        else:
            fd = open_device(args.device)
        prepare_device(fd)
        return int(Worker(args, fd).run())
    except StoppedByUser as exc:  # the user's own choice, not a fault
        log.info("%s", exc)
        return int(exc.exit_code)
    except WorkerError as exc:
        log.error("%s", exc)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.OK)
    except Exception:
        log.exception("unexpected error")
        return int(ExitCode.FAILURE)


if __name__ == "__main__":
    sys.exit(main())
