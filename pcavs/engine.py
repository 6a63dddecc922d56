"""Per-frame PC-AVS engine: one identity encoded once, one generator pass per frame.

The upstream `inference()` re-encodes the identity for every batch and runs the generator twice (the
reference-pose output is computed and thrown away). A live avatar only needs, per frame, the audio
encoder on a 20-row mel window, a 12-d pose code (computed by the pose worker at its own rate), and
one generator pass. Everything that depends on the photo alone is computed in `Avatar.__init__`:
the identity feature, the generator's start map, the photo's own pose, and the identity part of every
generator layer's style modulation (so a frame only pays for its 512 mouth/pose style columns). Those
per-photo tensors are registered in the `RenderRuntime` (pcavs/runtime.py) the avatar belongs to (one
per loaded networks, made by whoever builds sessions), so one avatar's batch and a tick of many
sessions (`render_sessions`) go through the same vectorised path: one audio pass, one generator pass,
CUDA graphs on a GPU.

Precision: the encoders run in float32 and only the generator in the model dtype; the style and start
map are cast at the generator's boundary. A frame with a non-finite value is never returned: the
avatar's last good frame is held in its place and `Avatar.frames_nonfinite` counts it.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from pcavs.checkpoints import PcavsNetworks
from pcavs.constants import MOUTH_DIM, POSE_DIM, NoiseMode
from pcavs.gpu import download, upload
from pcavs.networks.generator import IdentityStyle
from pcavs.preprocess import to_network_input
from pcavs.runtime import PendingRender, RenderRuntime, RowBatch, frames_on_device

__all__ = ["Avatar", "DEFAULT_MOUTH_WEIGHT", "EngineOptions", "NoiseBank", "NoiseMode", "SessionRequest", "StageTimes",
           "encode_poses", "PendingSessions", "render_sessions", "submit_sessions", "to_uint8_frames", "warm_up"]

DEFAULT_MOUTH_WEIGHT = 1.2  # hard-coded default of upstream inference(), spec §3.5
_ENCODER_DTYPE = torch.float32


@dataclass(frozen=True)
class EngineOptions:
    """How an avatar renders. `noise="fixed"` draws one noise set per session: steadier video than the
    upstream's fresh noise every call, which shimmers frame to frame in proportion to the learned noise
    weights (spec §9.9). `dtype` records the model dtype the networks were loaded in (the generator's;
    the encoders are float32 whatever it says)."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    noise: NoiseMode = "fixed"
    noise_seed: int = 0
    mouth_weight: float = DEFAULT_MOUTH_WEIGHT


@dataclass
class StageTimes:
    """Milliseconds spent per stage of one `render` call (for metrics and benchmarks). CUDA: GPU time
    between events on the render stream; CPU: wall time. With CUDA graphs "audio" also holds the
    uploads and the identity gathers, and "generator" the uint8 conversion."""

    audio_ms: float = 0.0
    generator_ms: float = 0.0
    convert_ms: float = 0.0

    def add(self, totals: dict[str, float]) -> None:
        self.audio_ms += totals.get("audio", 0.0)
        self.generator_ms += totals.get("generator", 0.0)
        self.convert_ms += totals.get("convert", 0.0)


