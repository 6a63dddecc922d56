"""Offline rendering: a finite source rendered to files, every slot its own generated frame.

No clock to keep up with: the audio is taken as fast as the source gives it, and slots are rendered in
order, `batch_size` at a time, as soon as their mel windows exist (`AudioTimeline`), so memory stays
bounded however long the file. Each slot gets the pose code of its own frame (`SlotPose`, e.g. a
`capture.pose_sources.PoseSequence`), so the result does not depend on how fast anything ran. Frames go
out through the same `FrameSink` contract as the live `Scheduler` (frame + that slot's 40 ms of audio),
with the same metrics and per-frame hook, and the run ends with the same `RunSummary`.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from capture.audio_sources import AudioSource
from capture.pose_sources import PoseSequence
from pcavs.constants import FPS, SAMPLE_RATE
from pcavs.engine import StageTimes
from pcavs_live.pipeline.metrics import FrameRecord, LiveMetrics
from pcavs_live.pipeline.scheduler import Renderer, RunSummary
from pcavs_live.pipeline.timeline import AudioTimeline, model_frame_index
from stream.sinks import FrameSink

log = logging.getLogger(__name__)

# Pose codes for a batch of output slots: (len(slots), POSE_DIM), or None for the photo's own pose.
SlotPose = Callable[[Sequence[int]], "np.ndarray | None"]

# How long one read waits for audio: lets a stop request and the health checks be seen promptly.
READ_TIMEOUT_S = 0.05


def sequence_pose(sequence: PoseSequence, upstream_frame_numbering: bool = False,
                  metrics: LiveMetrics | None = None) -> SlotPose:
    """Slot t → the pose code of the model's frame t (t+2 with upstream numbering), i.e. pose-video frame
    `ping_pong_index` of it, as upstream's loader pairs them. `metrics` gets the face status of the
    last slot of each batch."""
    def codes(slots: Sequence[int]) -> np.ndarray:
        frames = [model_frame_index(t, upstream_frame_numbering) for t in slots]
        if metrics is not None:
            last = sequence.index(frames[-1])
            metrics.set_pose_status(pose_face_found=bool(sequence.face_found[last]),
                                    pose_frames_without_face=int(sequence.frames_without_face[last]))
        return sequence.codes_for(frames)
    return codes


@dataclass(frozen=True)
class OfflineOptions:
    batch_size: int = 8             # slots per generator pass
    max_frames: int | None = None   # stop after this many output frames (previews, tests)


class OfflineRenderer:
    """Runs in the caller's thread until the source ends, `max_frames` are out or `stop` is set; owns no
    threads (the audio source owns its own and is stopped here; the caller closes everything else)."""

    def __init__(self, audio: AudioSource, timeline: AudioTimeline, renderer: Renderer, sink: FrameSink,
                 frame_size: tuple[int, int], pose: SlotPose | None = None,
                 metrics: LiveMetrics | None = None, options: OfflineOptions = OfflineOptions(),
                 health_checks: Sequence[Callable[[], None]] = (),
                 on_frame: Callable[[int], None] | None = None) -> None:
        """`frame_size`: (width, height) of the rendered frames, announced to the sinks before the first."""
        if options.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.audio, self.timeline, self.renderer, self.sink = audio, timeline, renderer, sink
        self.frame_size = frame_size
        self.pose = pose
        self.metrics = metrics or LiveMetrics()
        self.options = options
        self._next = 0
        self._health_checks = list(health_checks)
        self._on_frame = on_frame

    def _last_slot(self) -> int | None:
        """One past the last slot to render, once known."""
        total, cap = self.timeline.total_frames, self.options.max_frames
        if total is None:
            return cap
        return total if cap is None else min(total, cap)

    def _wanted(self) -> int:
        """Slots the next batch waits for: a full batch, or whatever is left."""
        want = self._next + self.options.batch_size
        last = self._last_slot()
        return want if last is None else min(want, last)

    def _pump_audio(self) -> None:
        """Read audio until the next batch's windows exist or the source has ended."""
        while self.timeline.frames_ready < self._wanted() and not self.timeline.finished:
            chunk = self.audio.read(READ_TIMEOUT_S)
            if chunk is None:
                if self.audio.finished:
                    self.timeline.finish()
                return  # give the caller a turn to look at `stop` and the health checks
            gap = chunk.start_sample - self.timeline.samples
            if gap > 0:  # a source that dropped blocks: keep the timeline continuous with silence
                log.warning("audio source skipped %d samples; filling with silence", gap)
                self.timeline.append(np.zeros(gap, np.float32), chunk.captured_at)
            self.timeline.append(chunk.samples, chunk.captured_at)

    def _render(self, slots: list[int]) -> None:
        mels = np.stack([self.timeline.mel_window(k) for k in slots])
        poses = None if self.pose is None else self.pose(slots)
        times = StageTimes()
        frames = self.renderer.render(mels, poses, times)
        n = len(slots)
        for k, frame in zip(slots, frames):
            self.sink.write(frame, self.timeline.slot_audio(k), k)
            # The file is read ahead of time: capture→frame latency only means something live.
            self.metrics.record(FrameRecord(frame_index=k, generated=True, emitted_at=time.monotonic(),
                                            latency_ms=None, generator_ms=times.generator_ms / n,
                                            audio_ms=times.audio_ms / n))
            if self._on_frame is not None:
                self._on_frame(k)

    def run(self, stop: threading.Event | None = None) -> RunSummary:
        stop = stop or threading.Event()
        self.sink.open(self.frame_size[0], self.frame_size[1], FPS, SAMPLE_RATE)
        t0 = time.monotonic()
        stopped_early = False
        try:
            self.audio.start()
            while True:
                last = self._last_slot()
                if last is not None and self._next >= last:
                    break
                if stop.is_set():
                    stopped_early = True
                    break
                for check in self._health_checks:
                    check()
                self._pump_audio()
                if self.timeline.frames_ready >= self._wanted():  # a full batch, or the rest of the file
                    slots = list(range(self._next, self._wanted()))
                    self._render(slots)
                    self._next = slots[-1] + 1
        finally:
            self.audio.stop()
            self.sink.close()
        snap = self.metrics.snapshot()
        return RunSummary(frames_out=int(snap["frames_out"]), frames_generated=int(snap["frames_generated"]),
                          frames_repeated=int(snap["frames_repeated"]), wall_s=time.monotonic() - t0,
                          stopped_early=stopped_early)
