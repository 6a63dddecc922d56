"""Configuration: configs/default.toml, an optional user file on top, command-line overrides on top of that.

Why one TOML file with every key: the defaults are documented where they live, `--print-config` output is
itself a valid config file, and a typo in a user file is caught (unknown key → error naming key and file)
instead of being silently ignored. The result is a tree of frozen dataclasses so that the rest of the
program reads typed attributes (`config.server.port`) and never a string-keyed dict.

Layering: `load_config(path, overrides)` starts from default.toml (which must define every key), merges the
keys present in `path` (partial files are fine), then `overrides`: a flat {"section.key": value} dict,
e.g. from `dotted_overrides(["server.port=9000"])` or built by the CLI from its options (None values are
skipped, so argparse defaults can be passed as they are). String override values are converted to the
key's type ("9000" → 9000, "webrtc,file" → ["webrtc", "file"]); values from files must have the right
TOML type already.

Relative paths in files are relative to the project root; relative paths in overrides are relative to the
current directory (that is what a user typing `--photo me.jpg` means). Loaded configs hold absolute paths.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from common.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "configs" / "default.toml"
SAMPLE_DIR = PROJECT_ROOT / "assets" / "sample"
SAMPLE_PHOTO = SAMPLE_DIR / "astronaut.png"
SAMPLE_SPEECH = SAMPLE_DIR / "speech.wav"
OVERRIDES_ORIGIN = "command-line overrides"

AUDIO_KEYWORDS = ("sample", "mic")
POSE_KEYWORDS = ("still", "webcam", "none")
OUTPUT_TARGETS = ("webrtc", "vcam", "vmic", "file")


class ConfigError(UserError):
    """A config file or override is wrong; the message names the key and where it came from."""


# --------------------------------------------------------------------------- schema
def _spec(**rules: Any) -> Any:
    """A required dataclass field with validation rules in its metadata. Defaults live in default.toml,
    not here, so that there is exactly one place to change them."""
    return field(metadata=rules)


@dataclass(frozen=True)
class ModelConfig:
    checkpoint_dir: Path = _spec()
    checkpoint_url: str = _spec()
    device: str = _spec(pattern=r"auto|cpu|mps|cuda(:\d+)?", expect="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    dtype: str = _spec(choices=("float32", "float16", "bfloat16"))
    noise: str = _spec(choices=("fixed", "random", "zero"))
    noise_seed: int = _spec()
    mouth_weight: float = _spec(min=0.0)


@dataclass(frozen=True)
class AudioConfig:
    source: str = _spec(keywords=AUDIO_KEYWORDS)  # a keyword, or an absolute file path once loaded
    device: str = _spec()
    gain: str = _spec(choices=("running", "file", "none"))

    @property
    def is_mic(self) -> bool:
        return self.source == "mic"

    @property
    def file_path(self) -> Path | None:
        """The audio file to play ("sample" → the bundled speech), or None for the microphone."""
        if self.source == "mic":
            return None
        return SAMPLE_SPEECH if self.source == "sample" else Path(self.source)


@dataclass(frozen=True)
class PoseConfig:
    source: str = _spec(keywords=POSE_KEYWORDS)  # a keyword, or an absolute video path once loaded
    webcam_index: int = _spec(min=0)
    smoothing: float = _spec(min=0.0, below=1.0)

    @property
    def video_path(self) -> Path | None:
        """The pose video file, or None when the source is one of the keywords."""
        return None if self.source in POSE_KEYWORDS else Path(self.source)


@dataclass(frozen=True)
class OutputConfig:
    targets: tuple[str, ...] = _spec(items=OUTPUT_TARGETS, nonempty=True)
    file: Path = _spec()
    size: str = _spec(pattern=r"auto|native|[1-9]\d*x[1-9]\d*",
                      expect="'auto', 'native' or WIDTHxHEIGHT such as '640x480'")
    framing: str = _spec(choices=("fit", "paste"))


@dataclass(frozen=True)
class ServerConfig:
    host: str = _spec(nonempty=True)
    port: int = _spec(min=0, max=65535)
    token: str = _spec()


@dataclass(frozen=True)
class VcamConfig:
    device: str = _spec()
    backend: str = _spec(choices=("", "v4l2loopback", "obs", "unitycapture"))


@dataclass(frozen=True)
class VmicConfig:
    device: str = _spec()
    preroll_ms: float = _spec(min=0.0, max=500.0)


@dataclass(frozen=True)
class IdentityConfig:
    photo: Path = _spec()


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    audio: AudioConfig
    pose: PoseConfig
    output: OutputConfig
    server: ServerConfig
    vcam: VcamConfig
    vmic: VmicConfig
    identity: IdentityConfig


_SECTION_TYPES = typing.get_type_hints(Config)
SECTIONS: dict[str, type] = {f.name: _SECTION_TYPES[f.name] for f in fields(Config)}


# --------------------------------------------------------------------------- values
@dataclass(frozen=True)
class _Value:
    """A raw value and where it came from (for error messages and for the base of relative paths)."""

    value: Any
    origin: str
    base_dir: Path
    from_override: bool


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean (true/false)",
               Path: "a path (string)"}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return "a list of strings"
    return _TYPE_NAMES.get(hint, str(hint))


def _bad_type(key: str, hint: Any, value: Any, origin: str) -> ConfigError:
    return ConfigError(f"{key} in {origin}: expected {_type_name(hint)}, got {value!r}")


def _coerce_string(key: str, hint: Any, text: str, origin: str) -> Any:
    """Command-line text → the key's type. Only overrides get this leniency; files must be typed."""
    try:
        if hint is int:
            return int(text.strip())
        if hint is float:
            number = float(text.strip())
            if not math.isfinite(number):
                raise ValueError(text)
            return number
        if hint is bool:
            word = text.strip().lower()
            if word in _TRUE or word in _FALSE:
                return word in _TRUE
            raise ValueError(text)
        if typing.get_origin(hint) is tuple:
            stripped = text.strip()
            if stripped.startswith("["):
                return tomllib.loads(f"v = {stripped}")["v"]
            return [part.strip() for part in stripped.split(",") if part.strip()]
    except (ValueError, tomllib.TOMLDecodeError):
        raise _bad_type(key, hint, text, origin) from None
    return text