def to_uint8_frames(images: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) in [-1,1] → (B,H,W,3) uint8, truncating like upstream `tensor2im` (spec §6), so frames
    are bit-comparable with the original's saved JPEG inputs. Converted on the images' device (4x fewer
    bytes to download). Non-finite rows come out arbitrary: the engine checks them (`frames_on_device`)."""
    frames, _ = frames_on_device(images)
    return download([frames])[0]


class NoiseBank:
    """Generator noise per the session's policy, drawn on the device with a seeded device generator
    (no host→device copy). Fixed noise is drawn once so a session's video is reproducible (per device:
    CPU and CUDA generators draw different numbers) and does not shimmer."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], mode: NoiseMode, seed: int, device: str,
                 dtype: torch.dtype) -> None:
        self._shapes = [tuple(s) for s in shapes]
        self.mode = mode
        self._device, self._dtype = device, dtype
        self._rng = torch.Generator(device=device).manual_seed(seed)
        self._fixed = self._draw(1) if mode == "fixed" else None

    def _draw(self, batch: int) -> list[torch.Tensor]:
        return [torch.randn((batch, *s[1:]), generator=self._rng, device=self._device,
                            dtype=torch.float32).to(self._dtype) for s in self._shapes]

    @property
    def fixed(self) -> list[torch.Tensor] | None:
        """The session's own noise (mode "fixed"), else None."""
        return self._fixed

    def for_batch(self, batch: int) -> list[torch.Tensor] | None:
        if self.mode == "zero":
            return None
        if self.mode == "fixed":
            return self._fixed  # (1,1,s,s) broadcasts over the batch
        return self._draw(batch)


class Avatar:
    """One identity photo, encoded once; renders frames from mel windows and pose codes. It belongs to
    `runtime` (its networks, identity bank and render stream), shared with every other avatar of it."""

    def __init__(self, runtime: RenderRuntime, identity_input: torch.Tensor,
                 options: EngineOptions = EngineOptions()) -> None:
        """`identity_input`: (3,224,224) float in [-1,1], the photo already through
        `pcavs.preprocess.to_network_input` (spec §5). Encoded on the runtime's identity stream, so a
        joining session never holds up the render stream."""
        if not isinstance(runtime, RenderRuntime):
            raise TypeError(f"Avatar needs a RenderRuntime (RenderRuntime(networks)), got {type(runtime).__name__}")
        networks = runtime.networks
        self.networks = networks
        self.options = options
        self.runtime = runtime
        self.device = options.device
        self.dtype = _ENCODER_DTYPE  # what the encoders take; the generator's is networks.generator_dtype
        self.generator_dtype = networks.generator_dtype
        with torch.inference_mode(), runtime.identity_scope():
            img = upload(torch.as_tensor(identity_input), self.device, _ENCODER_DTYPE).unsqueeze(0)
            id_feature, id_map = networks.identity(img)
            self.id_feature = id_feature[0]          # (2048,) float32
            self.id_map = id_map[0]                  # (512,7,7) generator start tensor, float32
            self.reference_pose = networks.pose.pose_code(img)[0]  # (12,) the photo's own head pose
            self.identity_style: IdentityStyle = networks.generator.precompute_style(id_feature)
            self.noise = NoiseBank(networks.generator.noise_shapes(), options.noise, options.noise_seed,
                                   self.device, self.generator_dtype)
            self.reference_pose_np = download([self.reference_pose.float()])[0].copy()
            # Until the first good frame, a non-finite one is replaced by the photo as the networks saw it.
            size = networks.generator.size
            shown = img if img.shape[-1] == size else torch.nn.functional.interpolate(img, size=(size, size),
                                                                                      mode="area")
            self.placeholder: np.ndarray = to_uint8_frames(shown)[0]
            self._last_good = self.placeholder
            self.slot = runtime.add_identity(self.identity_style, self.id_map, self.noise.fixed)
        self._release = weakref.finalize(self, self.runtime.release, self.slot)
        self.frames_nonfinite = 0

    def close(self) -> None:
        """Free the avatar's slot in the shared identity bank (also done when it is garbage-collected)."""
        self._release()

    # ----------------------------------------------------------------- per-frame pieces
    @torch.inference_mode()
    def pose_code(self, pose_input: torch.Tensor) -> np.ndarray:
        """12-d pose code of one pose crop ((3,224,224) in [-1,1]); called by the pose worker thread."""
        return encode_poses(self.networks, torch.as_tensor(pose_input)[None])[0]

    @torch.inference_mode()
    def mouth_codes(self, mel_windows: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B,1,80,20) mel windows → (B,500) mouth codes (audio encoder ×mouth_weight → mouth_embed)."""
        mels = upload(_host_mels(mel_windows), self.device, _ENCODER_DTYPE)
        audio_feature = self.networks.audio(mels)
        return self.networks.pose.mouth_code(audio_feature * self.options.mouth_weight)

    def frame_style(self, mouth: torch.Tensor, pose_codes: torch.Tensor | np.ndarray | None) -> torch.Tensor:
        """The per-frame part of the style, [mouth 500 | pose 12] (B, 512): the full style of spec §3.5
        is [identity 2048 | this], and the identity part is already in `identity_style`. No pose → the
        photo's own pose."""
        batch = mouth.shape[0]
        if pose_codes is None:
            pose = self.reference_pose.expand(batch, POSE_DIM)
        else:
            pose = upload(np.asarray(pose_codes, dtype=np.float32).reshape(batch, POSE_DIM), self.device)
        return torch.cat([mouth.reshape(batch, MOUTH_DIM).float(), pose.float()], dim=1)

    def pose_rows(self, pose_codes: np.ndarray | torch.Tensor | None, n: int) -> np.ndarray:
        """(n,12) float32 pose codes: the given ones, or the photo's own pose."""
        if pose_codes is None:
            return np.broadcast_to(self.reference_pose_np, (n, POSE_DIM))
        if isinstance(pose_codes, torch.Tensor):
            pose_codes = download([pose_codes.float()])[0]
        return np.asarray(pose_codes, dtype=np.float32).reshape(n, POSE_DIM)

    # ----------------------------------------------------------------- whole frames
    def render(self, mel_windows: torch.Tensor | np.ndarray,
               pose_codes: torch.Tensor | np.ndarray | None = None,
               times: StageTimes | None = None,
               noise: Sequence[torch.Tensor] | None = None) -> np.ndarray:
        """B frames in one pass: (B,1,80,20) mel windows (+ (B,12) pose codes) → (B,224,224,3) uint8 RGB.
        `noise` overrides the session's noise policy (11 tensors, see ModulatedGenerator.noise_shapes);
        it exists so the engine can be checked against the oracle's recorded noise."""
        mels = _host_mels(mel_windows)
        n = mels.shape[0]
        rows = RowBatch(slots=np.full(n, self.slot, np.int64), mels=mels, poses=self.pose_rows(pose_codes, n),
                        mouth_weights=np.full(n, self.options.mouth_weight, np.float32),
                        random_noise=np.full(n, self.options.noise == "random"))
        out = self.runtime.render(rows, noise)
        if times is not None:
            times.add(out.stage_ms)
        return _hold_nonfinite(out.frames, out.finite, [self] * n)

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> list[int]:
        """Prepare every batch size the caller will render (autotuning, CUDA graphs) before a live clock
        starts; a no-op on the CPU. Returns the batch shapes prepared."""
        return self.runtime.warm_up(batch_sizes, slot=self.slot)


