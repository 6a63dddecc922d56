"""Live pose at a capped rate, interpolated per output frame.

Head pose changes slowly next to lips, and a live pose frame (landmarks + pose encoder) costs about as
much as a generator frame. So the pose worker runs at most `pose.rate_hz` times a second (default
12.5 Hz, half the video rate: `RateLimitedSource` passes only frames due by their capture time and
counts the rest), and each output frame gets a code interpolated between the two newest pose samples
(`PoseInterpolator`, `InterpolatedPose`), so the head moves smoothly at 25 fps instead of in 12.5 Hz
steps.

Interpolation is linear in capture time and clamped: before the older sample it gives the older code;
past the newer one it extrapolates along the same line for at most `horizon_s`, then holds. Pose codes
have no known geometry, so a longer extrapolation would invent motion.

On a CPU a tracked pose frame (face_alignment's FAN + the pose encoder) costs as much CPU as a generated
frame or more, so a fixed 12.5 Hz would take the generator's cores. There `PoseBudget` measures the
pose worker's own CPU time per frame and lowers the rate until the worker uses at most `share` (a
quarter) of the machine's cores: the generator keeps at least three quarters. `RateLimitedSource` and
`InterpolatedPose` then follow the budget's current rate instead of a fixed one.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable, Protocol, TypeVar

import numpy as np

from pcavs.constants import POSE_DIM

DEFAULT_RATE_HZ = 12.5
DEFAULT_HORIZON_S = 0.04  # one output frame at 25 fps
DEFAULT_POSE_SHARE = 0.25  # of the machine's cores for the pose worker on a CPU: the generator keeps 3/4
MIN_RATE_HZ = 1.0          # below this the head would visibly jump between samples; config's minimum too

_T = TypeVar("_T")
Rate = float | Callable[[], float]  # a fixed rate, or one read at each use (a PoseBudget's)


def _rate_reader(rate_hz: Rate) -> Callable[[], float]:
    if callable(rate_hz):
        return rate_hz
    if not rate_hz > 0:
        raise ValueError(f"pose rate must be > 0 Hz, got {rate_hz}")
    fixed = float(rate_hz)
    return lambda: fixed


class PoseBudget:
    """The pose rate a CPU can afford: at most `max_hz`, at least `min_hz`, and otherwise
    share × cores / (the pose worker's CPU seconds per frame), so the worker's threads use at most
    `share` of the machine. The cost is the worker thread's own CPU time (`time.thread_time`: the worker
    runs its torch ops on one intra-op thread, so no CPU is spent outside it), over alignment (landmarks,
    a box detection when the track is lost) and encoding, averaged exponentially (`alpha`); waiting for
    a frame costs nothing. Before the first measured frame the rate is `max_hz`.

    `wrap(fn, new_frame)` returns `fn` timed; a call with `new_frame` closes the previous frame's cost.
    Thread-safe: the worker measures, the reader thread and the render loop read `rate_hz`."""

    def __init__(self, max_hz: float, share: float = DEFAULT_POSE_SHARE, cores: int | None = None,
                 min_hz: float = MIN_RATE_HZ, alpha: float = 0.2,
                 cpu_clock: Callable[[], float] = time.thread_time) -> None:
        if not 0 < min_hz <= max_hz:
            raise ValueError(f"need 0 < min_hz <= max_hz, got {min_hz}, {max_hz}")
        if not 0 < share <= 1 or not 0 < alpha <= 1:
            raise ValueError("share and alpha must be in (0, 1]")
        self.max_hz, self.min_hz, self.share, self.alpha = float(max_hz), float(min_hz), share, alpha
        self.cores = cores if cores is not None else len(os.sched_getaffinity(0)) if hasattr(
            os, "sched_getaffinity") else (os.cpu_count() or 1)
        self._cpu_clock = cpu_clock
        self._lock = threading.Lock()
        self._spent = 0.0         # CPU seconds of the frame in progress
        self._open = False        # a frame has started and not been closed
        self._cost: float | None = None
        self._rate = self.max_hz
        self.frames_measured = 0

    @property
    def rate_hz(self) -> float:
        return self._rate

    def __call__(self) -> float:  # a Rate reader
        return self._rate

    @property
    def frame_cpu_ms(self) -> float | None:
        """The averaged CPU cost of one pose frame, in ms (None before the first)."""
        cost = self._cost
        return None if cost is None else cost * 1e3

    def wrap(self, fn: Callable[..., _T], new_frame: bool = False) -> Callable[..., _T]:
        def timed(*args, **kwargs) -> _T:
            if new_frame:
                self.close_frame()
            t0 = self._cpu_clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = self._cpu_clock() - t0
                with self._lock:
                    self._spent += spent
                    self._open = True
        return timed

    def close_frame(self) -> None:
        """The frame in progress is complete: fold its cost into the average and set the rate."""
        with self._lock:
            if not self._open:
                return
            cost, self._spent, self._open = self._spent, 0.0, False
            self._cost = cost if self._cost is None else self._cost + self.alpha * (cost - self._cost)
            self.frames_measured += 1
            affordable = self.share * self.cores / max(self._cost, 1e-6)
            self._rate = min(self.max_hz, max(self.min_hz, affordable))


class _Source(Protocol):
    realtime: bool

    def read(self) -> tuple[np.ndarray, float] | None: ...
    def close(self) -> None: ...


class RateLimitedSource:
    """A `FrameSource` passing at most `rate_hz` frames per second of *capture* time (the frames'
    timestamps, so a video decoded faster than real time is thinned the same way as a camera). Skipped
    frames are counted in `frames_skipped`."""

    def __init__(self, source: _Source, rate_hz: Rate = DEFAULT_RATE_HZ) -> None:
        self._rate = _rate_reader(rate_hz)
        self.source = source
        self.realtime = source.realtime
        self._due: float | None = None
        self.frames_passed = 0
        self.frames_skipped = 0

    @property
    def period(self) -> float:
        """Seconds between passed frames, at the current rate."""
        return 1.0 / self._rate()

    def read(self) -> tuple[np.ndarray, float] | None:
        while True:
            item = self.source.read()
            if item is None:
                return None
            t = item[1]
            if self._due is None or t >= self._due:
                # Keep the cadence (due += period), but never let a stall make a burst of due frames.
                period = self.period
                self._due = t + period if self._due is None else max(self._due + period, t + period / 2)
                self.frames_passed += 1
                return item
            self.frames_skipped += 1

    def close(self) -> None:
        self.source.close()


class PoseInterpolator:
    """The two newest (capture time, code) samples and the code between them at any time."""

    def __init__(self, horizon_s: float = DEFAULT_HORIZON_S) -> None:
        if horizon_s < 0:
            raise ValueError("horizon_s must be >= 0")
        self.horizon_s = horizon_s
        self._older: tuple[float, np.ndarray] | None = None
        self._newer: tuple[float, np.ndarray] | None = None

    @property
    def newest_time(self) -> float | None:
        return None if self._newer is None else self._newer[0]

    def update(self, code: np.ndarray, t: float) -> None:
        """Add a sample; one not newer than the newest replaces it (the same capture time seen twice)."""
        code = np.asarray(code, dtype=np.float32).reshape(POSE_DIM)
        if self._newer is not None and t <= self._newer[0]:
            self._newer = (self._newer[0], code)
            return
        self._older, self._newer = self._newer, (t, code)

    def at(self, t: float) -> np.ndarray | None:
        """The code at time t (None before the first sample)."""
        if self._newer is None:
            return None
        if self._older is None:
            return self._newer[1]
        (t0, c0), (t1, c1) = self._older, self._newer
        span = t1 - t0
        alpha = (t - t0) / span
        alpha = min(max(alpha, 0.0), 1.0 + self.horizon_s / span)
        return (c0 + alpha * (c1 - c0)).astype(np.float32)


class _Worker(Protocol):
    def latest(self): ...  # PoseSample | None (capture.pose_sources)


class InterpolatedPose:
    """The render loop's pose callback: the worker's newest samples, interpolated at "now − one pose
    period" (while samples arrive on time that point lies between the two newest, so the output moves
    smoothly at the cost of one pose period of lag). `on_sample` sees each new sample (the session puts
    the face status into its metrics)."""

    def __init__(self, worker: _Worker, rate_hz: Rate = DEFAULT_RATE_HZ, horizon_s: float = DEFAULT_HORIZON_S,
                 clock: Callable[[], float] = time.monotonic,
                 on_sample: Callable[[object], None] | None = None) -> None:
        self.worker = worker
        self._rate = _rate_reader(rate_hz)
        self.interpolator = PoseInterpolator(horizon_s)
        self._clock = clock
        self._on_sample = on_sample
        self._seen: object = None

    def __call__(self) -> np.ndarray | None:
        sample = self.worker.latest()
        if sample is None:
            return None
        if sample is not self._seen:
            self._seen = sample
            self.interpolator.update(sample.code, sample.captured_at)
            if self._on_sample is not None:
                self._on_sample(sample)
        return self.interpolator.at(self._clock() - self.delay_s)

    @property
    def delay_s(self) -> float:
        """One pose period at the current rate."""
        return 1.0 / self._rate()
