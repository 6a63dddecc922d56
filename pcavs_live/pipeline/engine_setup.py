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
  On a CPU the worker's torch ops run on as many intra-op threads as the renderer's (`cpu_pose_threads`:
  OpenMP teams of different sizes on one CPU stall each other's barriers) and the rate adapts (`capture.pose_rate.PoseBudget`):
  at most `rate_hz`, lower when the worker would take more than a quarter of the machine; the chosen rate
  is in the stats (`pose_rate_hz`, with `pose_cpu_ms` per pose frame).
* `PoseBatcher`: the studio's sessions' pose crops through one pose-encoder pass (`encode_poses`)
  whenever several are waiting, instead of one pass per session.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from capture.pose_rate import InterpolatedPose, PoseBudget, RateLimitedSource
from capture.pose_sources import FrameSource, PoseFilter, PoseWorker
from pcavs.alignment import LandmarkDetector, LiveAligner
from pcavs.alignment.tracking import tracking_detector
from pcavs.device import configure_cudnn
from pcavs.engine import Avatar, encode_poses
from pcavs.gpu import WorkerStream
from pcavs.preprocess import to_network_input
from pcavs.runtime import RenderRuntime
from pcavs_live.pipeline.metrics import LiveMetrics

log = logging.getLogger(__name__)

def cpu_pose_threads() -> int:
    """The pose worker's intra-op threads on a CPU: as many as the renderer's (torch's count in the
    thread that starts the pose path). bench/cpu.py's threads table on an idle 2-core Zen 5, two runs:
    bf16 generator frames/s beside a busy pose worker — renderer 2 + worker 2 threads 3.55 / 3.40,
    renderer 2 + worker 1 thread 1.31 / 1.16 (OpenMP teams of different sizes stall each other's
    barriers), renderer 1 + worker 1 3.30 / 3.61; the renderer alone 5.47 / 6.05 at 2 threads, and the
    budget keeps the worker idle three quarters of the time, so the renderer keeps every core."""
    return torch.get_num_threads()


class _CpuPoseAligner:
    """The live aligner as the CPU pose worker runs it: its first call sets the worker thread's intra-op
    threads, and each call opens a new frame of the budget's CPU-time measurement."""

    def __init__(self, aligner: LiveAligner, budget: PoseBudget, threads: int) -> None:
        self._align = budget.wrap(aligner.align, new_frame=True)
        self._threads = threads
        self._thread_set = False

    def align(self, frame: np.ndarray):
        if not self._thread_set:
            torch.set_num_threads(self._threads)  # this (the pose worker's) thread only: OpenMP is per thread
            self._thread_set = True
        return self._align(frame)


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
    now, largest first, not while sessions wait; the identity bank sized for `max_sessions` first, so
    the graphs that gather from it never have to be re-captured). Returns the buckets prepared (none
    on a CPU)."""
    configure_cudnn(str(runtime.device))
    prepared = runtime.warm_up(range(1, max(1, int(max_sessions)) + 1), capacity=max(1, int(max_sessions)))
    if prepared:
        log.info("render runtime warmed up for batch buckets %s", prepared)
    return prepared


@dataclass
class _PoseCrop:
    networks: object
    crop: np.ndarray
    code: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False


class PoseBatcher:
    """Several sessions' pose crops in one pose-encoder pass. Each session's pose worker calls
    `encode(networks, crop)`; a caller that finds no pass running leads one over every crop waiting
    (up to `max_batch`, its own first), on its own worker stream, and hands each caller its code. While
    a pass runs, the crops arriving meanwhile wait for the next one: no added wait when the device is
    idle, one pass for many sessions when it is busy. No thread of its own (nothing to stop); a failing
    pass raises in every caller of that pass."""

    def __init__(self, encode_many: Callable[[object, np.ndarray], np.ndarray] = encode_poses,
                 max_batch: int = 64) -> None:
        self._encode_many, self.max_batch = encode_many, max(1, int(max_batch))
        self._cond = threading.Condition()
        self._pending: list[_PoseCrop] = []
        self._running = False
        self.passes = 0
        self.crops = 0

    def encode(self, networks, crop: np.ndarray) -> np.ndarray:
        """(224,224,3) uint8 aligned crop → (12,) float32 pose code."""
        item = _PoseCrop(networks, np.asarray(crop))
        with self._cond:
            self._pending.append(item)
            while not item.done and self._running:
                self._cond.wait()
            if not item.done:                     # lead the next pass
                self._running = True
                others = [p for p in self._pending if p is not item and p.networks is networks]
                batch = [item] + others[: self.max_batch - 1]
                self._pending = [p for p in self._pending if not any(p is b for b in batch)]
        if not item.done:
            try:
                codes, error = np.asarray(self._encode_many(networks, np.stack([p.crop for p in batch])),
                                          np.float32), None
            except BaseException as exc:  # noqa: BLE001 - handed to every caller of this pass
                codes, error = None, exc
            with self._cond:
                for i, p in enumerate(batch):
                    p.code, p.error, p.done = (None if codes is None else codes[i]), error, True
                self.passes += 1
                self.crops += len(batch)
                self._running = False
                self._cond.notify_all()
        if item.error is not None:
            raise item.error
        assert item.code is not None
        return item.code

    def stats(self) -> dict[str, object]:
        """Counters for the studio's stats: pose-encoder passes and the crops through them."""
        with self._cond:
            return {"pose_encoder_passes": self.passes, "pose_encoder_crops": self.crops}