def _host_mels(mel_windows: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(mel_windows, torch.Tensor):
        mel_windows = download([mel_windows.detach().float()])[0]
    mels = np.asarray(mel_windows, dtype=np.float32)
    return mels.reshape(mels.shape[0], 1, *mels.shape[-2:])


def _hold_nonfinite(frames: np.ndarray, finite: np.ndarray, avatars: Sequence[Avatar]) -> np.ndarray:
    """Rows with a non-finite value are replaced by their avatar's last good frame (counted in
    `frames_nonfinite`); every avatar remembers its newest good frame."""
    if not finite.all():
        frames = frames.copy()
        for i in np.flatnonzero(~finite):
            avatar = avatars[i]
            avatar.frames_nonfinite += 1
            frames[i] = avatar._last_good
            finite[i] = True  # a held frame is good for the rows after it
    for avatar, frame in zip(avatars, frames):
        avatar._last_good = frame
    return frames


@dataclass
class SessionRequest:
    """One session's frame due on this tick."""

    avatar: Avatar
    mel_window: np.ndarray           # (1,80,20)
    pose_code: np.ndarray | None = None
    result: np.ndarray | None = field(default=None, init=False)


def render_sessions(requests: Sequence[SessionRequest], times: StageTimes | None = None) -> list[np.ndarray]:
    """Cross-session batching: every session due on this tick in one audio pass and one generator pass
    (CUDA graphs on a GPU). All avatars must belong to one `RenderRuntime`. Each row keeps its own
    identity, pose, mouth weight and noise policy; Python only assembles
    the host arrays (no per-session tensor work). `submit_sessions(...).result()`."""
    return submit_sessions(requests).result(times)


class PendingSessions:
    """Sessions' rows queued by `submit_sessions`; `result()` waits for their frames (once)."""

    def __init__(self, requests: Sequence[SessionRequest], pending: PendingRender | None) -> None:
        self._requests, self._pending = list(requests), pending
        self._out: list[np.ndarray] | None = [] if pending is None else None

    def ready(self) -> bool:
        return self._pending is None or self._pending.ready()

    def result(self, times: StageTimes | None = None) -> list[np.ndarray]:
        if self._out is None:
            assert self._pending is not None
            rendered = self._pending.result()
            if times is not None:
                times.add(rendered.stage_ms)
            avatars = [r.avatar for r in self._requests]
            self._out = list(_hold_nonfinite(rendered.frames, rendered.finite, avatars))
            for r, f in zip(self._requests, self._out):
                r.result = f
        return self._out


def submit_sessions(requests: Sequence[SessionRequest]) -> PendingSessions:
    """`render_sessions` in two phases: returns once the rows are queued on the device (the host may
    prepare the next tick meanwhile); `.result(times)` waits for the frames. Off CUDA the render runs
    here."""
    if not requests:
        return PendingSessions([], None)
    runtime = requests[0].avatar.runtime
    if any(r.avatar.runtime is not runtime for r in requests):
        raise ValueError("render_sessions: all avatars must belong to one RenderRuntime")
    n = len(requests)
    avatars = [r.avatar for r in requests]
    rows = RowBatch(
        slots=np.fromiter((a.slot for a in avatars), np.int64, n),
        mels=np.stack([np.asarray(r.mel_window, np.float32).reshape(1, *np.shape(r.mel_window)[-2:])
                       for r in requests]),
        poses=np.stack([r.avatar.reference_pose_np if r.pose_code is None
                        else np.asarray(r.pose_code, np.float32).reshape(POSE_DIM) for r in requests]),
        mouth_weights=np.fromiter((a.options.mouth_weight for a in avatars), np.float32, n),
        random_noise=np.fromiter((a.options.noise == "random" for a in avatars), bool, n))
    return PendingSessions(requests, runtime.submit(rows))


def warm_up(runtime: RenderRuntime, batch_sizes: Sequence[int], force: bool = False) -> list[int]:
    """Engine-level warm-up (the studio: every session count it will batch). See `RenderRuntime.warm_up`."""
    return runtime.warm_up(batch_sizes, force=force)


@torch.inference_mode()
def encode_poses(networks: PcavsNetworks, crops: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> np.ndarray:
    """Pose codes of several pose frames in ONE pose-encoder pass: (N,224,224,3) uint8 aligned crops
    (any mix of sessions) or (N,3,224,224) network inputs → (N,12) float32. Runs on the calling
    thread's current stream (a pose worker's low-priority one: `pcavs.gpu.WorkerStream`) and waits on
    that stream only."""
    if isinstance(crops, torch.Tensor) and crops.dim() == 4 and crops.shape[1] == 3:
        batch = crops
    else:
        arr = np.asarray(crops)
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"encode_poses expects (N,224,224,3) uint8 crops or (N,3,224,224) inputs, "
                             f"got shape {arr.shape}")
        batch = torch.stack([to_network_input(c) for c in arr])
    if batch.shape[0] == 0:
        return np.zeros((0, POSE_DIM), np.float32)
    x = upload(batch, networks.device, _ENCODER_DTYPE)
    return download([networks.pose.pose_code(x).float()])[0]
