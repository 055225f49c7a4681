"""install-system-files / uninstall-system-files, the system files they carry, and the wheel."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from spice_stream_common import constants
from spice_streamd import install

REPO = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = sysconfig.get_path("scripts")
MANIFEST = "usr/share/spice-streamd/installed-files"


def unit_dir_for_usr() -> str:
    out = subprocess.run(["pkg-config", "--variable=systemdsystemunitdir", "systemd"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or "/usr/lib/systemd/system"


UNIT = unit_dir_for_usr().lstrip("/") + "/spice-streamd.service"
ACTIVATION = "usr/share/dbus-1/system-services/" + constants.ACTIVATION_FILE
POLICY = "usr/share/dbus-1/system.d/" + constants.POLICY_FILE
POLKIT = "usr/share/polkit-1/actions/" + constants.POLKIT_FILE
AUTOSTART = "etc/xdg/autostart/spice-stream-helper.desktop"
GREETER = "usr/share/gdm/greeter/autostart/spice-stream-helper.desktop"
CONFIG = "etc/spice-streamd.conf"


def run(*args: str, destdir: Path | None = None) -> tuple[int, str, str]:
    """The command in a real process, as an administrator runs it."""
    argv = [sys.executable, "-m", "spice_streamd.install", *args]
    if destdir is not None:
        argv += ["--destdir", str(destdir)]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    return p.returncode, p.stdout, p.stderr


def tree(root: Path) -> dict[str, tuple]:
    """Every path under root with its type, mode, content and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                             data, st.st_mtime_ns)
    return out


def test_install_puts_every_file_where_the_os_looks(tmp_path: Path) -> None:
    rc, out, err = run("install-system-files", destdir=tmp_path)
    assert rc == 0, err
    for rel in (UNIT, ACTIVATION, POLICY, POLKIT, AUTOSTART, GREETER, CONFIG,
                "usr/lib/udev/rules.d/70-spice-streamd.rules", MANIFEST):
        p = tmp_path / rel
        assert p.is_file(), f"{rel} missing; output:\n{out}"
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert (tmp_path / POLICY).read_bytes() == (REPO / "dbus" / constants.POLICY_FILE).read_bytes()
    assert (tmp_path / POLKIT).read_bytes() == (REPO / "polkit" / constants.POLKIT_FILE).read_bytes()
    assert (tmp_path / CONFIG).read_bytes() == (
        REPO / "service/spice_streamd/data/spice-streamd.conf").read_bytes()
    for d in ("usr", "usr/share/gdm/greeter/autostart", "etc/xdg"):
        assert stat.S_IMODE((tmp_path / d).stat().st_mode) == 0o755


def test_install_then_uninstall_leaves_destdir_empty(tmp_path: Path) -> None:
    assert run("install-system-files", destdir=tmp_path)[0] == 0
    assert len(list(tmp_path.rglob("*"))) > 10
    rc, out, err = run("uninstall-system-files", destdir=tmp_path)
    assert rc == 0, err
    assert list(tmp_path.iterdir()) == [], out
    rc, out, _ = run("uninstall-system-files", destdir=tmp_path)
    assert rc == 0 and "nothing to uninstall" in out


def test_uninstall_keeps_directories_it_did_not_create(tmp_path: Path) -> None:
    (tmp_path / "usr/share/dbus-1/system.d").mkdir(parents=True)
    (tmp_path / "etc/xdg/autostart/other.desktop").parent.mkdir(parents=True)
    (tmp_path / "etc/xdg/autostart/other.desktop").write_text("[Desktop Entry]\n")
    assert run("install-system-files", destdir=tmp_path)[0] == 0
    assert run("uninstall-system-files", destdir=tmp_path)[0] == 0
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == ["etc", "etc/xdg", "etc/xdg/autostart", "etc/xdg/autostart/other.desktop",
                    "usr", "usr/share", "usr/share/dbus-1", "usr/share/dbus-1/system.d"]


def test_install_twice_gives_the_same_tree(tmp_path: Path) -> None:
    assert run("install-system-files", destdir=tmp_path)[0] == 0
    before = tree(tmp_path)
    rc, out, err = run("install-system-files", destdir=tmp_path)
    assert rc == 0, err
    assert tree(tmp_path) == before  # same content, modes, and nothing even rewritten
    assert "installed" not in out and out.count("unchanged") >= 8


