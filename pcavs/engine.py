"""Per-frame PC-AVS engine: one identity encoded once, one generator pass per frame.

The upstream `inference()` re-encodes the identity for every batch and runs the generator twice (the
reference-pose output is computed and thrown away). A live avatar only needs, per frame, the audio
encoder on a 20-row mel window, a 12-d pose code (computed by the pose worker at its own rate), and
one generator pass. Everything that depends on the photo alone is computed in `Avatar.__init__`:
the identity feature, the generator's start map, the photo's own pose, and the identity part of every
generator layer's style modulation (so a frame only pays for its 512 mouth/pose style columns).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from pcavs.checkpoints import PcavsNetworks
from pcavs.constants import MOUTH_DIM, POSE_DIM
from pcavs.networks.generator import IdentityStyle

NoiseMode = Literal["fixed", "random", "zero"]
DEFAULT_MOUTH_WEIGHT = 1.2  # hard-coded default of upstream inference(), spec §3.5


@dataclass(frozen=True)
class EngineOptions:
    """How the networks run. `noise="fixed"` draws one noise set per session: steadier video than the
    upstream's fresh noise every call, which shimmers frame to frame in proportion to the learned noise
    weights (spec §9.9)."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    noise: NoiseMode = "fixed"
    noise_seed: int = 0
    mouth_weight: float = DEFAULT_MOUTH_WEIGHT


@dataclass
class StageTimes:
    """Milliseconds spent per stage of one `render` call (for metrics and benchmarks)."""

    audio_ms: float = 0.0
    generator_ms: float = 0.0
    convert_ms: float = 0.0


def to_uint8_frames(images: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) in [-1,1] → (B,H,W,3) uint8, truncating like upstream `tensor2im` (spec §6), so frames
    are bit-comparable with the original's saved JPEG inputs."""
    x = (images.float() + 1.0) / 2.0 * 255.0
    x = x.clamp_(0.0, 255.0).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


class NoiseBank:
    """Generator noise per the session's policy. Fixed noise is drawn once with a seeded generator so a
    session's video is reproducible and does not shimmer."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], mode: NoiseMode, seed: int, device: str,
                 dtype: torch.dtype) -> None:
        self._shapes = [tuple(s) for s in shapes]
        self._mode = mode
        self._device, self._dtype = device, dtype
        self._rng = torch.Generator(device="cpu").manual_seed(seed)
        self._fixed = self._draw(1) if mode == "fixed" else None

    def _draw(self, batch: int) -> list[torch.Tensor]:
        return [torch.randn((batch, *s[1:]), generator=self._rng).to(self._device, self._dtype)
                for s in self._shapes]

    def for_batch(self, batch: int) -> list[torch.Tensor] | None:
        if self._mode == "zero":
            return None
        if self._mode == "fixed":
            return self._fixed  # (1,1,s,s) broadcasts over the batch
        return self._draw(batch)


class Avatar:
    """One identity photo, encoded once; renders frames from mel windows and pose codes."""

    def __init__(self, networks: PcavsNetworks, identity_input: torch.Tensor,
                 options: EngineOptions = EngineOptions()) -> None:
        """`identity_input`: (3,224,224) float in [-1,1], the photo already through
        `pcavs.preprocess.to_network_input` (spec §5)."""
        self.networks = networks
        self.options = options
        self.device, self.dtype = options.device, options.dtype
        with torch.inference_mode():
            img = identity_input.to(self.device, self.dtype).unsqueeze(0)
            id_feature, id_map = networks.identity(img)
            self.id_feature = id_feature[0]          # (2048,)
            self.id_map = id_map[0]                  # (512,7,7) generator start tensor
            self.reference_pose = networks.pose.pose_code(img)[0]  # (12,) the photo's own head pose
            self.identity_style: IdentityStyle = networks.generator.precompute_style(id_feature)
        self.noise = NoiseBank(networks.generator.noise_shapes(), options.noise, options.noise_seed,
                               self.device, self.dtype)

    # ----------------------------------------------------------------- per-frame pieces
    @torch.inference_mode()
    def pose_code(self, pose_input: torch.Tensor) -> np.ndarray:
        """12-d pose code of one pose crop ((3,224,224) in [-1,1]); called by the pose worker thread."""
        img = pose_input.to(self.device, self.dtype).unsqueeze(0)
        return self.networks.pose.pose_code(img)[0].float().cpu().numpy()

    @torch.inference_mode()
    def mouth_codes(self, mel_windows: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B,1,80,20) mel windows → (B,500) mouth codes (audio encoder ×mouth_weight → mouth_embed)."""
        mels = torch.as_tensor(mel_windows).to(self.device, self.dtype)
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
            pose = torch.as_tensor(np.asarray(pose_codes, dtype=np.float32)).reshape(batch, POSE_DIM)
            pose = pose.to(self.device, self.dtype)
        return torch.cat([mouth.reshape(batch, MOUTH_DIM), pose], dim=1)

    # ----------------------------------------------------------------- whole frames
    @torch.inference_mode()
    def render(self, mel_windows: torch.Tensor | np.ndarray,
               pose_codes: torch.Tensor | np.ndarray | None = None,
               times: StageTimes | None = None,
               noise: Sequence[torch.Tensor] | None = None) -> np.ndarray:
        """B frames in one pass: (B,1,80,20) mel windows (+ (B,12) pose codes) → (B,224,224,3) uint8 RGB.
        `noise` overrides the session's noise policy (11 tensors, see ModulatedGenerator.noise_shapes);
        it exists so the engine can be checked against the oracle's recorded noise."""
        t0 = time.perf_counter()
        rest = self.frame_style(self.mouth_codes(mel_windows), pose_codes)
        t1 = time.perf_counter()
        if noise is None:
            noise = self.noise.for_batch(rest.shape[0])
        else:
            noise = [torch.as_tensor(n).to(self.device, self.dtype) for n in noise]
        images = generate(self.networks, self.identity_style, rest, self.id_map[None], noise)
        t2 = time.perf_counter()
        frames = to_uint8_frames(images)
        if times is not None:
            times.audio_ms += (t1 - t0) * 1e3
            times.generator_ms += (t2 - t1) * 1e3
            times.convert_ms += (time.perf_counter() - t2) * 1e3
        return frames


