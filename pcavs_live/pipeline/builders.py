"""The pieces every session is built from, shared by the CLI's one run and the studio's many.

A session is: an identity (`encode_identity`: the photo aligned and encoded once, on the one
`RenderRuntime` made from the networks `load_model_networks` loaded: `make_runtime`), an audio source and its `AudioTimeline`, a pose provider (`start_live_pose`, or
none for the photo's own pose), sinks, and the `Scheduler` that drives them
(`make_scheduler`, the one place a Scheduler is constructed). `pcavs_live.pipeline.session.SessionBuilder` builds
every session: from a Config and its local devices (the CLI's run), or with the browser's tracks as sources
and a `SharedRenderer` handle as its renderer (each studio session, `pcavs_live.pipeline.studio`).
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch

from capture.audio_sources import AudioSource
from pcavs.alignment import AlignedFace, FaceAligner, LandmarkDetector
from pcavs.checkpoints import PcavsNetworks, load_networks
from pcavs.device import cpu_bf16_support, describe_dtype, resolve_device_and_dtype
from pcavs.engine import Avatar, EngineOptions
from pcavs.runtime import RenderRuntime
from pcavs.preprocess import to_network_input
from pcavs_live.pipeline.engine_setup import prepare_engine, start_live_pose
from pcavs_live.pipeline.metrics import LiveMetrics
from pcavs_live.pipeline.options import ModelConfig
from pcavs_live.pipeline.scheduler import Renderer, Scheduler, SchedulerOptions
from pcavs_live.pipeline.timeline import AudioTimeline
from stream.sinks import FrameSink

__all__ = ["POSE_DETECT_MAX_SIDE", "encode_identity", "engine_options", "load_model_networks", "make_runtime",
           "make_scheduler", "prepare_engine", "start_live_pose"]

log = logging.getLogger(__name__)

# SFD at full size costs seconds per webcam frame on a CPU; 320 px is plenty for one close face.
POSE_DETECT_MAX_SIDE = 320


def engine_options(model: ModelConfig) -> EngineOptions:
    """The `[model]` section as EngineOptions (device resolved: "auto" → cuda or cpu)."""
    dtype_name = model.dtype
    device, dtype = resolve_device_and_dtype(model.device, dtype_name)  # one line for a device problem, before any
    # checkpoint is read; "auto" dtype: bf16 on sm_80+ GPUs and on CPUs with native bf16, float32 elsewhere
    if device == "cpu" and (dtype == torch.float16 or (dtype == torch.bfloat16 and not cpu_bf16_support().native)):
        log.warning("%s on this CPU runs on conversion or reference kernels (slower than float32: it has no "
                    "native %s); use --dtype auto", dtype_name, "float16" if dtype == torch.float16 else "bf16")
    return EngineOptions(device=device, dtype=dtype, noise=model.noise, noise_seed=model.noise_seed,
                         mouth_weight=model.mouth_weight)


def load_model_networks(model: ModelConfig, options: EngineOptions) -> PcavsNetworks:
    """The networks of `model.checkpoint_dir` on `options`' device and dtype, loaded once per process and
    device; every session's Avatar shares them."""
    return load_networks(model.checkpoint_dir, device=options.device, dtype=options.dtype)


def make_runtime(model: ModelConfig, options: EngineOptions) -> RenderRuntime:
    """The loaded networks' one `RenderRuntime`, which every session's Avatar of this process joins.
    Says which precision the generator runs in, and why (said here, once the inputs have been checked,
    so a bad photo or port is still the run's only line)."""
    log.info("generator on %s in %s", options.device, describe_dtype(model.dtype, options.device))
    return RenderRuntime(load_model_networks(model, options))


def encode_identity(runtime: RenderRuntime, options: EngineOptions, rgb: np.ndarray, name: str,
                    landmarks: np.ndarray | None = None,
                    detector: Callable[[], LandmarkDetector] | None = None) -> tuple[Avatar, AlignedFace]:
    """Align the photo (known landmarks, else the detector: `FaceNotFoundError` when it finds no face)
    and encode it once. Returns the Avatar and the aligned face: its 224² crop is the placeholder frame,
    its matrix places generated faces back into the photo."""
    aligner = FaceAligner(None if landmarks is not None or detector is None else detector())
    face = aligner.align_photo(rgb, name=name, landmarks=landmarks)
    return Avatar(runtime, to_network_input(face.image), options), face


def make_scheduler(audio: AudioSource, timeline: AudioTimeline, renderer: Renderer | Avatar, sink: FrameSink,
                   placeholder: np.ndarray, pose: Callable[[], np.ndarray | None] | None,
                   metrics: LiveMetrics, options: SchedulerOptions,
                   health_checks: Sequence[Callable[[], None]] = (),
                   on_frame: Callable[[int], None] | None = None) -> Scheduler:
    """The one place a `Scheduler` is constructed (CLI run and studio sessions alike), so a change of
    its constructor is adapted here only."""
    return Scheduler(audio, timeline, renderer, sink, placeholder=placeholder, pose=pose, metrics=metrics,
                     options=options, health_checks=health_checks, on_frame=on_frame)