def test_paths_inside_point_at_the_real_scripts(tmp_path: Path) -> None:
    assert run("install-system-files", destdir=tmp_path)[0] == 0
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert "@BINDIR@" not in p.read_text(), p
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.read(tmp_path / UNIT)
    exec_start = shlex.split(unit["Service"]["ExecStart"])[0]
    activation = configparser.ConfigParser(interpolation=None)
    activation.read(tmp_path / ACTIVATION)
    assert activation["D-BUS Service"]["SystemdService"] == constants.SYSTEMD_UNIT
    commands = {"unit": exec_start, "activation": activation["D-BUS Service"]["Exec"].split()[0]}
    for name, rel in (("autostart", AUTOSTART), ("greeter", GREETER)):
        entry = configparser.ConfigParser(interpolation=None)
        entry.read(tmp_path / rel)
        commands[name] = shlex.split(entry["Desktop Entry"]["Exec"])[0]
        assert entry["Desktop Entry"]["TryExec"] == commands[name]
    assert commands["unit"] == commands["activation"] == os.path.join(SCRIPTS_DIR, "spice-streamd")
    assert commands["autostart"] == commands["greeter"] == os.path.join(
        SCRIPTS_DIR, "spice-stream-helper")
    for path in commands.values():
        assert os.path.isabs(path) and os.access(path, os.X_OK), path


def test_bindir_inside_destdir_loses_the_destdir(tmp_path: Path, monkeypatch) -> None:
    """Distribution packaging: scripts staged in DESTDIR/usr/bin run from /usr/bin later."""
    dest = tmp_path / "root"
    staged = dest / "usr/bin"
    staged.mkdir(parents=True)
    for s in install.SCRIPTS:
        (staged / s).write_text("#!/bin/sh\n")
        (staged / s).chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(staged / "spice-streamd"), "install-system-files"])
    assert install.find_bindir(str(dest)) == "/usr/bin"
    assert install.main(["install-system-files", "--destdir", str(dest)]) == 0
    assert "ExecStart=/usr/bin/spice-streamd\n" in (dest / UNIT).read_text()


def test_unmodified_files_follow_an_upgrade(tmp_path: Path, capsys) -> None:
    other = tmp_path / "otherbin"
    other.mkdir()
    for s in install.SCRIPTS:
        (other / s).write_text("#!/bin/sh\n")
        (other / s).chmod(0o755)
    dest = tmp_path / "root"
    assert install.main(["install-system-files", "--destdir", str(dest)]) == 0
    assert install.main(["install-system-files", "--destdir", str(dest),
                         "--bindir", str(other)]) == 0
    assert f"ExecStart={other}/spice-streamd\n" in (dest / UNIT).read_text()
    assert f"Exec={other}/spice-stream-helper\n" in (dest / AUTOSTART).read_text()
    assert install.main(["uninstall-system-files", "--destdir", str(dest)]) == 0
    assert list(dest.iterdir()) == []


def test_modified_file_is_not_removed_and_is_reported(tmp_path: Path) -> None:
    assert run("install-system-files", destdir=tmp_path)[0] == 0
    unit = tmp_path / UNIT
    unit.write_text(unit.read_text() + "# local change\n")
    rc, out, err = run("uninstall-system-files", destdir=tmp_path)
    assert rc == 1
    assert f"left {unit}: changed since it was installed" in out
    assert "need attention" in err
    assert unit.read_text().endswith("# local change\n")
    # Everything else went, including the manifest; only the directories holding the unit stay.
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == [unit]


def test_reinstall_keeps_a_changed_system_file_and_says_so(tmp_path: Path) -> None:
    assert run("install-system-files", destdir=tmp_path)[0] == 0
    policy = tmp_path / POLKIT
    policy.write_text("<!-- local -->\n")
    rc, out, err = run("install-system-files", destdir=tmp_path)
    assert rc == 1 and f"kept {policy}: changed since spice-streamd installed it" in out
    assert "need attention" in err and policy.read_text() == "<!-- local -->\n"
    assert "/" + POLKIT in (tmp_path / MANIFEST).read_text(), "still ours, still tracked"
    rc, out, _ = run("uninstall-system-files", destdir=tmp_path)
    assert rc == 1 and f"left {policy}" in out and policy.exists()


