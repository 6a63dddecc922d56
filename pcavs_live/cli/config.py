"""Configuration: configs/default.toml, an optional user file on top, command-line overrides on top of that.

Why one TOML file with every key: the defaults are documented where they live, `--print-config` output is
itself a valid config file, and a typo in a user file is caught (unknown key → error naming key and file)
instead of being silently ignored. The result is a tree of frozen dataclasses so that the rest of the
program reads typed attributes (`config.server.port`) and never a string-keyed dict.

One table: each key is one line in default.toml (its default and its documentation) plus one dataclass
field below (its type and rules). The field's type is the whole truth about its allowed values —
`Literal["a", "b"]` for a word from a fixed set — and both the validation here and the command line's
`choices` (`cli_options`) are derived from it, so a new value or a new key is never restated elsewhere.
A field whose metadata names a `flag` also gets its own command-line option.

Types a field may have (the loader understands exactly these):
  str, int, float, bool, Path            a value of that TOML type (Path: resolved, see below)
  Literal["a", "b"]                      one of the words
  Literal["a", "b"] | Path               one of the words, or else a path
  tuple[Literal["a", "b"], ...]          a list of the words (duplicates dropped)
  str | None, Literal[...] | None        "" means none and is loaded as None (TOML has no null); printed as ""

Layering: `load_config(path, overrides)` starts from default.toml (which must define every key), merges the
keys present in `path` (partial files are fine), then `overrides`: a flat {"section.key": value} dict,
e.g. from `dotted_overrides(["server.port=9000"])` or built by the CLI from its options (None values are
skipped, so argparse defaults can be passed as they are). String override values are converted to the
key's type ("9000" → 9000, "webrtc,file" → ["webrtc", "file"]); values from files must have the right
TOML type already.

Relative paths in files are relative to the project root (`pcavs_live.cli.paths.HOME_DIR`: the checkout, or a per-user
folder for an installed package, where a path that is not there falls back to the bundled file of that name);
relative paths in overrides are relative to the current directory (that is what a user typing
`--identity me.jpg` means). Loaded configs hold absolute paths.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from pcavs_live.cli.paths import BUNDLED_ROOT, HOME_DIR
from pcavs_live.common.errors import UserError

PROJECT_ROOT = BUNDLED_ROOT  # the folder holding configs/ and assets/: the checkout, or the installed packages'
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "configs" / "default.toml"
SAMPLE_DIR = PROJECT_ROOT / "assets" / "sample"
SAMPLE_PHOTO = SAMPLE_DIR / "astronaut.png"
SAMPLE_SPEECH = SAMPLE_DIR / "speech.wav"
OVERRIDES_ORIGIN = "command-line overrides"

# --------------------------------------------------------------------------- allowed values (typed once)
Dtype = Literal["auto", "float32", "float16", "bfloat16"]
NoiseMode = Literal["fixed", "random", "zero"]          # the engine's own NoiseMode; a test keeps them equal
GainMode = Literal["running", "file", "none"]
AudioKeyword = Literal["sample", "mic"]
PoseKeyword = Literal["still", "webcam", "none"]
OutputTarget = Literal["webrtc", "vcam", "vmic", "file"]
Framing = Literal["paste", "fit"]
VcamBackend = Literal["v4l2loopback", "obs", "unitycapture"]

AUDIO_KEYWORDS: tuple[str, ...] = typing.get_args(AudioKeyword)
POSE_KEYWORDS: tuple[str, ...] = typing.get_args(PoseKeyword)
OUTPUT_TARGETS: tuple[str, ...] = typing.get_args(OutputTarget)


class ConfigError(UserError):
    """A config file or override is wrong; the message names the key and where it came from."""


# --------------------------------------------------------------------------- schema
def _spec(**rules: Any) -> Any:
    """A required dataclass field with rules in its metadata. Defaults live in default.toml, not here, so
    that there is exactly one place to change them.

    Value rules: pattern (+ expect, the words for the error), min, max, below (exclusive max), nonempty.
    Command line: flag ("--name": the key gets its own option), metavar, help."""
    return field(metadata=rules)


@dataclass(frozen=True)
class ModelConfig:
    checkpoint_dir: Path = _spec(flag="--checkpoints", metavar="DIR",
                                 help="folder with latest_net_{G,V,E,A_sync}.pth")
    checkpoint_url: str = _spec()
    device: str = _spec(pattern=r"auto|cpu|mps|cuda(:\d+)?", expect="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'",
                        flag="--device", help="auto, cpu, cuda, cuda:N or mps")
    dtype: Dtype = _spec(flag="--dtype", help="generator precision: auto = bfloat16 on CUDA GPUs of compute "
                         "capability 8.0+ and on CPUs with native bf16 (AVX512-BF16, AMX), else float32")
    noise: NoiseMode = _spec(flag="--noise", help="generator noise: one draw per session, fresh per frame, or none")
    noise_seed: int = _spec()
    mouth_weight: float = _spec(min=0.0)


@dataclass(frozen=True)
class AudioConfig:
    source: AudioKeyword | Path = _spec(flag="--audio", metavar="FILE", help="what drives the mouth")
    device: str | None = _spec(flag="--audio-device", metavar="NAME|INDEX", help="microphone (see --list-devices)")
    gain: GainMode = _spec()

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
    source: PoseKeyword | Path = _spec(flag="--pose", metavar="VIDEO", help="what drives the head pose")
    webcam_index: int = _spec(min=0, flag="--webcam-index", metavar="N", help="webcam for --pose webcam")
    smoothing: float = _spec(min=0.0, below=1.0)
    rate_hz: float = _spec(min=1.0, max=60.0)

    @property
    def video_path(self) -> Path | None:
        """The pose video file, or None when the source is one of the keywords."""
        return None if self.source in POSE_KEYWORDS else Path(self.source)


@dataclass(frozen=True)
class OutputConfig:
    targets: tuple[OutputTarget, ...] = _spec(nonempty=True)  # the command line's --out sets both keys
    file: Path = _spec()
    size: str = _spec(pattern=r"auto|native|[1-9]\d*x[1-9]\d*",
                      expect="'auto', 'native' or WIDTHxHEIGHT such as '640x480'",
                      flag="--size", metavar="auto|native|WxH", help="picture size, e.g. 640x480 or 1280x720")
    framing: Framing = _spec(flag="--framing",
                             help="paste: the face back into the photo; fit: the face crop scaled to the size")


@dataclass(frozen=True)
class ServerConfig:
    host: str = _spec(nonempty=True, flag="--host", help="WebRTC viewer address")
    port: int = _spec(min=0, max=65535, flag="--port", help="WebRTC viewer port (0: any free port)")
    token: str | None = _spec(flag="--token", help="viewer token (required when --host is not loopback)")
    ice_host_addresses: tuple[str, ...] = _spec()
    stun_url: str | None = _spec(pattern=r"stuns?:.+", expect="'' or a 'stun:HOST[:PORT]' URL")
    turn_url: str | None = _spec(pattern=r"turns?:.+", expect="'' or a 'turn:HOST[:PORT][?transport=udp|tcp]' URL")
    turn_username: str | None = _spec()
    turn_credential: str | None = _spec()
    max_sessions: int = _spec(min=1)  # the studio (run_live.py serve --max-sessions)


@dataclass(frozen=True)
class VcamConfig:
    device: str | None = _spec(flag="--vcam-device", metavar="DEVICE", help="virtual camera, e.g. /dev/video10")
    backend: VcamBackend | None = _spec()


@dataclass(frozen=True)
class VmicConfig:
    device: str | None = _spec()
    preroll_ms: float = _spec(min=0.0, max=500.0)


@dataclass(frozen=True)
class IdentityConfig:
    photo: Path = _spec(flag="--identity", metavar="PHOTO", help="photo of the face to animate")


@dataclass(frozen=True)
class TimingConfig:
    upstream_frame_numbering: bool = _spec()


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
    timing: TimingConfig


_SECTION_TYPES = typing.get_type_hints(Config)
SECTIONS: dict[str, type] = {f.name: _SECTION_TYPES[f.name] for f in fields(Config)}


# --------------------------------------------------------------------------- reading a field's type
@dataclass(frozen=True)
class _Kind:
    """What a field's type hint means to the loader (see the module doc for the supported forms)."""

    base: Any                          # str, int, float, bool, Path, or tuple[str, ...] for a list of words
    words: tuple[str, ...] = ()        # the Literal's values: the allowed words
    or_path: bool = False              # a word, or else a path
    optional: bool = False             # "" means none → None

    @property
    def raw(self) -> Any:
        """The TOML / override type the value arrives as."""
        return str if self.or_path else self.base


