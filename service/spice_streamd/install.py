"""install-system-files / uninstall-system-files: put the packaged system files where the OS looks."""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources

from spice_stream_common import constants

SCRIPTS = ("spice-streamd", "spice-stream-worker", "spice-stream-helper")
BINDIR_PLACEHOLDER = "@BINDIR@"
UDEV_RULE = "70-spice-streamd.rules"
HELPER_DESKTOP = "spice-stream-helper.desktop"
GREETER_DESKTOP = "spice-stream-helper-greeter.desktop"
CONFIG_NAME = "spice-streamd.conf"
DPKG_LIST = "/var/lib/dpkg/info/spice-streamd.list"
MANIFEST_HEADER = "# spice-streamd install-system-files manifest: what uninstall-system-files removes."
# System files are a few KiB; an existing file larger than this is not one of ours.
MAX_COMPARE_BYTES = 1024 * 1024

# An Exec line naming one of our scripts gets the installed script's path, whatever path the
# source file shows (systemd's ExecStart prefixes -@:+! are kept).
_EXEC_LINE = re.compile(
    r"(?m)^((?:Exec[A-Za-z]*|TryExec)=[-@:+!]*)(?:\S*/)?("
    + "|".join(re.escape(s) for s in SCRIPTS)
    + r")(?=\s|$)"
)


class InstallError(Exception):
    """Installing or uninstalling cannot go on; the text says what to fix."""


@dataclass(frozen=True)
class Layout:
    """Target directories, as the running system sees them (without --destdir)."""

    prefix: str
    sysconfdir: str
    unitdir: str
    udevrulesdir: str
    sysusersdir: str = ""

    @property
    def manifest(self) -> str:
        return os.path.join(self.prefix, "share", "spice-streamd", "installed-files")


@dataclass(frozen=True)
class Item:
    """One packaged file and where it goes."""

    source: str  # path under spice_streamd/data
    target_dir: Callable[[Layout], str]
    name: str
    required: bool = True
    # The administrator's file: put in place only if absent, never overwritten, not an error to keep.
    admin_owned: bool = False


def _share(*parts: str) -> Callable[[Layout], str]:
    return lambda layout: os.path.join(layout.prefix, "share", *parts)


ITEMS: tuple[Item, ...] = (
    Item("system/dbus/" + constants.POLICY_FILE, _share("dbus-1", "system.d"),
         constants.POLICY_FILE),
    Item("system/dbus/" + constants.ACTIVATION_FILE, _share("dbus-1", "system-services"),
         constants.ACTIVATION_FILE),
    Item("system/dbus/" + constants.INTROSPECTION_FILE, _share("dbus-1", "interfaces"),
         constants.INTROSPECTION_FILE, required=False),
    Item("system/dbus/" + constants.SYSTEMD_UNIT, lambda lo: lo.unitdir, constants.SYSTEMD_UNIT),
    Item("system/dbus/" + UDEV_RULE, lambda lo: lo.udevrulesdir, UDEV_RULE),
    Item("system/polkit/" + constants.POLKIT_FILE, _share("polkit-1", "actions"),
         constants.POLKIT_FILE),
    Item("system/helper/" + HELPER_DESKTOP,
         lambda lo: os.path.join(lo.sysconfdir, "xdg", "autostart"), HELPER_DESKTOP),
    Item("system/helper/" + GREETER_DESKTOP, _share("gdm", "greeter", "autostart"),
         HELPER_DESKTOP),
    Item(CONFIG_NAME, lambda lo: lo.sysconfdir, CONFIG_NAME, admin_owned=True),
    Item("system/dbus/spice-streamd.sysusers", lambda lo: lo.sysusersdir,
         constants.SYSUSERS_FILE),
)


