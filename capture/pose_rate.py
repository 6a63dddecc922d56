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
"""
from __future__ import annotations

import time
from typing import Callable, Protocol

import numpy as np

from pcavs.constants import POSE_DIM

DEFAULT_RATE_HZ = 12.5
DEFAULT_HORIZON_S = 0.04  # one output frame at 25 fps


class _Source(Protocol):
    realtime: bool

    def read(self) -> tuple[np.ndarray, float] | None: ...
    def close(self) -> None: ...


class RateLimitedSource:
    """A `FrameSource` passing at most `rate_hz` frames per second of *capture* time (the frames'
    timestamps, so a video decoded faster than real time is thinned the same way as a camera). Skipped
    frames are counted in `frames_skipped`."""

    def __init__(self, source: _Source, rate_hz: float = DEFAULT_RATE_HZ) -> None:
        if not rate_hz > 0:
            raise ValueError(f"pose rate must be > 0 Hz, got {rate_hz}")
        self.source = source
        self.realtime = source.realtime
        self.period = 1.0 / rate_hz
        self._due: float | None = None
        self.frames_passed = 0
        self.frames_skipped = 0

    def read(self) -> tuple[np.ndarray, float] | None:
        while True:
            item = self.source.read()
            if item is None:
                return None
            t = item[1]
            if self._due is None or t >= self._due:
                # Keep the cadence (due += period), but never let a stall make a burst of due frames.
                self._due = t + self.period if self._due is None else max(self._due + self.period,
                                                                          t + self.period / 2)
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

    def __init__(self, worker: _Worker, rate_hz: float = DEFAULT_RATE_HZ, horizon_s: float = DEFAULT_HORIZON_S,
                 clock: Callable[[], float] = time.monotonic,
                 on_sample: Callable[[object], None] | None = None) -> None:
        self.worker = worker
        self.delay_s = 1.0 / rate_hz
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