@torch.inference_mode()
def generate(networks: PcavsNetworks, identity_style: IdentityStyle, rest: torch.Tensor, start: torch.Tensor,
             noise: Sequence[torch.Tensor] | None) -> torch.Tensor:
    """One generator pass for any mix of frames: rows of `identity_style`/`rest`/`start` may come from
    different avatars, which is how several sessions share one GPU step (see `render_sessions`); a
    batch of 1 in the identity parts broadcasts over the frames."""
    out = networks.generator.forward_cached(identity_style, rest, start, noise)
    if rest.device.type == "cuda":
        torch.cuda.synchronize(rest.device)
    return out


@dataclass
class SessionRequest:
    """One session's frame due on this tick."""

    avatar: Avatar
    mel_window: np.ndarray           # (1,80,20)
    pose_code: np.ndarray | None = None
    result: np.ndarray | None = field(default=None, init=False)


@torch.inference_mode()
def render_sessions(requests: Sequence[SessionRequest]) -> list[np.ndarray]:
    """Cross-session batching: every session due on this tick in one generator pass. All avatars must
    share the same networks (same checkpoint, device and dtype). Noise: each session's own bank."""
    if not requests:
        return []
    networks = requests[0].avatar.networks
    if any(r.avatar.networks is not networks for r in requests):
        raise ValueError("render_sessions: all avatars must share one PcavsNetworks instance")
    rests, starts, noises = [], [], []
    for r in requests:
        mouth = r.avatar.mouth_codes(np.asarray(r.mel_window)[None])
        rests.append(r.avatar.frame_style(mouth, None if r.pose_code is None else r.pose_code[None]))
        starts.append(r.avatar.id_map[None])
        noises.append(r.avatar.noise.for_batch(1))
    identity_style = IdentityStyle.stack([r.avatar.identity_style for r in requests])
    if all(n is None for n in noises):
        noise = None
    else:
        ref = next(n for n in noises if n is not None)
        noise = [torch.cat([(n[i] if n is not None else torch.zeros_like(ref[i])) for n in noises])
                 for i in range(len(ref))]
    frames = to_uint8_frames(generate(networks, identity_style, torch.cat(rests), torch.cat(starts), noise))
    for r, f in zip(requests, frames):
        r.result = f
    return list(frames)
