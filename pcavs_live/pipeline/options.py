"""The run's options: the typed sections a `Config` is made of, and the words each key allows.

Owned by the pipeline because the pipeline is what reads them (`Config` is the input of
`pcavs_live.pipeline.session.SessionBuilder`); `pcavs_live.cli.config` only loads them (default.toml,
--config FILE, --set, derived command-line options, printing). Components take their own section
(`engine_options(config.model)`, `ice_servers_for(config.server)`), never unpacked fields.

One table: each key is one line in configs/default.toml (its default and documentation) plus one field
here (its type and rules, in the field's metadata). A `Literal` type is the whole truth about a key's
allowed words: the loader's validation and the command line's choices are derived from it.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from pcavs.constants import NoiseMode

# The folder holding pcavs_live/, configs/ and assets/ (a checkout, or site-packages for a wheel); the
# same folder as pcavs_live.cli.paths.BUNDLED_ROOT (tests/test_config.py checks).
BUNDLED_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DIR = BUNDLED_ROOT / "assets" / "sample"
SAMPLE_PHOTO = SAMPLE_DIR / "astronaut.png"
SAMPLE_SPEECH = SAMPLE_DIR / "speech.wav"

# --------------------------------------------------------------------------- allowed values (typed once)
Dtype = Literal["auto", "float32", "float16", "bfloat16"]
GainMode = Literal["running", "file", "none"]
AudioKeyword = Literal["sample", "mic"]
PoseKeyword = Literal["still", "webcam", "none"]
OutputTarget = Literal["webrtc", "vcam", "vmic", "file", "whip"]
Framing = Literal["paste", "fit"]
VcamBackend = Literal["v4l2loopback", "obs", "unitycapture"]

AUDIO_KEYWORDS: tuple[str, ...] = typing.get_args(AudioKeyword)
POSE_KEYWORDS: tuple[str, ...] = typing.get_args(PoseKeyword)
OUTPUT_TARGETS: tuple[str, ...] = typing.get_args(OutputTarget)


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
class WhipConfig:
    endpoint: str | None = _spec(pattern=r"https?://.+", expect="'' or an http(s):// WHIP endpoint URL")
    token: str | None = _spec()
    viewer_url: str | None = _spec(pattern=r"https?://.+", expect="'' or the http(s):// URL the room's viewers open")


@dataclass(frozen=True)
class ClusterConfig:
    address: str | None = _spec()   # HOST:PORT of a Ray cluster's head; checked when serve connects


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
    whip: WhipConfig
    cluster: ClusterConfig
    identity: IdentityConfig
    timing: TimingConfig


_SECTION_TYPES = typing.get_type_hints(Config)
SECTIONS: dict[str, type] = {f.name: _SECTION_TYPES[f.name] for f in fields(Config)}

