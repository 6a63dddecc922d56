"""Several live sessions' landmark crops through one FAN forward (issue 20: pose at scale).

A tracked pose frame is FAN (~50 GFLOP at batch 1) plus the pose encoder; run one session at a time
under the model's lock, a studio's sessions queue behind each other and the GPU runs batch-1 kernels.
`FanBatcher` gathers the 256×256 FAN inputs that sessions submit while a forward is running and runs
them as one batch; `BatchedLandmarkModel` is the `BoxLandmarkModel` (`pcavs.alignment.tracking`) a
session's tracker uses, with its FAN stage going through the shared batcher. The box detector (SFD)
runs only for a session that lost its track, on its own (not batched).

Who runs the forward: the first waiting submitter (a "leader"), not a thread of the batcher's own.

* Nothing to start or stop: the batcher has no thread, so no owner has to join one, and a studio
  without sessions costs nothing.
* A lone session pays no hand-off: with nobody else waiting it runs its own forward at once, exactly
  as before; batches form only when the device is busy, which is when they pay.
* The forward runs on the leader's thread, i.e. inside one pose worker's own (lowest-priority) CUDA
  stream (`pcavs.gpu.WorkerStream`, entered by the tracker around every model call) and with the pose
  worker's CPU thread count, as a session's own FAN did.

Bounds: at most `max_pending` crops wait (a submit beyond that is dropped, counted, and raises
`LandmarksBusy`); a submitter whose landmarks have not come back within `timeout_s` stops waiting
(counted, `LandmarksBusy`; a late result is discarded). `LandmarksBusy` tells the pose worker to skip
the frame and hold its last pose; the track is kept. A forward that fails raises in every submitter of
that batch. A session that stops while its crops are in a batch leaves the others unaffected: the
batch finishes and only its own results go unread.

`window_s` (default 0: none) holds a forward open that long for more crops before it starts: on a GPU
a FAN forward takes a few ms, so without a window the sessions' 12.5 Hz frames rarely meet; a few ms
of pose latency (the pose is interpolated 80 ms behind anyway) buys batches of many sessions.
`buckets` pads a forward with zero crops to the smallest bucket holding it, so cuDNN's autotuner (on in
a GPU process) meets a few batch shapes, tuned by `warm_up` at start-up, not one new shape per count.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from pcavs.alignment.errors import LandmarksBusy


@dataclass(eq=False)  # identity, not numpy field comparison, in `in` / remove
class _Request:
    inputs: np.ndarray                        # (k, 3, 256, 256) float32, one session's crops
    heatmaps: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False
    abandoned: bool = False


@dataclass
class FanBatchStats:
    passes: int = 0            # FAN forwards run
    crops: int = 0             # crops through them
    largest_batch: int = 0
    dropped: int = 0           # submits refused: `max_pending` crops already waiting
    timeouts: int = 0          # submitters that stopped waiting after `timeout_s`
    padded: int = 0            # zero crops added to reach a batch bucket
    batch_sizes: dict[int, int] = field(default_factory=dict)


class FanBatcher:
    """One FAN forward for the crops that several sessions submit while a forward runs (module doc).
    `forward`: (n, 3, 256, 256) float32 in [0, 1] → (n, 68, 64, 64) heatmaps (a numpy array)."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], max_batch: int = 64,
                 max_pending: int = 256, timeout_s: float = 2.0, window_s: float = 0.0,
                 buckets: Sequence[int] | None = None) -> None:
        self._forward = forward
        self.window_s = max(0.0, float(window_s))
        self.buckets = None if buckets is None else tuple(sorted(int(b) for b in buckets))
        self.max_batch = max(1, int(max_batch))
        self.max_pending = max(self.max_batch, int(max_pending))
        self.timeout_s = float(timeout_s)
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._running = False
        self._stats = FanBatchStats()

    def heatmaps(self, inputs: np.ndarray) -> np.ndarray:
        """This caller's crops' heatmaps, in the order given (see the module doc for the bounds)."""
        inputs = np.ascontiguousarray(inputs, dtype=np.float32)
        if len(inputs) == 0:
            return np.zeros((0, 68, 64, 64), np.float32)
        req = _Request(inputs)
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            if sum(len(r.inputs) for r in self._pending) + len(inputs) > self.max_pending:
                self._stats.dropped += 1
                raise LandmarksBusy(f"landmark queue full ({self.max_pending} crops waiting)")
            self._pending.append(req)
            self._cond.notify_all()              # a leader gathering its window counts this crop
            while not req.done and self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    req.abandoned = True
                    if req in self._pending:
                        self._pending.remove(req)
                    self._stats.timeouts += 1
                    raise LandmarksBusy(f"no landmarks within {self.timeout_s:g} s (FAN busy)")
                self._cond.wait(left)
            if not req.done:                     # nobody is running a forward: lead the next one
                self._running = True
                self._gather(req)
                batch = self._take_batch(req)
        if not req.done:
            self._run(batch)
        if req.error is not None:
            raise req.error
        assert req.heatmaps is not None
        return req.heatmaps

    def _gather(self, leader: _Request) -> None:
        """Hold the forward open `window_s` for more sessions' crops (ends early at `max_batch`)."""
        end = time.monotonic() + self.window_s
        while sum(len(r.inputs) for r in self._pending) < self.max_batch:
            left = end - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _take_batch(self, leader: _Request) -> list[_Request]:
        """The leader's crops first, then waiting requests in arrival order, up to `max_batch` crops
        (a request is never split; the leader's always goes)."""
        batch, total = [leader], len(leader.inputs)
        for r in self._pending:
            if r is not leader and total + len(r.inputs) <= self.max_batch:
                batch.append(r)
                total += len(r.inputs)
        taken = {id(r) for r in batch}
        self._pending = [r for r in self._pending if id(r) not in taken]
        return batch

    def padded_size(self, n: int) -> int:
        """The batch size a forward of `n` crops runs at: the smallest bucket holding them (n itself
        without buckets or beyond the largest)."""
        return next((b for b in self.buckets or () if b >= n), n)

    def warm_up(self, up_to: int, sample: np.ndarray) -> list[int]:
        """One forward at every batch size a forward of 1..`up_to` crops can run at (cuDNN autotunes each
        new shape on a GPU: at start-up, not while sessions wait). `sample`: one crop (3, H, W)."""
        sizes = sorted({self.padded_size(n) for n in range(1, max(1, min(int(up_to), self.max_batch)) + 1)})
        for size in sizes:
            self._forward(np.repeat(np.asarray(sample, np.float32)[None], size, axis=0))
        return sizes

    def _run(self, batch: list[_Request]) -> None:
        pad = 0
        try:
            inputs = np.concatenate([r.inputs for r in batch])
            pad = self.padded_size(len(inputs)) - len(inputs)
            if pad:   # zero crops up to the bucket: a few shapes for cuDNN, not one per count
                inputs = np.concatenate([inputs, np.zeros((pad, *inputs.shape[1:]), inputs.dtype)])
            out = np.asarray(self._forward(inputs))
            error = None
        except BaseException as exc:  # noqa: BLE001 - handed to every submitter of this batch
            out, error = None, exc
        with self._cond:
            start = 0
            for r in batch:
                n = len(r.inputs)
                if out is not None:
                    r.heatmaps = out[start:start + n]
                r.error, r.done = error, True
                start += n
            s = self._stats
            s.passes += 1
            s.padded += pad
            s.crops += start
            s.largest_batch = max(s.largest_batch, start)
            s.batch_sizes[start] = s.batch_sizes.get(start, 0) + 1
            self._running = False
            self._cond.notify_all()

    def stats(self) -> dict[str, object]:
        """Counters for the studio's stats (`pose_fan_*`)."""
        with self._cond:
            s = self._stats
            return {"pose_fan_passes": s.passes, "pose_fan_crops": s.crops,
                    "pose_fan_largest_batch": s.largest_batch,
                    "pose_fan_mean_batch": round(s.crops / s.passes, 2) if s.passes else None,
                    "pose_fan_dropped": s.dropped, "pose_fan_timeouts": s.timeouts, "pose_fan_padded": s.padded,
                    "pose_fan_waiting": sum(len(r.inputs) for r in self._pending)}


