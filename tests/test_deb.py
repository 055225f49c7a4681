"""packaging/build-deb: the Debian package, built for real and read back with dpkg-deb."""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.test_install import (
    ACTIVATION,
    AUTOSTART,
    CONFIG,
    GREETER,
    POLICY,
    POLKIT,
    parse_udev_rules,
)

REPO = Path(__file__).resolve().parents[1]
BUILD_DEB = REPO / "packaging" / "build-deb"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PROJECT["project"]["version"]
PYDIR = "usr/lib/python3/dist-packages"
PACKAGES = {
    "spice_streamd": REPO / "service" / "spice_streamd",
    "spice_stream_worker": REPO / "service" / "spice_stream_worker",
    "spice_stream_common": REPO / "service" / "spice_stream_common",
    "spice_stream_helper": REPO / "helper" / "spice_stream_helper",
}
SCRIPTS = {"usr/bin/" + name: target for name, target in PROJECT["project"]["scripts"].items()}
# Debian 12 and 13 are /usr-merged: one place for both (see UNITDIR in packaging/build-deb).
UNIT = "usr/lib/systemd/system/spice-streamd.service"
UDEV_RULE = "usr/lib/udev/rules.d/70-spice-streamd.rules"
SYSUSERS = "usr/lib/sysusers.d/spice-streamd.conf"
INTERFACE = "usr/share/dbus-1/interfaces/org.spice_space.StreamingAgent1.xml"
DOC = "usr/share/doc/spice-streamd/"
SYSTEM_FILES = {UNIT, UDEV_RULE, ACTIVATION, POLICY, POLKIT, AUTOSTART, GREETER, CONFIG, INTERFACE,
                SYSUSERS}
CONFFILES = ["/" + CONFIG, "/" + AUTOSTART]
DEPENDS = ["python3 (>= 3.11)", "python3-dbus-next", "python3-pyudev", "python3-xlib", "python3-pil",
           "dbus", "polkitd | policykit-1", "systemd"]
RECOMMENDS = ["python3-gi", "gir1.2-gstreamer-1.0", "gir1.2-gst-plugins-base-1.0",
              "gstreamer1.0-plugins-base", "gstreamer1.0-pipewire"]
# The video codecs' encoders, suggested while MJPEG is the default (issue 18).
SUGGESTS = ["gstreamer1.0-plugins-good", "gstreamer1.0-plugins-ugly"]
MAINTAINER_SCRIPTS = ("postinst", "prerm", "postrm")
INSTALLER_MANIFEST = "usr/share/spice-streamd/installed-files"


def dpkg_deb(*args: str) -> str:
    p = subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    return p.stdout


def perm_bits(mode: str) -> int:
    """'rwxr-xr-x' -> 0o755 (no set-id or sticky bits are expected in this package)."""
    assert re.fullmatch(r"[r-][w-][x-][r-][w-][x-][r-][w-][x-]", mode), f"unexpected mode {mode}"
    return int("".join("1" if c != "-" else "0" for c in mode), 2)


def control_fields(text: str) -> dict[str, str]:
    """A deb822 paragraph: continuation lines are kept, joined with newlines."""
    fields: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if line[:1] in (" ", "\t"):
            fields[key] += "\n" + line
        elif line:
            key, _, value = line.partition(":")
            assert key not in fields, f"{key} twice"
            fields[key] = value.strip()
    return fields