def _check_type(key: str, hint: Any, raw: _Value) -> Any:
    value = raw.value
    if raw.from_override and isinstance(value, str) and hint not in (str, Path):
        value = _coerce_string(key, hint, value, raw.origin)
    if raw.from_override and isinstance(value, os.PathLike) and hint in (str, Path):
        value = os.fspath(value)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok:
            value = float(value)
    elif hint in (str, Path):
        ok = isinstance(value, str)
    elif typing.get_origin(hint) is tuple:
        ok = (isinstance(value, list) or (raw.from_override and isinstance(value, tuple))) \
            and all(isinstance(v, str) for v in value)
        if ok:
            value = tuple(value)
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported config type {hint} for {key}")
    if not ok:
        raise _bad_type(key, hint, raw.value, raw.origin)
    return value


def _resolve_path(text: str, base_dir: Path) -> Path:
    path = Path(text).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base_dir / path))


def _validate(key: str, value: Any, rules: dict[str, Any], raw: _Value) -> Any:
    """Apply a field's rules; returns the final value (paths resolved, list targets de-duplicated)."""
    where = f"{key} in {raw.origin}"
    if "choices" in rules and value not in rules["choices"]:
        options = ", ".join(repr(c) for c in rules["choices"])
        raise ConfigError(f"{where}: expected one of {options}, got {value!r}")
    if "pattern" in rules and not re.fullmatch(rules["pattern"], value):
        raise ConfigError(f"{where}: expected {rules['expect']}, got {value!r}")
    if "min" in rules and value < rules["min"]:
        raise ConfigError(f"{where}: must be >= {rules['min']}, got {value!r}")
    if "max" in rules and value > rules["max"]:
        raise ConfigError(f"{where}: must be <= {rules['max']}, got {value!r}")
    if "below" in rules and value >= rules["below"]:
        raise ConfigError(f"{where}: must be < {rules['below']}, got {value!r}")
    if rules.get("nonempty") and len(value) == 0:
        raise ConfigError(f"{where}: must not be empty")
    if "items" in rules:
        for item in value:
            if item not in rules["items"]:
                options = ", ".join(repr(c) for c in rules["items"])
                raise ConfigError(f"{where}: unknown entry {item!r}; expected any of {options}")
        value = tuple(dict.fromkeys(value))
    if "keywords" in rules:
        if value in rules["keywords"]:
            return value
        if not value.strip():
            words = ", ".join(repr(k) for k in rules["keywords"])
            raise ConfigError(f"{where}: expected {words} or a file path, got an empty string")
        return str(_resolve_path(value, raw.base_dir))
    return value