def start_live_pose(frames: FrameSource, avatar: Avatar, detector: LandmarkDetector,
                    smoothing: PoseFilter | float | None, rate_hz: float,
                    metrics: LiveMetrics, pose_batcher: PoseBatcher | None = None,
                    ) -> tuple[PoseWorker, Callable[[], np.ndarray | None]]:
    """The started worker (its owner stops it) and the scheduler's pose callback (see the module doc).
    The metrics get the face status per new sample, `pose_frames_skipped` (frames above the pose rate),
    `pose_rate_hz` (the rate in force: `rate_hz`, or on a CPU the budget's) and, when the detector can be
    tracked with, `pose_detections` (box-detector runs). `pose_batcher`: the crops go through it (shared
    with other sessions) instead of one pass each."""
    stream = WorkerStream(avatar.device)
    tracked = tracking_detector(detector, scope=stream.scope)
    aligner = LiveAligner(tracked)
    if pose_batcher is not None:
        def encode_crop(crop: np.ndarray) -> np.ndarray:
            return pose_batcher.encode(avatar.networks, crop)
    else:
        def encode_crop(crop: np.ndarray) -> np.ndarray:
            return avatar.pose_code(to_network_input(crop))
    encode = stream.wrap(encode_crop)
    rate: float | PoseBudget = rate_hz
    if avatar.device == "cpu":
        budget = rate = PoseBudget(rate_hz)
        aligner, encode = _CpuPoseAligner(aligner, budget, cpu_pose_threads()), budget.wrap(encode)
        metrics.watch("pose_cpu_ms", lambda: None if budget.frame_cpu_ms is None else round(budget.frame_cpu_ms, 1))
    capped = RateLimitedSource(frames, rate)
    worker = PoseWorker(capped, aligner, encode=encode, smoothing=smoothing)
    metrics.watch("pose_rate_hz", lambda: round(1.0 / capped.period, 2))
    metrics.watch("pose_frames_skipped", lambda: capped.frames_skipped)
    if hasattr(tracked, "counters"):
        metrics.watch("pose_detections", lambda: tracked.counters.detections)

    def status(sample) -> None:
        metrics.set_pose_status(pose_face_found=sample.face_found,
                                pose_frames_without_face=sample.frames_without_face)

    worker.start()
    return worker, InterpolatedPose(worker, rate, on_sample=status)