def test_modified_config_is_kept_on_install_and_uninstall(tmp_path: Path) -> None:
    assert run("install-system-files", destdir=tmp_path)[0] == 0
    conf = tmp_path / CONFIG
    conf.write_text("fps = 10\n")
    rc, out, _ = run("install-system-files", destdir=tmp_path)
    assert rc == 0 and f"kept {conf}" in out
    assert conf.read_text() == "fps = 10\n"
    rc, out, _ = run("uninstall-system-files", destdir=tmp_path)
    assert rc == 0, "a kept config is the administrator's, not a problem"
    assert f"left {conf}: changed since it was installed" in out
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == [conf]


def test_existing_admin_config_is_never_overwritten_nor_claimed(tmp_path: Path) -> None:
    conf = tmp_path / CONFIG
    conf.parent.mkdir(parents=True)
    conf.write_text("quality = 50\n")
    for _ in range(2):
        rc, out, _ = run("install-system-files", "--force", destdir=tmp_path)
        assert rc == 0 and f"kept {conf}" in out
    assert str("/" + CONFIG) not in (tmp_path / MANIFEST).read_text()
    assert run("uninstall-system-files", destdir=tmp_path)[0] == 0
    assert conf.read_text() == "quality = 50\n"


def test_foreign_file_is_kept_unless_forced(tmp_path: Path) -> None:
    unit = tmp_path / UNIT
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    rc, out, err = run("install-system-files", destdir=tmp_path)
    assert rc == 1
    assert f"kept {unit}: not installed by spice-streamd" in out and "--force" in out
    assert unit.read_text() == "[Service]\nExecStart=/bin/true\n"
    assert (tmp_path / POLICY).is_file(), "the other files are still installed"
    assert "/" + UNIT not in (tmp_path / MANIFEST).read_text()
    rc, out, _ = run("install-system-files", "--force", destdir=tmp_path)
    assert rc == 0 and f"overwrote {unit}" in out
    assert "BusName=" + constants.BUS_NAME in unit.read_text()
    assert run("uninstall-system-files", destdir=tmp_path)[0] == 0
    assert not unit.exists()


