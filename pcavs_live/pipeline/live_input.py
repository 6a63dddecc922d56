"""Live audio input that no render can hold up: a pump thread feeding a thread-safe timeline.

In the live loop three threads meet at the audio timeline: the pump appends what the source delivers,
the renderer reads mel windows, the output clock reads each slot's audio and when its frame became
ready. `AudioTimeline` itself is single-threaded, so `LiveTimeline` puts one lock (a condition, so
waiters wake on new audio) around it and records two instants the live loop needs without asking the
timeline to search its history: when each frame became ready (its whole mel window had arrived) and
when each slot's own audio had been captured.

`AudioPump` reads the source on its own thread, so audio is taken off the source's small queue as it
arrives however long a render takes (a render longer than that queue used to cost input audio).
"""
from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque

import numpy as np

from capture.audio_sources import AudioSource
from pcavs_live.common.workers import Worker
from pcavs.constants import SAMPLES_PER_FRAME
from pcavs_live.pipeline.timeline import AudioTimeline

log = logging.getLogger(__name__)

# How long the pump waits for one chunk before looking at its stop flag again.
PUMP_READ_TIMEOUT_S = 0.05


class LiveTimeline:
    """`AudioTimeline` shared by the pump, the renderer and the output clock (every call locks).

    Instants recorded here are the source's `captured_at` (time.monotonic()) of the chunk that
    completed something: `ready_at(k)`, frame k's whole mel window; `slot_captured_at(k)`, slot k's
    own 40 ms of audio. Both are kept for slots not yet `release`d, so memory stays bounded by how far
    the output lags the input.
    """

    def __init__(self, timeline: AudioTimeline) -> None:
        self._timeline = timeline
        self._cond = threading.Condition()
        self._ready_times: deque[float] = deque()   # ready instant of frame _first + i
        self._arrivals: deque[tuple[int, float]] = deque()  # (samples so far, captured_at)
        self._first = 0             # oldest frame whose instants are still held
        self._frames_ready = 0
        self.silence_samples = 0    # samples the source skipped, filled with silence

    # ------------------------------------------------------------ writer (the pump)
    def append(self, samples: np.ndarray, captured_at: float) -> None:
        with self._cond:
            self._timeline.append(samples, captured_at)
            self._arrivals.append((self._timeline.samples, captured_at))
            self._note_ready(captured_at)

    def fill_silence(self, n: int, captured_at: float) -> None:
        """The source skipped `n` samples: keep the timeline continuous (counted in `silence_samples`)."""
        with self._cond:
            self.silence_samples += n
        self.append(np.zeros(n, np.float32), captured_at)

    def finish(self, at: float) -> None:
        with self._cond:
            self._timeline.finish()
            self._note_ready(at)

    def _note_ready(self, at: float) -> None:
        ready = self._timeline.frames_ready
        for _ in range(self._frames_ready, ready):
            self._ready_times.append(at)
        self._frames_ready = max(ready, self._frames_ready)
        self._cond.notify_all()

    # ------------------------------------------------------------ readers
    @property
    def samples(self) -> int:
        with self._cond:
            return self._timeline.samples

    @property
    def frames_ready(self) -> int:
        with self._cond:
            return self._frames_ready

    @property
    def total_frames(self) -> int | None:
        with self._cond:
            return self._timeline.total_frames

    def mel_window(self, k: int) -> np.ndarray:
        with self._cond:
            return self._timeline.mel_window(k)

    def slot_audio(self, k: int) -> np.ndarray:
        with self._cond:
            return self._timeline.slot_audio(k)

    def ready_at(self, k: int) -> float | None:
        """When frame k's mel window was complete, or None while it is not (or no longer held)."""
        with self._cond:
            i = k - self._first
            return self._ready_times[i] if 0 <= i < len(self._ready_times) else None

    def slot_captured_at(self, k: int) -> float | None:
        """When the last sample of slot k's own audio was captured (None if not yet, or forgotten)."""
        end = SAMPLES_PER_FRAME * (k + 1)
        with self._cond:
            i = bisect.bisect_left(self._arrivals, end, key=lambda a: a[0])
            return self._arrivals[i][1] if i < len(self._arrivals) else None

    def release(self, k: int) -> None:
        """Slots before k are done with: forget their instants."""
        with self._cond:
            while self._first < k and self._ready_times:
                self._ready_times.popleft()
                self._first += 1
            end = SAMPLES_PER_FRAME * k
            while len(self._arrivals) > 1 and self._arrivals[1][0] <= end:
                self._arrivals.popleft()

    def wait(self, timeout: float) -> None:
        """Block until new audio arrives (or `timeout` passes)."""
        with self._cond:
            self._cond.wait(timeout)

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()


class AudioPump:
    """Moves audio from the source into the `LiveTimeline` on its own thread, until the source ends or
    `stop` is called. Owned by the scheduler's live loop, which starts and stops it; an exception on
    the thread is kept in `error` for the loop to raise."""

    def __init__(self, source: AudioSource, timeline: LiveTimeline) -> None:
        self._source, self._timeline = source, timeline
        self._worker = Worker(self._run, "audio-pump")
        self.error: BaseException | None = None

    def start(self) -> None:
        self._worker.start()

    def _run(self) -> None:
        try:
            while not self._worker.stopping.is_set():
                chunk = self._source.read(PUMP_READ_TIMEOUT_S)
                if chunk is None:
                    if self._source.finished:
                        self._timeline.finish(time.monotonic())
                        return
                    continue
                gap = chunk.start_sample - self._timeline.samples
                if gap > 0:  # the source dropped blocks: keep the timeline continuous with silence
                    log.warning("audio source skipped %d samples; filling with silence", gap)
                    self._timeline.fill_silence(gap, chunk.captured_at)
                self._timeline.append(chunk.samples, chunk.captured_at)
        except BaseException as exc:  # handed to the live loop, which raises it
            self.error = exc
            self._timeline.notify()

    def stop(self) -> None:
        """Idempotent; returns within one read timeout."""
        self._worker.stop()