def source_files() -> dict[str, Path]:
    """What the package must carry under dist-packages, and the file in the tree it comes from:
    every module, the config template, and the system files from the top-level dbus/, polkit/
    and helper/ (which data/system/ only links to)."""
    out = {}
    for name, src in PACKAGES.items():
        for p in src.rglob("*.py"):
            if "__pycache__" not in p.parts:
                out[f"{PYDIR}/{name}/{p.relative_to(src)}"] = p
    data = f"{PYDIR}/spice_streamd/data"
    out[f"{data}/spice-streamd.conf"] = PACKAGES["spice_streamd"] / "data" / "spice-streamd.conf"
    for top in ("dbus", "polkit"):
        for f in (REPO / top).iterdir():
            out[f"{data}/system/{top}/{f.name}"] = f
    for f in (REPO / "helper").glob("*.desktop"):
        out[f"{data}/system/helper/{f.name}"] = f
    return out


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    p = subprocess.run([str(BUILD_DEB), "--output", str(out)], capture_output=True, text=True,
                       timeout=300, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    path = Path(p.stdout.splitlines()[-1])
    assert path == out / f"spice-streamd_{VERSION}_all.deb", p.stdout
    assert path.is_file()
    assert [f.name for f in out.iterdir()] == [path.name], "nothing else left in the output"
    return path


@pytest.fixture(scope="module")
def listing(deb: Path) -> dict[str, dict]:
    """dpkg-deb -c: path (no ./, no trailing /) -> type, mode, owner, size."""
    entries = {}
    for line in dpkg_deb("-c", str(deb)).splitlines():
        m = re.fullmatch(r"(\S)(\S{9}) (\S+)/(\S+) +(\d+) \S+ \S+ \./(.*)", line)
        assert m, f"unparsed dpkg-deb -c line {line!r}"
        kind, mode, owner, group, size, name = m.groups()
        entries[name.rstrip("/")] = dict(kind=kind, mode=perm_bits(mode), owner=f"{owner}:{group}",
                                         size=int(size))
    return entries


@pytest.fixture(scope="module")
def tree(deb: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("extracted")
    dpkg_deb("-x", str(deb), str(root))
    return root


@pytest.fixture(scope="module")
def control_dir(deb: Path, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("control") / "DEBIAN"
    dpkg_deb("-e", str(deb), str(d))
    return d


def files(listing: dict[str, dict]) -> set[str]:
    return {name for name, e in listing.items() if e["kind"] == "-"}


def test_control_fields(deb: Path, listing: dict[str, dict]) -> None:
    fields = control_fields(dpkg_deb("-I", str(deb), "control"))
    assert fields["Package"] == "spice-streamd"
    assert fields["Version"] == VERSION
    assert fields["Architecture"] == "all"
    assert fields["Maintainer"] == "spice-streamd developers <spice-streamd@localhost>"
    assert fields["Section"] == "admin" and fields["Priority"] == "optional"
    assert [d.strip() for d in fields["Depends"].split(",")] == DEPENDS
    assert [d.strip() for d in fields["Recommends"].split(",")] == RECOMMENDS
    assert [d.strip() for d in fields["Suggests"].split(",")] == SUGGESTS
    short, *long = fields["Description"].split("\n")
    assert short and len(short) < 80 and "spice" in short.lower()
    assert len(long) >= 2 and all(line.startswith(" ") for line in long)
    # dpkg's own count: each file rounded up to 1 KiB, 1 KiB for each directory.
    expected = sum(-(-e["size"] // 1024) if e["kind"] == "-" else 1
                   for name, e in listing.items() if name)
    assert int(fields["Installed-Size"]) == expected
    assert set(fields) == {"Package", "Version", "Architecture", "Maintainer", "Installed-Size",
                           "Depends", "Recommends", "Suggests", "Section", "Priority",
                           "Description"}


def test_contents_are_exactly_the_expected_files(listing: dict[str, dict]) -> None:
    expected = set(source_files()) | SYSTEM_FILES | set(SCRIPTS) | {DOC + "copyright",
                                                                   DOC + "changelog.Debian.gz"}
    names = files(listing)
    assert not [n for n in listing if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]
    assert INSTALLER_MANIFEST not in names
    assert not [n for n in listing if re.search(r"(^|/)(tests?|conftest\.py|test_[^/]*\.py)$", n)]
    assert sorted(names - expected) == [], "files that should not be in the package"
    assert sorted(expected - names) == [], "files missing from the package"
    # Every directory holds something of ours (no stray empty directories), and nothing but
    # regular files and directories: data/system's symlinks were dereferenced.
    assert {e["kind"] for e in listing.values()} == {"-", "d"}
    for name, e in listing.items():
        if e["kind"] == "d" and name:
            assert any(f.startswith(name + "/") for f in names), f"empty directory {name}"


def test_owner_and_modes(listing: dict[str, dict]) -> None:
    for name, e in listing.items():
        assert e["owner"] == "root:root", name
        want = 0o755 if e["kind"] == "d" or name in SCRIPTS else 0o644
        assert e["mode"] == want, f"{name}: {oct(e['mode'])}"


def test_packaged_modules_and_data_are_the_trees(tree: Path) -> None:
    for member, source in source_files().items():
        assert (tree / member).read_bytes() == source.read_bytes(), member


def test_scripts_start_the_entry_points(tree: Path, listing: dict[str, dict]) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree / PYDIR), PYTHONDONTWRITEBYTECODE="1")
    for rel, target in SCRIPTS.items():
        assert listing[rel]["mode"] == 0o755
        text = (tree / rel).read_text()
        assert text.splitlines()[0] == "#!/usr/bin/python3", rel
        module, func = target.split(":")
        assert f"from {module} import {func}\n" in text and f"sys.exit({func}())" in text, rel
        # The script really reaches main(): its own --help, from the packaged modules.
        p = subprocess.run([sys.executable, str(tree / rel), "--help"], capture_output=True,
                           text=True, env=env, timeout=60, check=False)
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith(f"usage: {Path(rel).name} "), p.stdout


def read_ini(path: Path) -> configparser.ConfigParser:
    c = configparser.ConfigParser(interpolation=None, strict=False)
    c.optionxform = str
    c.read(path)
    return c


def test_system_files_point_at_usr_bin(tree: Path) -> None:
    unit = read_ini(tree / UNIT)
    assert shlex.split(unit["Service"]["ExecStart"]) == ["/usr/bin/spice-streamd"]
    activation = read_ini(tree / ACTIVATION)["D-BUS Service"]
    assert activation["Exec"] == "/usr/bin/spice-streamd"
    assert activation["SystemdService"] == "spice-streamd.service"
    for rel in (AUTOSTART, GREETER):
        entry = read_ini(tree / rel)["Desktop Entry"]
        assert entry["Exec"] == entry["TryExec"] == "/usr/bin/spice-stream-helper", rel
    for rel in SYSTEM_FILES:
        assert "@BINDIR@" not in (tree / rel).read_text(), rel
    for rel, source in ((POLICY, "dbus/org.spice_space.StreamingAgent1.conf"),
                        (POLKIT, "polkit/org.spice_space.streaming-agent.policy"),
                        (UDEV_RULE, "dbus/70-spice-streamd.rules"),
                        (SYSUSERS, "dbus/spice-streamd.sysusers"),
                        (INTERFACE, "dbus/org.spice_space.StreamingAgent1.xml"),
                        (CONFIG, "service/spice_streamd/data/spice-streamd.conf")):
        assert (tree / rel).read_bytes() == (REPO / source).read_bytes(), rel
    assert ("ENV", "SYSTEMD_WANTS", "=", "spice-streamd.service") in set(
        parse_udev_rules((tree / UDEV_RULE).read_text())[0])
    copyright_text = (tree / DOC / "copyright").read_text()
    assert "Copyright: 2026 the spice-streamd developers" in copyright_text
    assert "Permission is hereby granted, free of charge" in copyright_text


def test_conffiles_are_exactly_the_etc_files(deb: Path, listing: dict[str, dict]) -> None:
    conffiles = dpkg_deb("-I", str(deb), "conffiles").splitlines()
    assert conffiles == CONFFILES
    assert sorted("/" + n for n in files(listing) if n.startswith("etc/")) == sorted(CONFFILES)


def test_md5sums_cover_every_other_file(control_dir: Path, tree: Path,
                                        listing: dict[str, dict]) -> None:
    sums = {}
    for line in (control_dir / "md5sums").read_text().splitlines():
        digest, path = line.split("  ", 1)
        sums[path] = digest
    assert set(sums) == {n for n in files(listing) if "/" + n not in CONFFILES}
    for path, digest in sums.items():
        assert hashlib.md5((tree / path).read_bytes()).hexdigest() == digest, path


def test_maintainer_scripts_are_posix_sh(control_dir: Path) -> None:
    assert sorted(p.name for p in control_dir.iterdir()) == sorted(
        ["control", "conffiles", "md5sums", *MAINTAINER_SCRIPTS])
    for name in MAINTAINER_SCRIPTS:
        script = control_dir / name
        assert os.stat(script).st_mode & 0o777 == 0o755, name
        lines = script.read_text().splitlines()
        assert lines[0] == "#!/bin/sh" and "set -e" in lines, name
        for shell in ("sh", "dash", "bash"):  # bash: also catches what dash would accept
            exe = shutil.which(shell)
            if exe:
                p = subprocess.run([exe, "-n", str(script)], capture_output=True, text=True,
                                   check=False)
                assert p.returncode == 0, f"{shell} -n {name}: {p.stderr}"


def test_packaged_tree_imports_and_installs_its_system_files(tree: Path, tmp_path: Path) -> None:
    """The project interpreter (it has the dependencies), but every one of our modules must come
    from the extracted package: the checkout's editable install would otherwise hide a module
    missing from the package."""
    pydir = tree / PYDIR
    # No pkg-config answers here: the installer's own /usr/lib defaults, as in the package.
    env = dict(os.environ, PYTHONPATH=str(pydir), PYTHONDONTWRITEBYTECODE="1",
               PKG_CONFIG_LIBDIR=str(tmp_path), PKG_CONFIG_PATH="")
    code = ("import sys, spice_streamd.main, spice_stream_worker.main, spice_stream_helper.main\n"
            "ours = {n: m.__file__ for n, m in sys.modules.items()\n"
            "        if n.split('.')[0] in ('spice_streamd', 'spice_stream_worker', "
            "'spice_stream_common', 'spice_stream_helper')}\n"
            "print('\\n'.join(sorted(ours.values())))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    loaded = p.stdout.split()
    assert len(loaded) >= 10
    assert [f for f in loaded if not f.startswith(str(pydir) + "/")] == []

    # install-system-files from the package (importlib.resources on the dereferenced data) puts
    # exactly the files the package carries.
    dest = tmp_path / "root"
    (dest / "usr/bin").mkdir(parents=True)
    for rel in SCRIPTS:
        shutil.copy2(tree / rel, dest / rel)
    p = subprocess.run([sys.executable, "-m", "spice_streamd.install", "install-system-files",
                        "--destdir", str(dest), "--bindir", "/usr/bin"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
                       check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (dest / INSTALLER_MANIFEST).is_file()
    (dest / INSTALLER_MANIFEST).unlink()
    installed = {str(f.relative_to(dest)) for f in dest.rglob("*") if f.is_file()}
    assert installed == SYSTEM_FILES | set(SCRIPTS)
    for rel in SYSTEM_FILES:
        assert (dest / rel).read_bytes() == (tree / rel).read_bytes(), rel


def test_packaged_tree_imports_with_debian_python(tree: Path, tmp_path: Path) -> None:
    """The same with /usr/bin/python3, the interpreter the scripts name, and Debian's libraries
    (python3-dbus-next, -pyudev, -xlib, -pil), when this machine has them."""
    python = "/usr/bin/python3"
    deps = "import dbus_next, pyudev, Xlib, PIL"
    if not os.access(python, os.X_OK) or subprocess.run(
            [python, "-c", deps], capture_output=True, check=False).returncode != 0:
        pytest.skip("/usr/bin/python3 lacks the Debian dependencies: apt-get install "
                    "python3-dbus-next python3-pyudev python3-xlib python3-pil")
    env = dict(os.environ, PYTHONPATH=str(tree / PYDIR), PYTHONDONTWRITEBYTECODE="1")
    p = subprocess.run([python, "-c", "import spice_streamd.main, spice_stream_worker.main, "
                        "spice_stream_helper.main; print(spice_streamd.main.__file__)"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
                       check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(tree / PYDIR / "spice_streamd" / "main.py")

    # Debian's Pillow (9.4 in Debian 12) lacks restart markers and memoryview input: the
    # packaged encoder must still make a JPEG of a captured frame (a memoryview, as capture gives),
    # and a frame changed in part is spliced from bands (markers put in by the encoder: DRI), its
    # pixels those of a whole encode.
    encode = (
        "import io, PIL\n"
        "from PIL import Image\n"
        "from spice_stream_worker.sources.x11 import Frame, Rect\n"
        "from spice_stream_worker.encoder import JpegEncoder\n"
        "w, h = 64, 48\n"
        "buf = bytearray(bytes([10, 200, 30, 0]) * (w * h))\n"
        "enc = JpegEncoder()\n"
        "first = enc.encode(Frame(w, h, w * 4, memoryview(buf)))\n"
        "buf[:4 * w * 8] = bytes([250, 0, 0, 0]) * (w * 8)\n"
        "second = enc.encode(Frame(w, h, w * 4, memoryview(buf)), [Rect(0, 0, w, 8)])\n"
        "img = Image.open(io.BytesIO(second)).convert('RGB')\n"
        "whole = Image.open(io.BytesIO(JpegEncoder().encode(Frame(w, h, w * 4, memoryview(buf)))))\n"
        "assert img.tobytes() == whole.convert('RGB').tobytes()\n"
        "assert b'\\xff\\xdd' in second\n"
        "import json\n"
        "print(PIL.__version__, json.dumps([img.size, img.getpixel((5, 2)), img.getpixel((5, 40))]))\n"
    )
    p = subprocess.run([python, "-c", encode], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    version, rest = p.stdout.split(" ", 1)
    size, top, bottom = json.loads(rest)
    assert size == [64, 48]
    assert top[2] > 200 and top[0] < 40, top  # BGRX 250,0,0 is blue
    assert bottom[1] > 170 and bottom[0] < 60, bottom  # BGRX 10,200,30 is (30, 200, 10)


# --- maintainer scripts, run: stand-ins for every command with a side effect, in a private mount
# and PID namespace (so systemd-detect-virt and ischroot can see PID 1's root, as on a real system)
# whose /run says whether systemd, udevd and the system bus are running. In a chroot run the scripts
# run chrooted into a minimal root (this machine's /usr, read-only) with /proc, /sys, /dev and that
# /run bind-mounted, as image builders do: its udev and bus sockets are the "host's".

STUBS = ("systemctl", "udevadm", "dbus-send", "py3compile", "py3clean")
STREAM_PORT_TRIGGER = ("udevadm trigger --action=add --subsystem-match=virtio-ports "
                       "--attr-match=name=org.spice-space.stream.0")


def run_script(control_dir: Path, tmp_path: Path, script: str, arg: str, *, running: bool,
               dpkg_root: Path | None = None, chroot: bool = False,
               proc: bool = True) -> tuple[int, list[str], str]:
    top = tmp_path / "chroot" if chroot else Path("/")
    if chroot and not top.exists():
        for d in ("usr", "proc", "sys", "dev", "run", "tmp", "stubs", "scripts"):
            (top / d).mkdir(parents=True)
        for link in ("bin", "sbin", "lib", "lib64"):
            if os.path.islink("/" + link):
                (top / link).symlink_to(os.readlink("/" + link))
    stubs = top / "stubs" if chroot else tmp_path / "stubs"
    log = top / "calls.log" if chroot else tmp_path / "calls.log"
    seen_log = "/calls.log" if chroot else str(log)  # the path the stubs write, where they run
    stubs.mkdir(exist_ok=True)
    for name in STUBS:
        (stubs / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{seen_log}"\n')
        (stubs / name).chmod(0o755)
    log.write_text("")
    script_path = control_dir / script
    if chroot:
        shutil.copy(control_dir / script, top / "scripts" / script)
        script_path = Path("/scripts") / script
    make_sockets = (f"{shlex.quote(sys.executable)} -c 'import socket\n"
                    "for p in (\"/run/udev/control\", \"/run/dbus/system_bus_socket\"):\n"
                    "    socket.socket(socket.AF_UNIX).bind(p)'")
    setup = ["mount -t tmpfs tmpfs /run"]
    if running:
        setup += ["mkdir -p /run/systemd/system /run/udev /run/dbus", make_sockets]
    # Our package's directories on this machine are out of reach too.
    pydir = f"{top}/{PYDIR}".replace("//", "/")
    setup.append(f"{{ [ ! -d /{PYDIR} ] || mount -t tmpfs tmpfs {shlex.quote(pydir)}; }}"
                 if not chroot else "true")
    if chroot:
        r = shlex.quote(str(top))
        setup += [f"mount --bind -o ro /usr {r}/usr",
                  f"{{ [ ! -d /{PYDIR} ] || mount -t tmpfs tmpfs {r}/{PYDIR}; }}",
                  f"mount --rbind /sys {r}/sys", f"mount --rbind /dev {r}/dev",
                  f"mount --bind /run {r}/run"]
        if proc:
            setup.append(f"mount --bind /proc {r}/proc")
        # Not exec: PID 1 of the namespace stays outside the chroot, as init does on a real host.
        setup.append(f"{{ chroot {r} /bin/sh {script_path} {shlex.quote(arg)}; rc=$?; }}; exit $rc")
    else:
        setup.append(f"exec sh {shlex.quote(str(script_path))} {shlex.quote(arg)}")
    env = {"PATH": f"{'/stubs' if chroot else stubs}:/usr/sbin:/usr/bin:/sbin:/bin"}
    if dpkg_root is not None:
        env["DPKG_ROOT"] = str(dpkg_root)
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
                        "--mount-proc", "sh", "-c", " && ".join(setup)],
                       capture_output=True, text=True, env=env, timeout=60, check=False)
    return p.returncode, log.read_text().splitlines(), p.stderr


@pytest.fixture
def can_unshare() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None or subprocess.run(
            ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "true"],
            capture_output=True, check=False).returncode != 0:
        pytest.skip("needs root and unshare(1) for private mount and PID namespaces")


def test_maintainer_scripts_on_a_running_system(control_dir: Path, tmp_path: Path,
                                                can_unshare) -> None:
    reload_bus = ("dbus-send --system --type=method_call --dest=org.freedesktop.DBus / "
                  "org.freedesktop.DBus.ReloadConfig")
    rc, calls, err = run_script(control_dir, tmp_path, "postinst", "configure", running=True)
    assert rc == 0, err
    # The only device re-announced is the stream port: qemu-ga's and vdagent's ports are not ours.
    assert calls == ["py3compile -p spice-streamd", "systemctl --system daemon-reload",
                     "udevadm control --reload", STREAM_PORT_TRIGGER, reload_bus]
    for arg in ("remove", "upgrade", "deconfigure"):
        rc, calls, err = run_script(control_dir, tmp_path, "prerm", arg, running=True)
        assert rc == 0, err
        assert calls == ["systemctl --quiet is-active spice-streamd.service",
                         "systemctl stop spice-streamd.service", "py3clean -p spice-streamd"], arg
    rc, calls, err = run_script(control_dir, tmp_path, "postrm", "remove", running=True)
    assert rc == 0, err
    # A helper may have activated the service again between prerm and the files' removal.
    assert calls == ["systemctl --system daemon-reload", "udevadm control --reload", reload_bus,
                     "systemctl stop spice-streamd.service",
                     "systemctl reset-failed spice-streamd.service"]


def test_trigger_matches_what_the_udev_rule_matches() -> None:
    """The trigger names the port by the attribute the rule starts the service on."""
    rule = parse_udev_rules((REPO / "dbus" / "70-spice-streamd.rules").read_text())
    (pairs,) = rule
    matches = {(key, attr): value for key, attr, op, value in pairs if op == "=="}
    assert matches[("SUBSYSTEM", None)] == "virtio-ports"
    assert STREAM_PORT_TRIGGER.endswith(f"--attr-match=name={matches[('ATTR', 'name')]}")


@pytest.mark.parametrize("proc", [True, False], ids=["with /proc", "without /proc"])
def test_maintainer_scripts_in_a_chroot_leave_the_host_alone(control_dir: Path, tmp_path: Path,
                                                             can_unshare, proc: bool) -> None:
    """An image builder's chroot with the host's /run and /sys bind-mounted: systemd, udevd and the
    bus look running, and they are the host's. Only files are installed (byte code compiled and
    cleaned); nothing is reloaded, triggered or stopped. Without /proc a chroot cannot be ruled out:
    the same."""
    rc, calls, err = run_script(control_dir, tmp_path, "postinst", "configure", running=True,
                                chroot=True, proc=proc)
    assert rc == 0, err
    assert calls == ["py3compile -p spice-streamd"]
    for arg in ("remove", "upgrade", "deconfigure"):
        rc, calls, err = run_script(control_dir, tmp_path, "prerm", arg, running=True,
                                    chroot=True, proc=proc)
        assert rc == 0, err
        assert calls == ["py3clean -p spice-streamd"], arg
    for arg in ("remove", "purge"):
        rc, calls, err = run_script(control_dir, tmp_path, "postrm", arg, running=True,
                                    chroot=True, proc=proc)
        assert rc == 0, err
        assert calls == [], arg


def test_maintainer_scripts_with_nothing_running_call_no_service(control_dir: Path,
                                                                 tmp_path: Path,
                                                                 can_unshare) -> None:
    """No systemd, udevd or bus running (a container without them): success, no calls but the
    byte-compilation; and an unknown action is an error."""
    rc, calls, err = run_script(control_dir, tmp_path, "postinst", "configure", running=False)
    assert rc == 0, err
    assert calls == ["py3compile -p spice-streamd"]
    rc, calls, err = run_script(control_dir, tmp_path, "prerm", "remove", running=False)
    assert rc == 0 and calls == ["py3clean -p spice-streamd"], err
    for arg in ("remove", "purge"):
        rc, calls, err = run_script(control_dir, tmp_path, "postrm", arg, running=False,
                                    dpkg_root=None if arg == "remove" else tmp_path / "none")
        assert rc == 0 and calls == [], err
    for script in MAINTAINER_SCRIPTS:
        rc, calls, err = run_script(control_dir, tmp_path, script, "frobnicate", running=False)
        assert rc != 0 and "unknown argument" in err and calls == [], script


def test_postrm_purge_leaves_nothing_of_ours(control_dir: Path, tmp_path: Path,
                                             can_unshare) -> None:
    """DPKG_ROOT: dpkg acting on another root. Byte code, conffile leftovers and a hand-run
    installer's manifest go; the system's services are not touched."""
    root = tmp_path / "target"
    ours = {
        f"{PYDIR}/spice_streamd/__pycache__/main.cpython-311.pyc",
        f"{PYDIR}/spice_streamd/data/system/__pycache__/x.cpython-313.pyc",
        f"{PYDIR}/spice_stream_helper/__pycache__/main.cpython-311.pyc",
        "etc/spice-streamd.conf.dpkg-old",
        "etc/xdg/autostart/spice-stream-helper.desktop.dpkg-dist",
        INSTALLER_MANIFEST,
    }
    others = {f"{PYDIR}/other/__pycache__/other.cpython-311.pyc", "etc/xdg/autostart/other.desktop",
              "etc/other.conf.dpkg-old"}
    for rel in ours | others:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    rc, calls, err = run_script(control_dir, tmp_path, "postrm", "purge", running=True,
                                dpkg_root=root)
    assert rc == 0, err
    assert calls == []
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert left == sorted(others)
    for gone in ("spice_streamd", "spice_stream_helper"):
        assert not (root / PYDIR / gone).exists()
    assert not (root / INSTALLER_MANIFEST).parent.exists()