def test_symlink_at_a_target_is_neither_followed_nor_replaced(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    dest = tmp_path / "root"
    link = dest / POLKIT
    link.parent.mkdir(parents=True)
    link.symlink_to(victim)
    rc, out, _ = run("install-system-files", "--force", destdir=dest)
    assert rc == 1 and f"kept {link}: not a regular file" in out
    assert link.is_symlink() and victim.read_text() == "precious\n"


def test_corrupt_manifest_refuses_uninstall_and_removes_nothing(tmp_path: Path) -> None:
    assert run("install-system-files", destdir=tmp_path)[0] == 0
    manifest = tmp_path / MANIFEST
    manifest.write_text(manifest.read_text() + "file abc /etc/../etc/passwd\n")
    before = tree(tmp_path)
    rc, _, err = run("uninstall-system-files", destdir=tmp_path)
    assert rc == 1 and "manifest" in err and "Traceback" not in err
    assert tree(tmp_path) == before


def test_usage_errors_are_named(tmp_path: Path) -> None:
    assert install.main([]) == 2
    assert install.main(["frobnicate"]) == 2
    assert install.main(["install-system-files", "--bogus"]) == 2
    rc, _, err = run("install-system-files", "--bindir", str(tmp_path), destdir=tmp_path / "d")
    assert rc == 1 and "are not there" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()


def test_other_prefix_installs_under_it(tmp_path: Path) -> None:
    rc, out, _ = run("install-system-files", "--prefix", "/usr/local", destdir=tmp_path)
    assert rc == 0
    assert (tmp_path / "usr/local/lib/systemd/system/spice-streamd.service").is_file()
    assert (tmp_path / "usr/local/lib/udev/rules.d/70-spice-streamd.rules").is_file()
    assert (tmp_path / "usr/local/share/dbus-1/system.d" / constants.POLICY_FILE).is_file()
    assert (tmp_path / CONFIG).is_file() and (tmp_path / AUTOSTART).is_file()
    assert "note: with prefix /usr/local" in out
    rc, out, _ = run("uninstall-system-files", destdir=tmp_path)  # prefix /usr: not there
    assert rc == 0 and "nothing to uninstall" in out
    assert (tmp_path / "usr/local/share/spice-streamd/installed-files").is_file()
    rc, _, _ = run("uninstall-system-files", "--prefix", "/usr/local", destdir=tmp_path)
    assert rc == 0 and list(tmp_path.iterdir()) == []


def test_unit_is_hardened_below_exposure_5(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing: apt-get install systemd")
    assert run("install-system-files", destdir=tmp_path)[0] == 0
    unit = tmp_path / UNIT
    p = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=60, check=False)
    m = re.search(r"Overall exposure level for spice-streamd\.service: ([0-9.]+)", p.stdout)
    assert m, p.stdout + p.stderr
    score = float(m.group(1))
    assert score < 5.0
    stated = re.search(r"scores ([0-9.]+)", unit.read_text())
    assert stated and float(stated.group(1)) == score, "update the score in the unit's comment"
    p = subprocess.run([analyze, "verify", "--man=no", str(unit)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr


def test_unit_keeps_what_the_service_needs() -> None:
    text = (REPO / "dbus" / "spice-streamd.service").read_text()
    settings = dict(re.findall(r"(?m)^(\w+)=(.*)$", text))
    assert settings["Type"] == "dbus" and settings["BusName"] == constants.BUS_NAME
    # CAP_SYS_ADMIN: the kernel's framebuffer handles for the scanout reader (framebuffers.py).
    assert set(settings["CapabilityBoundingSet"].split()) == {"CAP_SETUID", "CAP_SETGID",
                                                              "CAP_KILL", "CAP_SYS_ADMIN"}
    assert "char-drm r" in re.findall(r"(?m)^DeviceAllow=(.*)$", text)
    assert settings["ProtectHome"] == "read-only"  # workers read the user's Xauthority
    assert settings["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_NETLINK"]
    assert settings["NoNewPrivileges"] == "yes" and settings["ProtectSystem"] == "strict"
    assert "ProtectProc" not in settings and "PrivateUsers" not in settings


# udev rule syntax, as udev(7) describes it (systemd 252 has no `udevadm verify`).
_UDEV_MATCH = {"ACTION", "DEVPATH", "KERNEL", "KERNELS", "NAME", "SYMLINK", "SUBSYSTEM",
               "SUBSYSTEMS", "DRIVER", "DRIVERS", "ATTR", "ATTRS", "SYSCTL", "ENV", "CONST",
               "TAG", "TAGS", "TEST", "PROGRAM", "RESULT"}
_UDEV_ASSIGN = {"NAME", "SYMLINK", "OWNER", "GROUP", "MODE", "SECLABEL", "ATTR", "SYSCTL", "ENV",
                "TAG", "RUN", "LABEL", "GOTO", "IMPORT", "OPTIONS"}
_UDEV_WITH_ATTR = {"ATTR", "ATTRS", "SYSCTL", "ENV", "CONST", "TEST", "SECLABEL", "RUN",
                   "IMPORT"}
_UDEV_PAIR = re.compile(r'\s*([A-Z]+)(?:\{([^}]+)\})?\s*(==|!=|\+=|-=|:=|=)\s*"((?:[^"\\]|\\.)*)"'
                        r"\s*(,|$)")


def parse_udev_rules(text: str) -> list[list[tuple[str, str | None, str, str]]]:
    """Each rule as (key, attribute, operator, value) tuples; AssertionError names a bad line."""
    rules = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assert not line.endswith("\\"), f"line {n}: continuation not expected"
        pos, pairs = 0, []
        while pos < len(line):
            m = _UDEV_PAIR.match(line, pos)
            assert m, f"line {n}: cannot parse from column {pos}: {line[pos:]!r}"
            key, attr, op, value, _ = m.groups()
            if op in ("==", "!="):
                assert key in _UDEV_MATCH, f"line {n}: {key} cannot be matched"
            else:
                assert key in _UDEV_ASSIGN, f"line {n}: {key} cannot be assigned"
            assert (attr is not None) == (key in _UDEV_WITH_ATTR) or key in {"RUN", "IMPORT"}, (
                f"line {n}: {key} {'needs' if attr is None else 'takes no'} {{attribute}}")
            pairs.append((key, attr, op, value))
            pos = m.end()
        rules.append(pairs)
    return rules


def test_udev_rule_parses_and_starts_the_service_for_the_stream_port() -> None:
    text = (REPO / "dbus" / "70-spice-streamd.rules").read_text()
    udevadm = shutil.which("udevadm")
    if udevadm and "verify" in subprocess.run([udevadm, "--help"], capture_output=True,
                                              text=True, check=False).stdout:
        p = subprocess.run([udevadm, "verify", str(REPO / "dbus" / "70-spice-streamd.rules")],
                           capture_output=True, text=True, check=False)
        assert p.returncode == 0, p.stdout + p.stderr
    rules = parse_udev_rules(text)
    assert len(rules) == 1
    pairs = set(rules[0])
    assert ("SUBSYSTEM", None, "==", "virtio-ports") in pairs
    assert ("ATTR", "name", "==", constants.STREAM_PORT_NAME) in pairs
    assert ("TAG", None, "+=", "systemd") in pairs
    assert ("ENV", "SYSTEMD_WANTS", "=", constants.SYSTEMD_UNIT) in pairs


def test_udev_parser_rejects_broken_rules() -> None:
    for bad in ('SUBSYSTEM="virtio-ports"', 'SUBSYSTEM=="x" TAG+="y"', 'ENV="x"',
                'FOO=="x"', 'ATTR{name}=="unterminated'):
        with pytest.raises(AssertionError):
            parse_udev_rules(bad)


@pytest.mark.parametrize("name", ["spice-stream-helper.desktop",
                                  "spice-stream-helper-greeter.desktop"])
def test_autostart_entries_are_valid_desktop_files(name: str) -> None:
    path = REPO / "helper" / name
    entry = configparser.ConfigParser(interpolation=None, strict=True)
    entry.optionxform = str  # keys are case-sensitive
    entry.read(path)
    assert entry.sections() == ["Desktop Entry"]
    e = entry["Desktop Entry"]
    assert e["Type"] == "Application" and e["Name"] and e["NoDisplay"] == "true"
    assert e["Exec"] == "@BINDIR@/spice-stream-helper"
    validate = shutil.which("desktop-file-validate")
    if validate:
        p = subprocess.run([validate, str(path)], capture_output=True, text=True, check=False)
        assert p.returncode == 0, p.stdout


def test_wheel_contains_the_system_files(tmp_path: Path) -> None:
    """A real `pip wheel .` of a copy of the source tree."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        ".ruff_cache", ".hypothesis", "bench", "tests"))
    out = tmp_path / "wheels"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                        str(src)], capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    # setuptools >= 77 deprecates the {text = ...} table, in 20 lines on every build (issue 15).
    assert "project.license" not in p.stdout + p.stderr, p.stdout + p.stderr
    assert "deprecat" not in (p.stdout + p.stderr).lower(), p.stdout + p.stderr
    (wheel,) = out.glob("spice_streamd-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        assert "License-Expression: MIT\n" in metadata
        assert "License-File: LICENSE\n" in metadata
        license_file = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
        assert z.read(license_file) == (REPO / "LICENSE").read_bytes()
        expected = {
            "spice_streamd/data/spice-streamd.conf": "service/spice_streamd/data/spice-streamd.conf",
            "spice_streamd/data/system/helper/spice-stream-helper.desktop":
                "helper/spice-stream-helper.desktop",
            "spice_streamd/data/system/helper/spice-stream-helper-greeter.desktop":
                "helper/spice-stream-helper-greeter.desktop",
        }
        for top in ("dbus", "polkit"):
            for f in (REPO / top).iterdir():
                expected[f"spice_streamd/data/system/{top}/{f.name}"] = f"{top}/{f.name}"
        for member, source in expected.items():
            assert member in names, f"{member} missing from the wheel"
            assert z.read(member) == (REPO / source).read_bytes(), member
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = z.read(entry_points).decode()
        for s in install.SCRIPTS:
            assert f"{s} = " in scripts


def test_console_script_dispatches_and_points_at_itself(tmp_path: Path) -> None:
    script = os.path.join(SCRIPTS_DIR, "spice-streamd")
    p = subprocess.run([script, "install-system-files", "--destdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    assert f"ExecStart={script}\n" in (tmp_path / UNIT).read_text()
    xml = tmp_path / "usr/share/dbus-1/interfaces" / constants.INTROSPECTION_FILE
    assert xml.is_file() == (REPO / "dbus" / constants.INTROSPECTION_FILE).is_file()
    p = subprocess.run([script, "uninstall-system-files", "--destdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    assert list(tmp_path.iterdir()) == []
