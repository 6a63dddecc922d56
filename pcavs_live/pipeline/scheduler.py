"""The live loop: audio clock → mel windows → engine → sinks.

Three threads meet at the audio timeline and none waits for another:
  * the audio pump (`pcavs_live.pipeline.live_input.AudioPump`) moves input into the timeline as it arrives, so
    no render, however slow, costs input audio;
  * the render worker (`RenderWorker`) renders the *newest* ready slot whenever it is free, so nothing
    backs up and a slow generator skips slots rather than falling behind;
  * the caller's thread is the output clock: slot k goes out at `ready_at(k) + L` (smoothed by
    `pcavs_live.pipeline.output_clock.OutputClock` into a steady 25 fps that follows the input's own clock) with
    its own 40 ms of audio and the frame rendered for it, or, when that frame is not there, the newest
    frame rendered for an earlier slot. Every slot goes out exactly once, in order, never in bursts.
L, the latency budget, is fixed before the audio starts: the worker renders twice to warm up and
time the generator, and L covers one render plus the wait for the next slot to become ready, so a
frame rendered for slot k is there when slot k goes out (lips in sync) while the budget lasts.
Stopping is seen within a fraction of a second; the worker finishes at most the render it is in.

Frame k becomes renderable the moment the audio its mel window needs has arrived (the model's
inherent look-ahead, spec §4); `pcavs_live.pipeline.timeline.AudioTimeline` decides which audio that is.

Rendering a file (not in real time: every frame, in batches) is `pcavs_live.pipeline.offline.OfflineRenderer`.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from capture.audio_sources import AudioSource
from pcavs_live.common.workers import Worker
from pcavs.engine import Avatar, StageTimes
from pcavs_live.pipeline.live_input import AudioPump, LiveTimeline
from pcavs_live.pipeline.metrics import FrameRecord, LiveMetrics
from pcavs_live.pipeline.output_clock import OutputClock
from pcavs.constants import FPS, HOP, SAMPLE_RATE
from pcavs.mel import StreamingMel
from pcavs_live.pipeline.timeline import AudioTimeline
from stream.sinks import FrameSink

log = logging.getLogger(__name__)

PoseProvider = Callable[[], "np.ndarray | None"]

# Live loop: the longest any of its waits lasts before looking at the stop flag and health checks.
TICK_S = 0.05
# Latency budget L = LATENCY_MARGIN × warm render time + one frame period + LATENCY_SLACK_S: the render
# itself with room for its variation, the wait for the newest slot to become ready (up to a period
# after the worker was free), and scheduling jitter.
LATENCY_MARGIN = 1.25
LATENCY_SLACK_S = 0.04
# Stopping waits for the render in progress; one slow CPU render can take seconds, a stuck one is named.
RENDER_STOP_TIMEOUT_S = 30.0


class Renderer(Protocol):
    def render(self, mel_windows: np.ndarray, pose_codes: np.ndarray | None = None,
               times: StageTimes | None = None) -> np.ndarray: ...


@dataclass(frozen=True)
class SchedulerOptions:
    max_frames: int | None = None     # stop after this many output frames (tests, previews)
    latency_s: float | None = None    # live: fixed latency budget L; None measures it while warming up
    max_latency_s: float = 2.0        # live: L never exceeds this (slower renders go out late instead)
    warmup_renders: int = 2           # live: renders before the audio starts (the last one is timed)


@dataclass(frozen=True)
class RunSummary:
    frames_out: int
    frames_generated: int
    frames_repeated: int         # slots that showed an earlier frame again
    wall_s: float
    stopped_early: bool


@dataclass
class _Rendered:
    frame: np.ndarray
    times: StageTimes


class RenderWorker:
    """Renders the newest ready slot whenever it is free, on a thread the live loop owns.

    First it renders `warmups` silent windows (the first call of a network is slow) and times the
    last: `render_s`, then `warm` is set. Frames wait in `take` for their slot; a frame passed over
    because a newer one was ready by then is counted in `discarded`. Pending frames are few (one per
    render within the latency budget); `max_pending` bounds them if the output stalls.
    """

    def __init__(self, renderer: Renderer | Avatar, timeline: LiveTimeline, pose: PoseProvider | None,
                 limit: int | None, warmups: int, max_pending: int) -> None:
        self._renderer, self._timeline, self._pose = renderer, timeline, pose
        self._limit = limit
        self._warmups = warmups
        self._max_pending = max_pending
        self._frames: dict[int, _Rendered] = {}
        self._lock = threading.Lock()
        self._worker = Worker(self._run, "render", wake=timeline.notify)
        self.warm = threading.Event()
        self.render_s: float | None = None
        self.discarded = 0
        self.error: BaseException | None = None

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        """Returns once the render in progress (if any) has finished, or after RENDER_STOP_TIMEOUT_S with
        the render thread named in the log."""
        self._worker.stop(RENDER_STOP_TIMEOUT_S)

    def _render(self, k: int) -> _Rendered:
        mels = self._timeline.mel_window(k)[None]
        pose = self._pose() if self._pose is not None else None
        poses = None if pose is None else np.asarray(pose, np.float32)[None]
        times = StageTimes()
        frames = self._renderer.render(mels, poses, times)
        return _Rendered(np.asarray(frames[0]), times)

    def _newest_ready(self) -> int:
        ready = self._timeline.frames_ready
        return (ready if self._limit is None else min(ready, self._limit)) - 1

    def _run(self) -> None:
        try:
            for _ in range(self._warmups):       # the timeline holds no audio yet: silent windows
                if self._worker.stopping.is_set():
                    return
                t = time.perf_counter()
                self._render(0)
                self.render_s = time.perf_counter() - t
            self.warm.set()
            last = -1
            while not self._worker.stopping.is_set():
                newest = self._newest_ready()
                if newest <= last:
                    total = self._timeline.total_frames
                    if total is not None and last >= (total if self._limit is None else min(total, self._limit)) - 1:
                        return
                    self._timeline.wait(TICK_S)
                    continue
                rendered = self._render(newest)
                with self._lock:
                    self._frames[newest] = rendered
                    while len(self._frames) > self._max_pending:
                        del self._frames[min(self._frames)]
                        self.discarded += 1
                last = newest
        except BaseException as exc:  # handed to the live loop, which raises it
            self.error = exc
            self._timeline.notify()
        finally:
            self.warm.set()

    def take(self, k: int) -> tuple[int, _Rendered] | None:
        """The newest frame rendered for a slot ≤ k, if one is waiting (older ones are discarded)."""
        with self._lock:
            due = [j for j in self._frames if j <= k]
            if not due:
                return None
            j = max(due)
            for old in due:
                if old != j:
                    del self._frames[old]
                    self.discarded += 1
            return j, self._frames.pop(j)


class Scheduler:
    """Runs until the source ends, `max_frames` are out or `stop` is set. Live, it owns two threads
    (the audio pump and the render worker) and stops them before returning; sources, pose worker and
    sinks own theirs and are stopped by their owner (the session)."""

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
        self.latency_s: float | None = None   # live: the latency budget L in force

    def run(self, stop: threading.Event | None = None) -> RunSummary:
        stop = stop or threading.Event()
        t0 = time.monotonic()
        stopped_early = self._run_live(stop)
        snap = self.metrics.snapshot()
        return RunSummary(frames_out=int(snap["frames_out"]), frames_generated=int(snap["frames_generated"]),
                          frames_repeated=int(snap["frames_repeated"]), wall_s=time.monotonic() - t0,
                          stopped_early=stopped_early)

    # ================================================================ live
    def _latency_budget(self, render_s: float | None) -> float:
        if self.options.latency_s is not None:
            return self.options.latency_s
        budget = LATENCY_MARGIN * (render_s or 0.0) + 1.0 / FPS + LATENCY_SLACK_S
        if budget > self.options.max_latency_s:
            log.warning("one frame takes %.1f s to render; output latency is capped at %.1f s, so frames go "
                        "out late and the lips lag the voice (the voice itself stays on time)",
                        render_s, self.options.max_latency_s)
        return min(budget, self.options.max_latency_s)

    def _check(self, *workers: AudioPump | RenderWorker) -> None:
        for worker in workers:
            if worker.error is not None:
                raise worker.error
        for check in self._health_checks:
            check()

    def _run_live(self, stop: threading.Event) -> bool:
        """Returns True when stopped by `stop`."""
        live = LiveTimeline(self.timeline)
        limit = self.options.max_frames
        max_pending = int((self.options.max_latency_s + 1.0) * FPS) + 2
        worker = RenderWorker(self.renderer, live, self.pose, limit, self.options.warmup_renders, max_pending)
        pump = AudioPump(self.audio, live)
        clock = OutputClock()
        self.sink.open(self._last_frame.shape[1], self._last_frame.shape[0], FPS, SAMPLE_RATE)
        try:
            worker.start()
            # The mel front end's first call loads its filter bank (a slow import); pay for it now, not
            # on the pump's thread while the first audio waits.
            StreamingMel(1.0).push(np.zeros(HOP, np.float32))
            while not worker.warm.wait(TICK_S):
                if stop.is_set():
                    return True
                self._check(worker)
            self._check(worker)
            latency = self.latency_s = self._latency_budget(worker.render_s)
            self.metrics.set_latency_budget(latency * 1e3)
            log.info("live output: latency budget %.0f ms (one render: %s)", latency * 1e3,
                     "-" if worker.render_s is None else f"{worker.render_s * 1e3:.0f} ms")
            self.audio.start()
            pump.start()
            k = 0
            while True:
                if stop.is_set():
                    return True
                self._check(pump, worker)
                total = live.total_frames
                if (total is not None and k >= total) or (limit is not None and k >= limit):
                    return False
                ready = live.ready_at(k)
                if ready is None:
                    live.wait(TICK_S)
                    continue
                release = clock.next_release(ready + latency)
                while (remaining := release - time.monotonic()) > 0:
                    if stop.wait(min(remaining, TICK_S)):
                        return True
                clock.released(release, time.monotonic())
                self._emit_live(k, live, worker)
                live.release(k)
                k += 1
        finally:
            try:
                pump.stop()
                worker.stop()
                self.audio.stop()
            finally:
                self.sink.close()

    def _emit_live(self, k: int, live: LiveTimeline, worker: RenderWorker) -> None:
        taken = worker.take(k)
        rendered = None
        if taken is not None:
            j, rendered = taken
            self._last_frame = rendered.frame
        self.sink.write(self._last_frame, live.slot_audio(k), k)
        now = time.monotonic()
        captured = live.slot_captured_at(k)
        self.metrics.record(FrameRecord(
            frame_index=k, generated=rendered is not None, emitted_at=now,
            latency_ms=None if captured is None else (now - captured) * 1e3,
            generator_ms=None if rendered is None else rendered.times.generator_ms,
            audio_ms=None if rendered is None else rendered.times.audio_ms,
            late=taken is not None and taken[0] < k))
        self.metrics.set_loop_totals(worker.discarded, live.silence_samples * 1e3 / SAMPLE_RATE)
        if self._on_frame is not None:
            self._on_frame(k)
