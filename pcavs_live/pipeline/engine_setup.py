"""What a session does around the engine on a GPU: prepare it before the clock starts, and run the live
pose path beside it without slowing it down.

* `prepare_engine`: cuDNN autotuning set by us (face_alignment turns it on process-wide when it loads on
  CUDA, so call this after the detectors exist), then a warm-up of every batch size the loop will render,
  which on a GPU autotunes and captures the CUDA graphs now instead of in the first seconds live; the
  metrics get the avatar's count of held non-finite frames (`frames_nonfinite`).
* `prepare_runtime`: the studio's form of it, before its first session: every batch a tick of 1 ..
  `max_sessions` sessions pads to, so no session joining later waits for a capture.
* `start_live_pose`: frames → at most `rate_hz` per second (`capture.pose_rate.RateLimitedSource`) → face
  detected once, then tracked (`pcavs.alignment.tracking`) → live alignment → pose encoder, all of the
  worker's GPU work on its own lowest-priority stream (`pcavs.gpu.WorkerStream`); the scheduler's pose
  callback interpolates the newest codes per output frame (`capture.pose_rate.InterpolatedPose`).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import numpy as np

from capture.pose_rate import InterpolatedPose, RateLimitedSource
from capture.pose_sources import FrameSource, PoseFilter, PoseWorker
from pcavs.alignment import LandmarkDetector, LiveAligner
from pcavs.alignment.tracking import tracking_detector
from pcavs.device import configure_cudnn
from pcavs.engine import Avatar
from pcavs.gpu import WorkerStream
from pcavs.preprocess import to_network_input
from pcavs.runtime import RenderRuntime
from pcavs_live.pipeline.metrics import LiveMetrics

log = logging.getLogger(__name__)


def prepare_engine(avatar: Avatar, batch_sizes: Iterable[int], metrics: LiveMetrics | None = None) -> list[int]:
    """Before the clock starts (see the module doc). `batch_sizes`: live, (1,) (the newest frame alone);
    offline, 1..batch size. Returns the batch shapes prepared (none on a CPU)."""
    configure_cudnn(avatar.device)
    prepared = avatar.warm_up(list(batch_sizes))
    if prepared:
        log.info("engine warmed up for batch sizes %s", prepared)
    if metrics is not None:
        metrics.watch("frames_nonfinite", lambda: avatar.frames_nonfinite)
    return prepared


def prepare_runtime(runtime: RenderRuntime, max_sessions: int) -> list[int]:
    """Before a studio accepts its first session: cuDNN as we want it, then a warm-up of every batch
    bucket up to the one `max_sessions` rows pad to (on a GPU: autotuning and the CUDA graphs captured
    now, largest first, not while sessions wait). Returns the buckets prepared (none on a CPU)."""
    configure_cudnn(str(runtime.device))
    prepared = runtime.warm_up(range(1, max(1, int(max_sessions)) + 1))
    if prepared:
        log.info("render runtime warmed up for batch buckets %s", prepared)
    return prepared


def start_live_pose(frames: FrameSource, avatar: Avatar, detector: LandmarkDetector,
                    smoothing: PoseFilter | float | None, rate_hz: float,
                    metrics: LiveMetrics) -> tuple[PoseWorker, Callable[[], np.ndarray | None]]:
    """The started worker (its owner stops it) and the scheduler's pose callback (see the module doc).
    The metrics get the face status per new sample, `pose_frames_skipped` (frames above the pose rate)
    and, when the detector can be tracked with, `pose_detections` (box-detector runs)."""
    stream = WorkerStream(avatar.device)
    tracked = tracking_detector(detector, scope=stream.scope)
    capped = RateLimitedSource(frames, rate_hz)
    worker = PoseWorker(capped, LiveAligner(tracked),
                        encode=stream.wrap(lambda crop: avatar.pose_code(to_network_input(crop))),
                        smoothing=smoothing)
    metrics.watch("pose_frames_skipped", lambda: capped.frames_skipped)
    if hasattr(tracked, "counters"):
        metrics.watch("pose_detections", lambda: tracked.counters.detections)

    def status(sample) -> None:
        metrics.set_pose_status(pose_face_found=sample.face_found,
                                pose_frames_without_face=sample.frames_without_face)

    worker.start()
    return worker, InterpolatedPose(worker, rate_hz, on_sample=status)