def _pkgconfig(package: str, variable: str) -> str | None:
    try:
        out = subprocess.run(
            ["pkg-config", f"--variable={variable}", package],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    value = out.stdout.strip()
    return value if out.returncode == 0 and value.startswith("/") else None


def layout_for(prefix: str, sysconfdir: str = "/etc") -> Layout:
    """Where each kind of file goes for `prefix`; for /usr the OS's own answer (pkg-config) wins."""
    prefix = os.path.normpath(prefix)
    unitdir = os.path.join(prefix, "lib", "systemd", "system")
    udevrules = os.path.join(prefix, "lib", "udev", "rules.d")
    sysusers = os.path.join(prefix, "lib", "sysusers.d")
    if prefix == "/usr":
        unitdir = _pkgconfig("systemd", "systemdsystemunitdir") or unitdir
        sysusers = _pkgconfig("systemd", "sysusersdir") or sysusers
        udevdir = _pkgconfig("udev", "udevdir")
        if udevdir:
            udevrules = os.path.join(udevdir, "rules.d")
    return Layout(prefix, os.path.normpath(sysconfdir), unitdir, udevrules, sysusers)


def _under(destdir: str, path: str) -> str:
    return os.path.join(destdir, path.lstrip("/")) if destdir else path


def _has_scripts(directory: str) -> bool:
    return all(os.access(os.path.join(directory, s), os.X_OK) for s in SCRIPTS)


def find_bindir(destdir: str = "", explicit: str | None = None) -> str:
    """Directory of the installed console scripts, as the running system will see it: the
    directory this command was started from, else the running interpreter's scripts directory,
    else PATH. A directory inside --destdir loses that prefix (distribution packaging)."""
    if explicit is not None:
        if not os.path.isabs(explicit):
            raise InstallError(f"--bindir {explicit!r} is not an absolute path")
        if not (_has_scripts(explicit) or _has_scripts(_under(destdir, explicit))):
            raise InstallError(f"--bindir {explicit}: the scripts {', '.join(SCRIPTS)} are not there")
        return os.path.normpath(explicit)
    candidates = []
    if os.path.basename(sys.argv[0]) == "spice-streamd":
        candidates.append(os.path.dirname(os.path.abspath(sys.argv[0])))
    candidates.append(sysconfig.get_path("scripts"))
    found = shutil.which("spice-streamd")
    if found:
        candidates.append(os.path.dirname(os.path.abspath(found)))
    for directory in candidates:
        if directory and _has_scripts(directory):
            directory = os.path.normpath(directory)
            root = os.path.normpath(destdir) if destdir else ""
            if root and root != "/" and directory.startswith(root + "/"):
                directory = directory[len(root):]
            return directory
    raise InstallError(
        f"cannot find the installed scripts {', '.join(SCRIPTS)} (looked in "
        f"{', '.join(c for c in candidates if c)}); give --bindir"
    )


def render(text: str, bindir: str) -> str:
    """The file's text with every path to our scripts pointing into `bindir`."""
    text = text.replace(BINDIR_PLACEHOLDER, bindir)
    return _EXEC_LINE.sub(lambda m: m.group(1) + os.path.join(bindir, m.group(2)), text)


def _source_bytes(item: Item) -> bytes | None:
    node = resources.files("spice_streamd").joinpath("data", *item.source.split("/"))
    try:
        return node.read_bytes()
    except FileNotFoundError:
        if item.required:
            raise InstallError(
                f"packaged system file data/{item.source} is missing from the spice_streamd "
                "package: reinstall spice-streamd"
            ) from None
        return None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Manifest:
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256 of what we wrote
    dirs: set[str] = field(default_factory=set)  # directories we created

    def text(self) -> str:
        lines = [MANIFEST_HEADER]
        lines += [f"dir {d}" for d in sorted(self.dirs)]
        lines += [f"file {h} {p}" for p, h in sorted(self.files.items())]
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str, where: str) -> Manifest:
        m = cls()
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            kind, _, rest = line.partition(" ")
            if kind == "dir":
                path, digest = rest, None
            elif kind == "file":
                digest, _, path = rest.partition(" ")
            else:
                raise InstallError(f"{where}:{n}: unreadable manifest line {line[:80]!r}")
            if not path.startswith("/") or os.path.normpath(path) != path or path == "/":
                raise InstallError(f"{where}:{n}: manifest path {path[:80]!r} is not a clean path")
            if digest is None:
                m.dirs.add(path)
            elif re.fullmatch(r"[0-9a-f]{64}", digest):
                m.files[path] = digest
            else:
                raise InstallError(f"{where}:{n}: manifest line has no valid sha256")
        return m


