"""Configuration: defaults, file/env/CLI precedence, and a named refusal for every bad value."""

from __future__ import annotations

import dataclasses
import os
import re
from importlib import resources
from pathlib import Path

import pytest

from spice_streamd import config
from spice_streamd.config import Config, load
from spice_streamd.errors import ConfigError

NO_ENV: dict[str, str] = {}

# Per key: values refused, and a value accepted that differs from the default.
BAD = {
    "device": ["relative/path", "", 5, "/dev/x\0y", "/" + "a" * 5000],
    "fps": [0, 121, -1, 30.5, "30", True],
    "quality": [0, 101, 80.0, "high", False],
    "idle_exit": [-1, 86401, 1.5, "60"],
    "max_sessions": [0, 1025, "16"],
    "max_sessions_per_uid": [0, 1025, "4"],
    "log_level": ["verbose", 3, ""],
    "scanout": ["on", "dev/dri/card0", "", True, 0],
    "codecs": ["av1", "h264 theora", 3, ["h264"], "h264 " * 50],
    "wayland_capture": ["pipewire", "", 1, True, ["scanout"]],
}
GOOD = {
    "device": "/dev/vport1p2",
    "fps": 120,
    "quality": 1,
    "idle_exit": 0,
    "max_sessions": 1024,
    "max_sessions_per_uid": 1,
    "log_level": "debug",
    "scanout": "off",
    "codecs": "h264 vp8 mjpeg",
    "wayland_capture": "scanout",
}


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace("\0", "\\u0000").replace('"', '\\"') + '"'
    return repr(value)


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "spice-streamd.conf"
    p.write_text(text)
    return str(p)


def test_every_key_is_covered_by_these_tests() -> None:
    assert set(BAD) == set(config.KEYS) == {f.name for f in dataclasses.fields(Config)}
    assert set(GOOD) == set(config.KEYS)


def test_missing_default_file_gives_defaults(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.conf"))
    c = load(None, {}, environ=NO_ENV)
    assert c == Config()
    assert (c.fps, c.quality, c.idle_exit) == (30, 80, 60)
    assert (c.max_sessions, c.max_sessions_per_uid, c.log_level) == (16, 4, "info")
    assert c.device == "/dev/virtio-ports/org.spice-space.stream.0"


def test_default_path_is_read_when_present(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", write(tmp_path, "fps = 12\n"))
    assert load(None, {}, environ=NO_ENV).fps == 12


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.conf")
    with pytest.raises(ConfigError, match=re.escape(missing) + ".*does not exist"):
        load(missing, {}, environ=NO_ENV)


@pytest.mark.parametrize("key", sorted(GOOD))
def test_good_value_in_file_is_taken(tmp_path: Path, key: str) -> None:
    path = write(tmp_path, f"{key} = {toml_value(GOOD[key])}\n")
    assert getattr(load(path, {}, environ=NO_ENV), key) == GOOD[key]


@pytest.mark.parametrize(
    ("key", "value"), [(k, v) for k, values in BAD.items() for v in values], ids=repr
)
def test_bad_value_in_file_names_key_value_and_allowed(tmp_path: Path, key: str, value) -> None:
    path = write(tmp_path, f"{key} = {toml_value(value)}\n")
    with pytest.raises(ConfigError) as info:
        load(path, {}, environ=NO_ENV)
    text = str(info.value)
    assert path in text
    assert f"{key} = " in text
    assert repr(value)[:20] in text
    assert config.KEYS[key].allowed in text
    assert "\n" not in text


@pytest.mark.parametrize("key", ["fps", "quality", "idle_exit", "max_sessions", "log_level"])
def test_bad_value_in_environment_is_refused_naming_the_variable(tmp_path: Path, key: str) -> None:
    name = "SPICE_STREAMD_" + key.upper()
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, ""), {}, environ={name: "-5x"})
    assert name in str(info.value)
    assert "'-5x'" in str(info.value)
    assert config.KEYS[key].allowed in str(info.value)


@pytest.mark.parametrize(("key", "value"), [("fps", 0), ("quality", "101"), ("log_level", "loud")])
def test_bad_value_on_command_line_is_refused(key: str, value, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.conf"))
    with pytest.raises(ConfigError, match=f"command line: {key} = .*allowed is"):
        load(None, {key: value}, environ=NO_ENV)


def test_unknown_key_in_file_is_refused_naming_known_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "fps = 10\nframerate = 20\n")
    with pytest.raises(ConfigError) as info:
        load(path, {}, environ=NO_ENV)
    assert "'framerate'" in str(info.value)
    for key in config.KEYS:
        assert key in str(info.value)


