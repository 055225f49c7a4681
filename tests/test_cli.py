"""The three commands as a person meets them: --version, --help, and one-line refusals."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from spice_stream_common import constants

REPO = Path(__file__).resolve().parents[1]
MODULES = {
    "spice-streamd": "spice_streamd.main",
    "spice-stream-helper": "spice_stream_helper.main",
    "spice-stream-worker": "spice_stream_worker.main",
}


def run(module: str, *args: str, env: dict[str, str] | None = None,
        user: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=60, check=False, env=env, user=user, group=user,
                          extra_groups=[] if user is not None else None)


def test_version_matches_pyproject():
    with open(REPO / "pyproject.toml", "rb") as f:
        assert tomllib.load(f)["project"]["version"] == constants.VERSION


@pytest.mark.parametrize("program", sorted(MODULES))
def test_every_command_has_version(program):
    p = run(MODULES[program], "--version")
    assert p.returncode == 0 and p.stdout.strip() == f"{program} {constants.VERSION}"


def test_service_help_lists_its_subcommands():
    p = run("spice_streamd.main", "--help")
    assert p.returncode == 0
    assert "install-system-files" in p.stdout and "uninstall-system-files" in p.stdout


@pytest.mark.parametrize("command", ["install-system-files", "uninstall-system-files"])
def test_system_files_commands_as_non_root_say_root_is_needed(command):
    p = run("spice_streamd.main", command, user=65534)
    assert p.returncode == 1
    assert p.stderr.strip() == (
        f"spice-streamd {command}: needs root: it changes system directories under /usr and "
        "/etc (run it with sudo, or stage the files with --destdir)")


def test_service_without_a_bus_names_the_address(tmp_path):
    address = f"unix:path={tmp_path}/no-bus"
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address)
    env.pop("DBUS_STARTER_ADDRESS", None)
    p = run("spice_streamd.main", "--device", str(tmp_path / "port"), env=env)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].endswith(
        f"cannot connect to the system bus at {address}: No such file or directory")
    assert "Traceback" not in p.stderr


def test_system_files_commands_leave_a_debian_package_alone(monkeypatch, tmp_path, capsys):
    from spice_streamd import install

    listed = tmp_path / "spice-streamd.list"
    listed.write_text("/usr/bin/spice-streamd\n")
    monkeypatch.setattr(install, "DPKG_LIST", str(listed))
    assert install.main(["uninstall-system-files"]) == 1
    assert "use apt" in capsys.readouterr().err
    assert install.main(["install-system-files", "--destdir", str(tmp_path / "stage")]) == 0