def _kind(hint: Any) -> _Kind:
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    optional = type(None) in args
    rest = [a for a in args if a is not type(None)]
    or_path = len(rest) == 2 and Path in rest
    if or_path:
        rest.remove(Path)
    if len(rest) != 1:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported config type {hint}")
    base = rest[0]
    if typing.get_origin(base) is Literal:
        return _Kind(str, typing.get_args(base), or_path, optional)
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        words = typing.get_args(item) if typing.get_origin(item) is Literal else ()
        return _Kind(tuple[str, ...], words, False, optional)
    if or_path or base not in (str, int, float, bool, Path):  # pragma: no cover - a schema bug
        raise TypeError(f"unsupported config type {hint}")
    return _Kind(base, (), False, optional)


def _field_kinds(cls: type) -> dict[str, _Kind]:
    hints = typing.get_type_hints(cls)
    return {f.name: _kind(hints[f.name]) for f in fields(cls)}


_KINDS: dict[str, dict[str, _Kind]] = {section: _field_kinds(cls) for section, cls in SECTIONS.items()}


def allowed_words(key: str) -> tuple[str, ...]:
    """The words a key accepts ("model.dtype" → ("auto", "float32", "float16", "bfloat16")); () for free values."""
    section, _, name = key.partition(".")
    return _KINDS[section][name].words


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


