"""The live loop: audio clock → mel windows → engine → sinks, with bounded latency.

Clocking: the audio source is the clock. Frame k becomes renderable the moment the audio up to
40k+200 ms has arrived (the model's inherent look-ahead, spec §4); the loop waits exactly for that and
no more. When rendering is slower than 25 fps, the loop always renders the *newest* ready frame and
fills the skipped slots by repeating the last frame (each slot still carries its own 40 ms of audio, so
sound never stutters). Nothing queues up: latency stays ≈ look-ahead + one render, however slow the
generator.

In offline mode (`realtime=False`, e.g. a file rendered to mp4) every frame is rendered, in batches.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from capture.audio_sources import AudioSource
from pcavs.engine import Avatar, StageTimes
from pipeline.metrics import FrameRecord, LiveMetrics
from pcavs.constants import FPS, SAMPLE_RATE
from pipeline.timeline import AudioTimeline
from stream.sinks import FrameSink

log = logging.getLogger(__name__)

PoseProvider = Callable[[], "np.ndarray | None"]

# How long one loop turn waits for the first new audio chunk: short enough that a stop request and the
# health checks are seen promptly, long enough that an idle loop does not spin.
READ_TIMEOUT_S = 0.02


class Renderer(Protocol):
    def render(self, mel_windows: np.ndarray, pose_codes: np.ndarray | None = None,
               times: StageTimes | None = None) -> np.ndarray: ...


@dataclass(frozen=True)
class SchedulerOptions:
    realtime: bool = True
    batch_size: int = 8               # offline mode only; live mode renders one (the newest) frame
    max_frames: int | None = None     # stop after this many output frames (tests, previews)


@dataclass(frozen=True)
class RunSummary:
    frames_out: int
    frames_generated: int
    frames_dropped: int
    wall_s: float
    stopped_early: bool


class Scheduler:
    """Runs in the caller's thread until the source ends or `stop` is set; owns no threads itself
    (sources, pose worker and sinks own theirs and are stopped by their owner, run_live)."""

    def __init__(self, audio: AudioSource, timeline: AudioTimeline, renderer: Renderer | Avatar,
                 sink: FrameSink, placeholder: np.ndarray, pose: PoseProvider | None = None,
                 metrics: LiveMetrics | None = None, options: SchedulerOptions = SchedulerOptions(),
                 health_checks: Sequence[Callable[[], None]] = (),
                 on_frame: Callable[[int], None] | None = None) -> None:
        self.audio, self.timeline, self.renderer, self.sink = audio, timeline, renderer, sink
        self.pose = pose
        self.metrics = metrics or LiveMetrics()
        self.options = options
        self._last_frame = placeholder
        self._next = 0
        self._health_checks = list(health_checks)
        self._on_frame = on_frame

    # ---------------------------------------------------------------- audio
    def _pump_audio(self) -> None:
        """Take everything the source has now (waiting at most one read timeout for the first chunk)."""
        timeout = READ_TIMEOUT_S
        while True:
            chunk = self.audio.read(timeout)
            if chunk is None:
                if self.audio.finished and not self.timeline.finished:
                    self.timeline.finish()
                return
            if chunk.start_sample != self.timeline.samples:
                gap = chunk.start_sample - self.timeline.samples
                if gap > 0:  # the source dropped blocks: keep the timeline continuous with silence
                    log.warning("audio source skipped %d samples; filling with silence", gap)
                    self.timeline.append(np.zeros(gap, np.float32), chunk.captured_at)
            self.timeline.append(chunk.samples, chunk.captured_at)
            timeout = 0.0
            if not self.options.realtime and self.timeline.frames_ready >= self._next + self.options.batch_size:
                return

    # ---------------------------------------------------------------- frames
    def _emit(self, k: int, frame: np.ndarray, generated: bool, times: StageTimes | None, n: int) -> None:
        self.sink.write(frame, self.timeline.slot_audio(k), k)
        now = time.monotonic()
        # Offline runs read the file ahead of time: capture→frame latency only means something live.
        ready = self.timeline.ready_at(k) if generated and self.options.realtime else None
        self.metrics.record(FrameRecord(
            frame_index=k, generated=generated, emitted_at=now,
            latency_ms=None if ready is None else (now - ready) * 1e3,
            generator_ms=None if times is None else times.generator_ms / n,
            audio_ms=None if times is None else times.audio_ms / n))
        if self._on_frame is not None:
            self._on_frame(k)

    def _render(self, indices: Sequence[int]) -> tuple[np.ndarray, StageTimes]:
        mels = np.stack([self.timeline.mel_window(k) for k in indices])
        pose = self.pose() if self.pose is not None else None
        poses = None if pose is None else np.repeat(np.asarray(pose, np.float32)[None], len(indices), 0)
        times = StageTimes()
        frames = self.renderer.render(mels, poses, times)
        return frames, times

    def _limit(self, ready: int) -> int:
        return ready if self.options.max_frames is None else min(ready, self.options.max_frames)

    def run(self, stop: threading.Event | None = None) -> RunSummary:
        stop = stop or threading.Event()
        self.sink.open(self._last_frame.shape[1], self._last_frame.shape[0], FPS, SAMPLE_RATE)
        t0 = time.monotonic()
        stopped_early = False
        try:
            self.audio.start()
            while True:
                if stop.is_set():
                    stopped_early = True
                    break
                for check in self._health_checks:
                    check()
                self._pump_audio()
                ready = self._limit(self.timeline.frames_ready)
                if ready > self._next:
                    if self.options.realtime:
                        newest = ready - 1
                        for k in range(self._next, newest):  # stale slots: repeat, keep audio flowing
                            self._emit(k, self._last_frame, False, None, 1)
                        batch = [newest]
                    else:
                        batch = list(range(self._next, min(ready, self._next + self.options.batch_size)))
                    frames, times = self._render(batch)
                    for k, frame in zip(batch, frames):
                        self._emit(k, frame, True, times, len(batch))
                    self._last_frame = frames[-1]
                    self._next = batch[-1] + 1
                done_total = self.timeline.total_frames
                if self.options.max_frames is not None and self._next >= self.options.max_frames:
                    break
                if done_total is not None and self._next >= done_total:
                    break
        finally:
            self.audio.stop()
            self.sink.close()
        snap = self.metrics.snapshot()
        return RunSummary(frames_out=int(snap["frames_out"]), frames_generated=int(snap["frames_generated"]),
                          frames_dropped=int(snap["frames_dropped"]), wall_s=time.monotonic() - t0,
                          stopped_early=stopped_early)