def _read_existing(path: str) -> tuple[str, bytes | None]:
    """('absent'|'file'|'other', content) without following a symlink at `path`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return "absent", None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "other", None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_COMPARE_BYTES:
            return "other", None
        return "file", f.read(MAX_COMPARE_BYTES + 1)


def _read_manifest(path: str) -> Manifest | None:
    kind, data = _read_existing(path)
    if kind == "absent":
        return None
    if kind != "file" or data is None:
        raise InstallError(f"{path}: manifest is not a regular file")
    try:
        return Manifest.parse(data.decode("utf-8"), path)
    except UnicodeDecodeError:
        raise InstallError(f"{path}: manifest is not UTF-8 text") from None


def _write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    directory, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _make_dirs(destdir: str, path: str, created: set[str]) -> None:
    """Create `path` (a target path) under destdir, remembering each directory we made."""
    current = "/"
    for part in path.strip("/").split("/"):
        current = os.path.join(current, part)
        real = _under(destdir, current)
        if os.path.isdir(real):
            continue
        if os.path.lexists(real):
            raise InstallError(f"{real} exists and is not a directory")
        os.mkdir(real, 0o755)
        os.chmod(real, 0o755)  # whatever the umask
        created.add(current)


@dataclass
class Report:
    """What happened, one line per file; `problems` counts what needs a person's attention."""

    lines: list[str] = field(default_factory=list)
    problems: int = 0

    def say(self, text: str, problem: bool = False) -> None:
        self.lines.append(text)
        if problem:
            self.problems += 1


def install(
    prefix: str = "/usr",
    destdir: str = "",
    *,
    sysconfdir: str = "/etc",
    bindir: str | None = None,
    force: bool = False,
) -> Report:
    """Install every system file (idempotent). A file changed since we installed it, or one we
    never installed, is kept and reported (overwritten with force=True, except the config file)."""
    layout = layout_for(prefix, sysconfdir)
    scripts = find_bindir(destdir, bindir)
    if destdir:
        os.makedirs(destdir, exist_ok=True)
    report = Report()
    manifest_real = _under(destdir, layout.manifest)
    old = _read_manifest(manifest_real) or Manifest()
    new = Manifest(dirs=set(old.dirs))
    planned = []
    for item in ITEMS:
        source = _source_bytes(item)
        if source is None:
            continue
        try:
            content = render(source.decode("utf-8"), scripts).encode("utf-8")
        except UnicodeDecodeError:
            raise InstallError(f"packaged system file data/{item.source} is not UTF-8") from None
        planned.append((item, os.path.join(item.target_dir(layout), item.name), content))

    for item, target, content in planned:
        real = _under(destdir, target)
        _make_dirs(destdir, os.path.dirname(target), new.dirs)
        kind, existing = _read_existing(real)
        ours = old.files.get(target)
        if kind == "file" and existing == content:
            new.files[target] = _digest(content)
            report.say(f"unchanged {real}")
            continue
        if kind == "absent" or (
            kind == "file" and existing is not None and ours == _digest(existing)
        ):
            _write_atomic(real, content)
            new.files[target] = _digest(content)
            report.say(f"installed {real}")
            continue
        if item.admin_owned:
            if ours is not None:
                new.files[target] = ours  # uninstall will see it modified and leave it
            report.say(f"kept {real}: the administrator's file (never overwritten)")
            continue
        if force and kind == "file":
            _write_atomic(real, content)
            new.files[target] = _digest(content)
            report.say(f"overwrote {real} (--force)")
            continue
        what = "not a regular file" if kind == "other" else (
            "changed since spice-streamd installed it" if ours else "not installed by spice-streamd"
        )
        if ours is not None:
            new.files[target] = ours
        report.say(f"kept {real}: {what}; move it away or use --force", problem=True)

    _make_dirs(destdir, os.path.dirname(layout.manifest), new.dirs)
    text = new.text().encode("utf-8")
    if _read_existing(manifest_real) != ("file", text):
        _write_atomic(manifest_real, text)
    if layout.prefix != "/usr":
        report.say(
            f"note: with prefix {layout.prefix}, D-Bus reads policies only from "
            "/usr/share/dbus-1/system.d and /etc/dbus-1/system.d, and polkit reads actions only "
            "from /usr/share/polkit-1/actions"
        )
    if not destdir:
        _create_system_user(os.path.join(layout.sysusersdir, constants.SYSUSERS_FILE), report)
        report.say("next: systemctl daemon-reload; udevadm control --reload")
    return report