@runtime_checkable
class StagedLandmarkModel(Protocol):
    """A landmark model whose FAN stage splits into CPU-side preparation, the network, and CPU-side
    decoding (`FaceAlignmentDetector` has them), so the network can run for several callers at once."""

    def face_boxes(self, rgb: np.ndarray) -> list[np.ndarray]: ...

    def fan_inputs(self, rgb: np.ndarray, boxes: list[np.ndarray]) -> tuple[np.ndarray, list]: ...

    def fan_heatmaps(self, inputs: np.ndarray) -> np.ndarray: ...

    def landmarks_from_heatmaps(self, heatmaps: np.ndarray, frames: list) -> list[tuple[np.ndarray, float]]: ...


class BatchedLandmarkModel:
    """A session's view of a shared `StagedLandmarkModel`: `face_boxes` as the model's, and
    `landmarks_in_boxes` with the crop and the decoding in the caller's thread and FAN through the
    shared `FanBatcher`. A `BoxLandmarkModel`, so `tracking_detector` tracks with it."""

    def __init__(self, model: StagedLandmarkModel, batcher: FanBatcher) -> None:
        self.model, self.batcher = model, batcher

    def face_boxes(self, rgb: np.ndarray) -> list[np.ndarray]:
        return self.model.face_boxes(rgb)

    def landmarks_in_boxes(self, rgb: np.ndarray, boxes: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        if not boxes:
            return []
        inputs, frames = self.model.fan_inputs(rgb, boxes)
        return self.model.landmarks_from_heatmaps(self.batcher.heatmaps(inputs), frames)
