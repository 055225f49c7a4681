"""The service's configuration: keys, defaults, limits, and how file, environment and CLI combine."""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from spice_stream_common.codecnames import Codec, parse_preference
from spice_stream_common.constants import DEFAULT_DEVICE

from .errors import ConfigError

DEFAULT_PATH = "/etc/spice-streamd.conf"
ENV_PREFIX = "SPICE_STREAMD_"
# A config file is a few hundred bytes; refuse anything that could make us read without bound.
MAX_FILE_BYTES = 64 * 1024
MAX_PATH_CHARS = 4096
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Config:
    """Validated settings; every field has the documented default."""

    device: str = DEFAULT_DEVICE
    fps: int = 30
    quality: int = 80
    idle_exit: int = 60
    max_sessions: int = 16
    max_sessions_per_uid: int = 4
    log_level: str = "info"
    scanout: str = "auto"
    codecs: str = "mjpeg"
    wayland_capture: str = "screencast"

    def summary(self) -> str:
        """One log line with every effective value."""
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


@dataclass(frozen=True)
class _Key:
    allowed: str  # what a person may write, quoted in every refusal
    check: Callable[[Any], Any]  # returns the normalized value or raises ValueError


def _int_in(lo: int, hi: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        # bool is an int subclass: `fps = true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError
        if not lo <= value <= hi:
            raise ValueError
        return value

    return check


def _device(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ValueError
    if len(value) > MAX_PATH_CHARS:
        raise ValueError
    return value


def _log_level(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise ValueError
    return value.lower()


def _codecs(value: Any) -> str:
    """A preference list of codec names, written back normalized ("h264 vp8 mjpeg")."""
    if not isinstance(value, str) or len(value) > 200:
        raise ValueError
    return " ".join(c.label for c in parse_preference(value))


WAYLAND_CAPTURES = ("screencast", "scanout")


def _wayland_capture(value: Any) -> str:
    if isinstance(value, str) and value.lower() in WAYLAND_CAPTURES:
        return value.lower()
    raise ValueError


def _scanout(value: Any) -> str:
    if isinstance(value, str) and value.lower() in ("auto", "off"):
        return value.lower()
    return _device(value)


KEYS: dict[str, _Key] = {
    "device": _Key("an absolute path to the stream port, e.g. " + DEFAULT_DEVICE, _device),
    "fps": _Key("an integer from 1 to 120 (frames per second)", _int_in(1, 120)),
    "quality": _Key("an integer from 1 to 100 (JPEG quality)", _int_in(1, 100)),
    "idle_exit": _Key(
        "an integer number of seconds from 0 to 86400 (0 = never exit when idle)", _int_in(0, 86400)
    ),
    "max_sessions": _Key("an integer from 1 to 1024", _int_in(1, 1024)),
    "max_sessions_per_uid": _Key(
        "an integer from 1 to 1024, not above max_sessions", _int_in(1, 1024)
    ),
    "log_level": _Key("one of " + ", ".join(LOG_LEVELS), _log_level),
    "scanout": _Key('"auto", "off" or an absolute path to a DRM device such as /dev/dri/card0',
                    _scanout),
    "codecs": _Key("codec names in order of preference, from " + ", ".join(c.label for c in Codec)
                   + ' (e.g. "h264 vp8 mjpeg"; mjpeg is added last when missing)', _codecs),
    "wayland_capture": _Key('"screencast" (the session\'s own worker, through mutter\'s screen cast) '
                            'or "scanout" (the display\'s scanout reader, on virtual GPUs)',
                            _wayland_capture),
}
_INT_KEYS = frozenset(k for k, v in dataclasses.asdict(Config()).items() if isinstance(v, int))
_INT_TEXT = re.compile(r"[+-]?[0-9]{1,12}")


def _known() -> str:
    return ", ".join(KEYS)


def _refuse(source: str, key: str, value: Any) -> ConfigError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ConfigError(f"{source}: {key} = {shown} is refused: allowed is {KEYS[key].allowed}")


def _from_text(key: str, text: str) -> Any:
    """Typed value of an environment or command-line string (the file is already typed by TOML)."""
    if key in _INT_KEYS and _INT_TEXT.fullmatch(text.strip()):
        return int(text.strip())
    return text


def _validate(source: str, key: str, value: Any) -> Any:
    try:
        return KEYS[key].check(value)
    except ValueError:
        raise _refuse(source, key, value) from None


def _read_file(path: str, explicit: bool) -> dict[str, Any]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: configuration file given with --config does not exist") from None
        return {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot open configuration file: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: configuration file is not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ConfigError(f"{path}: configuration file is larger than {MAX_FILE_BYTES} bytes")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read configuration file: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: configuration file is larger than {MAX_FILE_BYTES} bytes")
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: configuration file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for key, value in table.items():
        if key not in KEYS:
            raise ConfigError(f"{path}: unknown key {key!r}; known keys are {_known()}")
        if isinstance(value, dict):
            raise ConfigError(f"{path}: {key} is a table; allowed is {KEYS[key].allowed}")
    return table


def load(
    path: str | None,
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """The effective configuration. Later sources win: defaults, then the file (`path`, or
    DEFAULT_PATH which may be absent), then SPICE_STREAMD_<KEY> environment variables, then
    `overrides` from the command line (None values mean "not given"). Raises ConfigError naming
    the source, key, value and what is allowed."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    file_path = DEFAULT_PATH if path is None else path
    for key, value in _read_file(file_path, explicit=path is not None).items():
        values[key] = _validate(file_path, key, value)
    for key in KEYS:
        name = ENV_PREFIX + key.upper()
        if name in env:
            values[key] = _validate(f"environment {name}", key, _from_text(key, env[name]))
    for key, value in (overrides or {}).items():
        if key not in KEYS:
            raise ConfigError(f"command line: unknown setting {key!r}; known keys are {_known()}")
        if value is None:
            continue
        typed = _from_text(key, value) if isinstance(value, str) else value
        values[key] = _validate("command line", key, typed)
    config = Config(**values)
    if config.max_sessions_per_uid > config.max_sessions:
        raise ConfigError(
            f"max_sessions_per_uid = {config.max_sessions_per_uid} is refused: allowed is "
            f"{KEYS['max_sessions_per_uid'].allowed} (max_sessions = {config.max_sessions})"
        )
    return config