def _create_system_user(path: str, report: Report) -> None:
    """The scanout reader's system user, from our sysusers.d file (as a package's postinst does)."""
    if os.geteuid() != 0:
        report.say(f"note: not root: run `systemd-sysusers {path}` to create the scanout reader's "
                   f"user {constants.SCANOUT_USER}")
        return
    try:
        res = subprocess.run(["systemd-sysusers", path], capture_output=True, text=True,
                             timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        report.say(f"could not run systemd-sysusers {path}: {exc}; the display's scanout is not "
                   f"streamed without the user {constants.SCANOUT_USER}", problem=True)
        return
    if res.returncode != 0:
        report.say(f"systemd-sysusers {path} failed: {res.stderr.strip()}", problem=True)
    else:
        report.say(f"system user {constants.SCANOUT_USER}: present (systemd-sysusers)")


def uninstall(prefix: str = "/usr", destdir: str = "", *, sysconfdir: str = "/etc") -> Report:
    """Remove exactly what the manifest lists, only files still as we wrote them, then the
    directories we created if they are empty."""
    layout = layout_for(prefix, sysconfdir)
    manifest_real = _under(destdir, layout.manifest)
    report = Report()
    manifest = _read_manifest(manifest_real)
    if manifest is None:
        report.say(f"nothing to uninstall: no manifest at {manifest_real}")
        return report
    config_targets = {os.path.join(i.target_dir(layout), i.name) for i in ITEMS if i.admin_owned}
    for target, digest in sorted(manifest.files.items()):
        real = _under(destdir, target)
        kind, existing = _read_existing(real)
        if kind == "absent":
            report.say(f"already gone {real}")
        elif kind == "file" and existing is not None and _digest(existing) == digest:
            os.unlink(real)
            report.say(f"removed {real}")
        else:
            reason = "not a regular file" if kind == "other" else "changed since it was installed"
            report.say(f"left {real}: {reason}", problem=target not in config_targets)
    os.unlink(manifest_real)
    report.say(f"removed {manifest_real}")
    for directory in sorted(manifest.dirs, key=lambda d: d.count("/"), reverse=True):
        real = _under(destdir, directory)
        try:
            os.rmdir(real)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    return report


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"spice-streamd {command}",
        description=(
            "Install the D-Bus policy and activation file, the systemd unit, the polkit action, "
            "the udev rule, the autostart entries and the example /etc/spice-streamd.conf."
            if command == "install-system-files"
            else "Remove what install-system-files installed (files changed since are left)."
        ),
    )
    p.add_argument("--prefix", default="/usr", help="installation prefix (default /usr)")
    p.add_argument("--destdir", default="", help="stage the tree under this directory (packaging)")
    p.add_argument("--sysconfdir", default="/etc", help="configuration directory (default /etc)")
    if command == "install-system-files":
        p.add_argument("--bindir", default=None,
                       help="where the console scripts are (default: found automatically)")
        p.add_argument("--force", action="store_true",
                       help="overwrite system files changed by someone else (never the config)")
    return p


def main(argv: Sequence[str]) -> int:
    """Entry point: argv[0] is install-system-files or uninstall-system-files, options follow.
    Exit 0 when done, 1 when something needs attention (told on stderr), 2 for bad usage."""
    commands = ("install-system-files", "uninstall-system-files")
    if not argv or argv[0] not in commands:
        print(f"spice-streamd: expected one of {', '.join(commands)}", file=sys.stderr)
        return 2
    command = argv[0]
    try:
        args = _parser(command).parse_args(list(argv[1:]))
    except SystemExit as e:
        return int(e.code or 0)
    destdir = os.path.abspath(args.destdir) if args.destdir else ""
    if not destdir and os.path.exists(DPKG_LIST):
        # dpkg owns these files: removing or rewriting them behind its back breaks the package.
        print(f"spice-streamd {command}: the spice-streamd Debian package is installed and owns "
              "the system files: use apt (apt install --reinstall / apt purge spice-streamd)",
              file=sys.stderr)
        return 1
    if not destdir and os.geteuid() != 0:
        print(f"spice-streamd {command}: needs root: it changes system directories under "
              f"{args.prefix} and {args.sysconfdir} (run it with sudo, or stage the files with "
              "--destdir)", file=sys.stderr)
        return 1
    try:
        if command == "install-system-files":
            report = install(args.prefix, destdir, sysconfdir=args.sysconfdir,
                             bindir=args.bindir, force=args.force)
        else:
            report = uninstall(args.prefix, destdir, sysconfdir=args.sysconfdir)
    except InstallError as e:
        print(f"spice-streamd {command}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = os.path.dirname(e.filename) if isinstance(e.filename, str) else ""
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            print(f"spice-streamd {command}: cannot write in {where or 'a system directory'}: "
                  f"{e.strerror} (run it as root)", file=sys.stderr)
        else:
            print(f"spice-streamd {command}: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 1
    for line in report.lines:
        print(line)
    if report.problems:
        print(f"spice-streamd {command}: {report.problems} file(s) need attention (see above)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