def _resolve_path(text: str, base_dir: Path, bundled_fallback: bool = False) -> Path:
    path = Path(text).expanduser()
    resolved = Path(os.path.normpath(path if path.is_absolute() else base_dir / path))
    if bundled_fallback and not path.is_absolute() and not resolved.exists() and (BUNDLED_ROOT / path).exists():
        return Path(os.path.normpath(BUNDLED_ROOT / path))  # e.g. the installed sample photo (see pcavs_live.cli.paths)
    return resolved


def _quoted(words: Iterable[str]) -> str:
    return ", ".join(repr(w) for w in words)


def _validate(key: str, value: Any, kind: _Kind, rules: dict[str, Any], raw: _Value) -> Any:
    """Apply a field's type-derived words and its rules; returns the final value (paths resolved, list
    entries de-duplicated). The caller has already turned an optional key's "" into None."""
    where = f"{key} in {raw.origin}"
    if kind.words and kind.base is str:
        if value in kind.words:
            return value
        if kind.or_path:
            if not value.strip():
                words = ", ".join(repr(w) for w in kind.words)
                raise ConfigError(f"{where}: expected {words} or a file path, got an empty string")
            return _resolve_path(value, raw.base_dir, not raw.from_override)
        allowed = _quoted(("",) + kind.words if kind.optional else kind.words)
        raise ConfigError(f"{where}: expected one of {allowed}, got {value!r}")
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
    if kind.words:  # a list of words
        for item in value:
            if item not in kind.words:
                raise ConfigError(f"{where}: unknown entry {item!r}; expected any of {_quoted(kind.words)}")
        value = tuple(dict.fromkeys(value))
    if kind.base is Path:
        value = _resolve_path(value, raw.base_dir, not raw.from_override)
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
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = f"{section}.{f.name}"
            raw = layers[section].get(f.name)
            if raw is None:
                raise ConfigError(f"{key} is missing from {DEFAULT_CONFIG_PATH}",
                                  hint="restore configs/default.toml from the repository")
            kind = _KINDS[section][f.name]
            value = _check_type(key, kind.raw, raw)
            if kind.optional and value == "":
                kwargs[f.name] = None  # the one place where "" becomes "none"
                continue
            kwargs[f.name] = _validate(key, value, kind, dict(f.metadata), raw)
        sections[section] = cls(**kwargs)
    return Config(**sections)


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None, *,
                default_path: Path = DEFAULT_CONFIG_PATH, cwd: Path | None = None) -> Config:
    """Defaults ← `path` (optional, partial) ← `overrides` ({"section.key": value}); see the module doc.

    Raises ConfigError (a UserError) naming the key and the file for unknown keys, wrong types and values
    outside a key's allowed set.
    """
    layers: dict[str, dict[str, _Value]] = {section: {} for section in SECTIONS}
    _merge_file(layers, _read_toml(Path(default_path)), str(default_path), HOME_DIR)
    if path is not None:
        _merge_file(layers, _read_toml(Path(path)), str(path), HOME_DIR)
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


# --------------------------------------------------------------------------- command-line options
@dataclass(frozen=True)
class CliOption:
    """A command-line option that sets one config key, derived from the field that declares its `flag`:
    `choices` are the field's Literal words, `type` converts numbers so that argparse itself rejects
    "--port x", and the metavar of a word-or-path key lists the words ("sample|mic|FILE")."""

    flag: str
    key: str                                   # "section.key"
    help: str | None
    metavar: str | None
    choices: tuple[str, ...] | None
    type: Callable[[str], Any] | None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def cli_options() -> list[CliOption]:
    """Every config key that has its own command-line option, in config order."""
    options = []
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            if "flag" not in f.metadata:
                continue
            kind = _KINDS[section][f.name]
            metavar = f.metadata.get("metavar")
            if kind.or_path:
                metavar = "|".join(kind.words + ((metavar,) if metavar else ()))
            choices = kind.words if kind.words and not kind.or_path else None
            options.append(CliOption(flag=f.metadata["flag"], key=f"{section}.{f.name}", help=f.metadata.get("help"),
                                     metavar=None if choices else metavar, choices=choices,
                                     type=kind.base if kind.base in (int, float) else None))
    return options


# --------------------------------------------------------------------------- printing
def _toml_value(value: Any) -> str:
    if value is None:
        return '""'  # how files spell "none" (TOML has no null); loads back as None
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
