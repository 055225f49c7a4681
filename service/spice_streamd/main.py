"""spice-streamd's command line and lifetime: wires the bus, sessions, seat, device and worker together."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time

from dbus_next.aio import MessageBus
from dbus_next.constants import NameFlag, RequestNameReply
from dbus_next.errors import DBusError

from spice_stream_common import constants, logsetup
from spice_stream_common.dbusnext_compat import bus_for, describe_bus, disconnected

from . import heap
from .config import KEYS, Config, load
from .coordinator import Coordinator
from .dbus_service import RegistrationEndpoint, StreamingAgentInterface
from .errors import ConfigError
from .polkit import PolkitAuthority
from .propertyreader import PropertyReader
from .readaccess import owners_of
from .sessions import SessionRegistry
from .verifier import RegistrationVerifier

log = logging.getLogger("spice_streamd")

# Helper D's subcommands: dispatched before the service's own options are parsed.
INSTALL_COMMANDS = ("install-system-files", "uninstall-system-files")
IDLE_CHECK_S = 1.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="spice-streamd",
        usage="%(prog)s [options]\n       %(prog)s install-system-files [--prefix P] [--destdir D] "
              "[--bindir B]\n       %(prog)s uninstall-system-files [--prefix P] [--destdir D]",
        description="Root service that streams the active graphical session to the SPICE host.",
        epilog="subcommands:\n"
               "  install-system-files    put the D-Bus, systemd, udev, polkit and autostart files "
               "in place (root)\n"
               "  uninstall-system-files  remove what install-system-files put (root)\n"
               "Each has its own --help.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {constants.VERSION}")
    p.add_argument("--bus", default="system",
                   help="'system' (default), 'session', or a D-Bus address such as "
                        "unix:path=/tmp/bus (a private bus for tests and demos)")
    p.add_argument("--device", default=None,
                   help=f"the stream port (default from the config, else {constants.DEFAULT_DEVICE})")
    p.add_argument("--config", default=None,
                   help="configuration file (TOML; default /etc/spice-streamd.conf if present)")
    # Every other configuration key can be overridden here too (validated by config.load, which
    # names the key, the value and what is allowed).
    for key, spec in KEYS.items():
        if key != "device":
            p.add_argument("--" + key.replace("_", "-"), dest=key, default=None, metavar="VALUE",
                           help=f"overrides '{key}': {spec.allowed}")
    # For tests: how long to wait for polkit before refusing with AuthorityUnavailable.
    p.add_argument("--polkit-timeout", type=float, default=constants.POLKIT_TIMEOUT_S,
                   help=argparse.SUPPRESS)
    return p.parse_args(argv)


class Service:
    def __init__(self, config: Config, bus_spec: str, polkit_timeout: float) -> None:
        self.config = config
        self.bus_spec = bus_spec
        self.polkit_timeout = polkit_timeout
        self._stop = asyncio.Event()
        self._exit_code = 0
        self._interface: StreamingAgentInterface | None = None

    def stop(self, code: int = 0) -> None:
        self._exit_code = self._exit_code or code
        self._stop.set()

    def _changed(self) -> None:
        if self._interface is not None:
            self._interface.refresh()

    async def run(self) -> int:
        # Imported here: these are C2's modules and pull in pyudev; the CLI's --help needs none.
        from .devicewatch import DeviceWatch
        from .loopwatch import LoopWatch
        from .scanouttarget import scanout_target
        from .seat import open_vt_source
        from .sessionexpiry import SessionExpiry
        from .sessioninfo import open_session_source
        from .supervisor import WorkerSupervisor

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

        try:
            bus = await bus_for(self.bus_spec).connect()
        except (OSError, ValueError, EOFError) as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            log.error("cannot connect to the %s bus at %s: %s", self.bus_spec,
                      describe_bus(self.bus_spec), reason)
            return 1
        closers = []
        try:
            watch = LoopWatch(loop)
            watch.start()
            closers.append(("loop watch", watch.close))
            session_source = await open_session_source(bus)
            closers.append(("sessions", session_source.close))
            vt_source = await open_vt_source(bus)
            closers.append(("seat", vt_source.close))
            device = DeviceWatch(self.config.device)
            await device.start()
            closers.append(("device watch", device.close))
            supervisor = WorkerSupervisor(device_path=self.config.device, fps=self.config.fps,
                                          quality=self.config.quality, codecs=self.config.codecs,
                                          on_change=self._changed,
                                          kernel_vt=vt_source.kernel_vt)
            closers.append(("worker", supervisor.close))

            registry = SessionRegistry(max_sessions=self.config.max_sessions,
                                       max_sessions_per_uid=self.config.max_sessions_per_uid)

            fallback = scanout_target(self.config.scanout)
            scanout_kinds = frozenset()
            if self.config.wayland_capture == "scanout":
                if fallback is None:
                    log.warning("wayland_capture = scanout, but the scanout is not used: Wayland "
                                "sessions are streamed by their own worker (screen cast)")
                else:
                    log.info("Wayland sessions are streamed from the display's scanout "
                             "(wayland_capture = scanout)")
                    scanout_kinds = frozenset({"wayland"})
            coordinator = Coordinator(registry, vt_source, device, supervisor, fallback=fallback,
                                      scanout_kinds=scanout_kinds)
            expiry = SessionExpiry(registry, session_source, vt_source)
            expiry.start()
            closers.append(("session expiry", expiry.close))
            self._interface = StreamingAgentInterface(coordinator.properties,
                                                      owners=lambda: owners_of(supervisor))
            coordinator.on_change(self._interface.refresh)
            verifier = RegistrationVerifier(
                authorize=PolkitAuthority(bus, self.polkit_timeout).check, sessions=session_source)
            endpoint = RegistrationEndpoint(bus, verifier, registry)
            bus.export(constants.OBJECT_PATH, self._interface)
            await endpoint.start()
            closers.append(("registrations", endpoint.close))
            reader = PropertyReader(bus, self._interface)
            await reader.start()
            closers.append(("property reads", reader.close))
            coordinator.update()

            if not await self._own_name(bus):
                return 1
            log.info("ready on the %s bus as %s (%s)", self.bus_spec, constants.BUS_NAME,
                     self.config.summary())

            watchers = [
                loop.create_task(self._stop.wait(), name="stop request"),
                loop.create_task(disconnected(bus), name="bus connection"),
                loop.create_task(self._idle_exit(coordinator, endpoint), name="idle exit"),
            ]
            done, pending = await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if watchers[1] in done:
                log.error("lost the bus connection: exiting")
                return 1
            return self._exit_code
        finally:
            for what, close in reversed(closers):
                try:
                    await close()
                except Exception:
                    log.exception("closing the %s failed", what)
            if bus.connected:
                bus.disconnect()

    async def _own_name(self, bus: MessageBus) -> bool:
        try:
            reply = await bus.request_name(constants.BUS_NAME, NameFlag.DO_NOT_QUEUE)
        except DBusError as e:
            log.error("may not own %s on this bus (%s): is the D-Bus policy file installed and "
                      "are we root?", constants.BUS_NAME, e.text)
            return False
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            log.error("%s is already owned by another process: is spice-streamd already "
                      "running?", constants.BUS_NAME)
            return False
        return True

    async def _idle_exit(self, coordinator: Coordinator, endpoint: RegistrationEndpoint) -> None:
        limit = self.config.idle_exit
        if limit <= 0:
            await asyncio.Event().wait()
        idle_since: float | None = None
        while True:
            await asyncio.sleep(IDLE_CHECK_S)
            if coordinator.idle() and endpoint.in_flight == 0:
                now = time.monotonic()
                idle_since = idle_since or now
                if now - idle_since >= limit:
                    log.info("idle for %d s (no session, no device): exiting", limit)
                    return
            else:
                idle_since = None


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in INSTALL_COMMANDS:
        from . import install
        return install.main(args_list)
    args = parse_args(args_list)
    try:
        config = load(args.config, {key: getattr(args, key) for key in KEYS})
    except ConfigError as e:
        print(f"spice-streamd: {e}", file=sys.stderr)
        return 2
    logsetup.setup("spice-streamd", config.log_level.upper(), with_logger=True)
    heap.keep_frame_buffers()
    try:
        return asyncio.run(Service(config, args.bus, args.polkit_timeout).run())
    except KeyboardInterrupt:
        return 0
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
