"""The pieces every session is built from, shared by the CLI's one run and the studio's many.

A session is: an identity (`encode_identity`: the photo aligned and encoded once, sharing the networks
`load_engine` loaded), an audio source and its `AudioTimeline`, a pose provider (`start_pose_worker` +
`pose_provider`, or none for the photo's own pose), sinks, and the `Scheduler` that drives them
(`make_scheduler`, the one place a Scheduler is constructed). `pipeline.session.LiveSession` builds one
session from a Config and its local devices; `pipeline.studio` builds one per browser, with the
browser's tracks as sources and a `SharedRenderer` handle as its renderer.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch

from capture.audio_sources import AudioSource
from capture.pose_sources import FrameSource, PoseFilter, PoseWorker
from pcavs.alignment import AlignedFace, FaceAligner, LandmarkDetector, LiveAligner
from pcavs.checkpoints import PcavsNetworks, load_networks
from pcavs.device import resolve_device
from pcavs.engine import Avatar, EngineOptions
from pcavs.preprocess import to_network_input
from pipeline.metrics import LiveMetrics
from pipeline.scheduler import Renderer, Scheduler, SchedulerOptions
from pipeline.timeline import AudioTimeline
from stream.sinks import FrameSink

log = logging.getLogger(__name__)

# SFD at full size costs seconds per webcam frame on a CPU; 320 px is plenty for one close face.
POSE_DETECT_MAX_SIDE = 320


def engine_options(device: str, dtype_name: str, noise: str, noise_seed: int, mouth_weight: float) -> EngineOptions:
    """The `[model]` config keys as EngineOptions (device resolved: "auto" → cuda or cpu)."""
    dtype = getattr(torch, dtype_name)
    device = resolve_device(device, dtype)  # a device problem is one line, before any checkpoint is read
    if dtype != torch.float32 and device == "cpu":
        log.warning("%s on the CPU runs on PyTorch's reference kernels (~35x slower than float32 on CPUs "
                    "without native half-precision convolutions); it is meant for GPUs", dtype_name)
    return EngineOptions(device=device, dtype=dtype, noise=noise, noise_seed=noise_seed, mouth_weight=mouth_weight)


def load_engine(checkpoint_dir, options: EngineOptions) -> PcavsNetworks:
    """The networks, loaded once per process and device; every session's Avatar shares them."""
    return load_networks(checkpoint_dir, device=options.device, dtype=options.dtype)


def encode_identity(networks: PcavsNetworks, options: EngineOptions, rgb: np.ndarray, name: str,
                    landmarks: np.ndarray | None = None,
                    detector: Callable[[], LandmarkDetector] | None = None) -> tuple[Avatar, AlignedFace]:
    """Align the photo (known landmarks, else the detector: `FaceNotFoundError` when it finds no face)
    and encode it once. Returns the Avatar and the aligned face: its 224² crop is the placeholder frame,
    its matrix places generated faces back into the photo."""
    aligner = FaceAligner(None if landmarks is not None or detector is None else detector())
    face = aligner.align_photo(rgb, name=name, landmarks=landmarks)
    return Avatar(networks, to_network_input(face.image), options), face


def start_pose_worker(frames: FrameSource, avatar: Avatar, detector: LandmarkDetector,
                      smoothing: PoseFilter | float | None) -> PoseWorker:
    """Frames → live alignment → the avatar's pose encoder, on the worker's own threads (started)."""
    worker = PoseWorker(frames, LiveAligner(detector),
                        encode=lambda crop: avatar.pose_code(to_network_input(crop)), smoothing=smoothing)
    worker.start()
    return worker


def pose_provider(worker: PoseWorker, metrics: LiveMetrics) -> Callable[[], np.ndarray | None]:
    """The scheduler's pose callback: the worker's latest code (None before the first face), and the
    face status into the metrics."""
    def latest() -> np.ndarray | None:
        sample = worker.latest()
        if sample is None:
            return None
        metrics.set_pose_status(pose_face_found=sample.face_found,
                                pose_frames_without_face=sample.frames_without_face)
        return sample.code
    return latest


def make_scheduler(audio: AudioSource, timeline: AudioTimeline, renderer: Renderer | Avatar, sink: FrameSink,
                   placeholder: np.ndarray, pose: Callable[[], np.ndarray | None] | None,
                   metrics: LiveMetrics, options: SchedulerOptions,
                   health_checks: Sequence[Callable[[], None]] = (),
                   on_frame: Callable[[int], None] | None = None) -> Scheduler:
    """The one place a `Scheduler` is constructed (CLI run and studio sessions alike), so a change of
    its constructor is adapted here only."""
    return Scheduler(audio, timeline, renderer, sink, placeholder=placeholder, pose=pose, metrics=metrics,
                     options=options, health_checks=health_checks, on_frame=on_frame)


def encode_pose_batch(avatar: Avatar, crops: np.ndarray) -> np.ndarray:
    """(B,224,224,3) aligned uint8 crops → (B, POSE_DIM) pose codes in one pose-encoder pass."""
    batch = torch.stack([to_network_input(c) for c in crops]).to(avatar.device, avatar.dtype)
    with torch.inference_mode():
        return avatar.networks.pose.pose_code(batch).float().cpu().numpy()