# --------------------------------------------------------------------------- loading
def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory, expected a .toml file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _unknown(name: str, known: Iterable[str], origin: str, what: str) -> ConfigError:
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = (f"did you mean '{close[0]}'? " if close else "") + f"known {what}s: {', '.join(known)}"
    return ConfigError(f"unknown {what} '{name}' in {origin}", hint=hint)


def _keys_of(section: str) -> list[str]:
    return [f.name for f in fields(SECTIONS[section])]


def _merge_file(layers: dict[str, dict[str, _Value]], data: dict[str, Any], origin: str, base_dir: Path) -> None:
    for section, table in data.items():
        if section not in SECTIONS:
            raise _unknown(section, SECTIONS, origin, "section")
        if not isinstance(table, dict):
            raise ConfigError(f"'{section}' in {origin} must be a table ([{section}]), got {table!r}")
        known = _keys_of(section)
        for key, value in table.items():
            if key not in known:
                raise _unknown(f"{section}.{key}", [f"{section}.{k}" for k in known], origin, "key")
            layers[section][key] = _Value(value, origin, base_dir, from_override=False)


def _merge_overrides(layers: dict[str, dict[str, _Value]], overrides: dict[str, Any], base_dir: Path) -> None:
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if section not in SECTIONS or key not in _keys_of(section):
            candidates = [f"{section}.{k}" for k in _keys_of(section)] if section in SECTIONS else _all_keys()
            raise _unknown(dotted, candidates, OVERRIDES_ORIGIN, "key")
        layers[section][key] = _Value(value, OVERRIDES_ORIGIN, base_dir, from_override=True)


def _all_keys() -> list[str]:
    return [f"{section}.{key}" for section in SECTIONS for key in _keys_of(section)]


def _build(layers: dict[str, dict[str, _Value]]) -> Config:
    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = f"{section}.{f.name}"
            raw = layers[section].get(f.name)
            if raw is None:
                raise ConfigError(f"{key} is missing from {DEFAULT_CONFIG_PATH}",
                                  hint="restore configs/default.toml from the repository")
            value = _check_type(key, hints[f.name], raw)
            value = _validate(key, value, dict(f.metadata), raw)
            if hints[f.name] is Path:
                value = _resolve_path(value, raw.base_dir)
            kwargs[f.name] = value
        sections[section] = cls(**kwargs)
    return Config(**sections)


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None, *,
                default_path: Path = DEFAULT_CONFIG_PATH, cwd: Path | None = None) -> Config:
    """Defaults ← `path` (optional, partial) ← `overrides` ({"section.key": value}); see the module doc.

    Raises ConfigError (a UserError) naming the key and the file for unknown keys, wrong types and values
    outside a key's allowed set.
    """
    layers: dict[str, dict[str, _Value]] = {section: {} for section in SECTIONS}
    _merge_file(layers, _read_toml(Path(default_path)), str(default_path), PROJECT_ROOT)
    if path is not None:
        _merge_file(layers, _read_toml(Path(path)), str(path), PROJECT_ROOT)
    _merge_overrides(layers, dict(overrides or {}), Path(cwd) if cwd is not None else Path.cwd())
    return _build(layers)


def dotted_overrides(items: Iterable[str]) -> dict[str, str]:
    """["server.port=9000", "output.targets=webrtc,file"] → {"server.port": "9000", ...} (values stay text;
    load_config converts them to each key's type). Later items win."""
    result: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[a-z_]+\.[a-z_]+", key):
            raise ConfigError(f"bad override {item!r}: expected SECTION.KEY=VALUE, e.g. server.port=9000")
        result[key] = value
    return result


# --------------------------------------------------------------------------- printing
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        # JSON string escapes are a subset of TOML basic-string escapes.
        return json.dumps(os.fspath(value), ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def config_to_toml(config: Config) -> str:
    """The effective configuration as TOML (for --print-config); loading it back gives an equal Config."""
    lines = ["# pcavs-live effective configuration (paths resolved). Usable as --config FILE."]
    for section in SECTIONS:
        lines.append("")
        lines.append(f"[{section}]")
        part = getattr(config, section)
        for f in fields(part):
            lines.append(f"{f.name} = {_toml_value(getattr(part, f.name))}")
    return "\n".join(lines) + "\n"