def test_table_and_unknown_cli_key_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fps is a table"):
        load(write(tmp_path, "[fps]\nx = 1\n"), {}, environ=NO_ENV)
    with pytest.raises(ConfigError, match="unknown setting 'frame_rate'"):
        load(write(tmp_path, ""), {"frame_rate": 3}, environ=NO_ENV)


def test_invalid_toml_and_non_regular_and_huge_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "fps = = 3\n"), {}, environ=NO_ENV)
    with pytest.raises(ConfigError, match="not a regular file"):
        load(str(tmp_path), {}, environ=NO_ENV)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load(str(fifo), {}, environ=NO_ENV)
    big = tmp_path / "big.conf"
    big.write_text("#" * (config.MAX_FILE_BYTES + 10))
    with pytest.raises(ConfigError, match="larger than"):
        load(str(big), {}, environ=NO_ENV)
    with pytest.raises(ConfigError, match="not UTF-8"):
        big.write_bytes(b"log_level = \"\xff\"\n")
        load(str(big), {}, environ=NO_ENV)


def test_per_uid_limit_above_total_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "max_sessions = 2\nmax_sessions_per_uid = 3\n")
    with pytest.raises(ConfigError, match="max_sessions_per_uid = 3 .*max_sessions = 2"):
        load(path, {}, environ=NO_ENV)


def test_precedence_defaults_file_environment_command_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'fps = 10\nquality = 50\nidle_exit = 5\nlog_level = "warning"\n')
    env = {"SPICE_STREAMD_QUALITY": "60", "SPICE_STREAMD_IDLE_EXIT": "7"}
    c = load(path, {"idle_exit": 9, "max_sessions": None}, environ=env)
    assert c.fps == 10  # file only
    assert c.quality == 60  # environment beats file
    assert c.idle_exit == 9  # command line beats environment and file
    assert c.log_level == "warning"
    assert c.max_sessions == 16  # None from the command line means "not given"


def test_environment_and_cli_strings_are_parsed_and_normalized(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    c = load(path, {"fps": "25"}, environ={"SPICE_STREAMD_LOG_LEVEL": "DEBUG"})
    assert (c.fps, c.log_level) == (25, "debug")


def test_real_environment_is_used_by_default(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SPICE_STREAMD_FPS", "11")
    assert load(write(tmp_path, "fps = 3\n"), {}).fps == 11


def test_shipped_example_documents_every_key_with_its_default(tmp_path: Path) -> None:
    text = (resources.files("spice_streamd") / "data" / "spice-streamd.conf").read_text()
    assert load(write(tmp_path, text), {}, environ=NO_ENV) == Config()
    uncommented = re.sub(r"(?m)^#([a-z_]+ = )", r"\1", text)
    documented = re.findall(r"(?m)^([a-z_]+) = ", uncommented)
    assert sorted(documented) == sorted(config.KEYS)
    # Uncommented, the example states exactly the defaults.
    assert load(write(tmp_path, uncommented), {}, environ=NO_ENV) == Config()


def test_summary_names_every_value() -> None:
    line = Config(fps=7).summary()
    assert "fps=7" in line and "log_level=info" in line and "\n" not in line


def test_service_command_line_overrides_every_key_and_refuses_bad_values(capsys, tmp_path):
    from spice_streamd.main import main

    empty = tmp_path / "empty.conf"
    empty.write_text("")
    assert main(["--config", str(empty), "--fps", "500", "--bus", "unix:path=/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "command line: fps = 500 is refused: allowed is an integer from 1 to 120" in err
    assert main(["--config", str(empty), "--max-sessions-per-uid", "0", "--bus", "unix:path=/x"]) == 2
    assert "max_sessions_per_uid" in capsys.readouterr().err


def test_codecs_are_written_back_in_one_form_with_mjpeg_last_when_left_out(tmp_path) -> None:
    path = write(tmp_path, 'codecs = "VP8,h264"\n')
    assert config.load(path, environ=NO_ENV).codecs == "vp8 h264 mjpeg"
    assert config.load(None, {"codecs": "mjpeg vp9"}, environ={}).codecs == "mjpeg vp9"
