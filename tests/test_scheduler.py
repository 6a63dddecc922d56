"""Scheduler behaviour with fakes at the seams: frame counts, audio continuity, dropping under load."""
from __future__ import annotations

import math
import queue
import threading
import time

import numpy as np
import pytest

from capture.audio_sources import AudioChunk
from pipeline.scheduler import Scheduler, SchedulerOptions
from pcavs.constants import SAMPLES_PER_FRAME
from pipeline.timeline import AudioTimeline


class HopMel:
    """Stand-in for StreamingMel with the same row timing (row m complete once 160(m+1) samples are in,
    7 tail rows at the end) and a recognisable value: row m = mean |x| of hop m, in every mel bin."""

    def __init__(self) -> None:
        self._pending = np.zeros(0, np.float32)

    def push(self, samples: np.ndarray) -> np.ndarray:
        self._pending = np.concatenate([self._pending, samples])
        n = len(self._pending) // 160
        hops = self._pending[: n * 160].reshape(n, 160)
        self._pending = self._pending[n * 160:]
        return np.repeat(np.abs(hops).mean(1, keepdims=True), 80, 1).astype(np.float32)

    def finish(self) -> np.ndarray:
        tail = np.zeros((7 + (1 if len(self._pending) else 0), 80), np.float32)
        return tail


class ListSource:
    """A finite audio source delivering fixed blocks, optionally paced in real time, optionally skipping."""

    sample_rate = 16000

    def __init__(self, audio: np.ndarray, block: int = 320, realtime: bool = False,
                 skip_blocks: tuple[int, ...] = ()) -> None:
        self._audio, self._block, self._realtime, self._skip = audio, block, realtime, set(skip_blocks)
        self._q: queue.Queue[AudioChunk] = queue.Queue(maxsize=8)
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._stop = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        for i, s in enumerate(range(0, len(self._audio), self._block)):
            if self._stop.is_set():
                break
            if self._realtime:
                time.sleep(max(0.0, t0 + (s + self._block) / 16000 - time.monotonic()))
            if i in self._skip:
                continue
            chunk = AudioChunk(self._audio[s:s + self._block], s, time.monotonic())
            while not self._stop.is_set():
                try:
                    self._q.put(chunk, timeout=0.05)
                    break
                except queue.Full:
                    pass
        self._done.set()

    def read(self, timeout: float) -> AudioChunk | None:
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None

    @property
    def finished(self) -> bool:
        return self._done.is_set() and self._q.empty()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class MelEchoRenderer:
    """Renders a frame whose pixels hold the mean of its mel window, so tests can tell frames apart."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: list[int] = []

    def render(self, mel_windows, pose_codes=None, times=None):
        if self.delay_s:
            time.sleep(self.delay_s)
        self.calls.append(len(mel_windows))
        vals = np.asarray(mel_windows).reshape(len(mel_windows), -1).mean(1)
        return np.stack([np.full((8, 8, 3), min(255, int(v * 1000)), np.uint8) for v in vals])


class RecordingSink:
    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self.audio: list[np.ndarray] = []
        self.indices: list[int] = []
        self.opened = self.closed = False

    def open(self, width, height, fps, sample_rate):
        self.opened = (width, height, fps, sample_rate)

    def write(self, frame, audio, frame_index):
        self.frames.append(frame)
        self.audio.append(audio)
        self.indices.append(frame_index)

    def close(self):
        self.closed = True


def speechlike(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def make(audio, renderer, realtime, **src_kw):
    sink = RecordingSink()
    sched = Scheduler(ListSource(audio, realtime=realtime, **src_kw), AudioTimeline(HopMel()), renderer, sink,
                      placeholder=np.zeros((8, 8, 3), np.uint8),
                      options=SchedulerOptions(realtime=realtime, batch_size=4))
    return sched, sink


def test_offline_renders_every_slot_with_its_audio():
    audio = speechlike(3.0)
    renderer = MelEchoRenderer()
    sched, sink = make(audio, renderer, realtime=False)
    summary = sched.run()
    assert summary.frames_out == 75 == math.ceil(len(audio) / SAMPLES_PER_FRAME)
    assert summary.frames_dropped == 0
    assert sink.indices == list(range(75))
    assert max(renderer.calls) == 4  # batched
    np.testing.assert_array_equal(np.concatenate(sink.audio)[: len(audio)], audio)
    assert sink.opened == (8, 8, 25, 16000) and sink.closed


def test_mel_window_follows_the_audio():
    """A burst of sound at 1.0–1.2 s must light up exactly the frames whose mel rows [4k, 4k+20) overlap
    it (spec §4). HopMel's row m holds hop [160m, 160m+160), so frame k sees samples [640k, 640k+3200)."""
    audio = np.zeros(32000, np.float32)
    audio[16000:19200] = 0.5
    sched, sink = make(audio, MelEchoRenderer(), realtime=False)
    sched.run()
    lit = [k for k, f in zip(sink.indices, sink.frames) if f[0, 0, 0] > 0]
    # [640k, 640k+3200) overlaps [16000, 19200) for 20 < k < 30
    assert lit == list(range(21, 30))


def test_partial_last_slot_gets_a_frame():
    audio = speechlike(1.01)  # 16160 samples → 26 slots, the last one partly silent
    sched, sink = make(audio, MelEchoRenderer(), realtime=False)
    assert sched.run().frames_out == 26
    assert len(sink.audio[-1]) == SAMPLES_PER_FRAME


def test_slow_generator_drops_frames_and_keeps_latency_bounded():
    audio = speechlike(3.0)
    renderer = MelEchoRenderer(delay_s=0.2)  # 5 fps generator vs 25 fps stream
    sched, sink = make(audio, renderer, realtime=True)
    summary = sched.run()
    assert summary.frames_out == 75  # every slot is still filled (audio keeps flowing)
    assert sink.indices == list(range(75))
    assert 0 < summary.frames_generated < 40 and summary.frames_dropped > 30
    snap = sched.metrics.snapshot()
    # A growing backlog would reach seconds; bounded latency stays near one render + one block.
    assert snap["latency_ms_max"] is not None and snap["latency_ms_max"] < 1000
    np.testing.assert_array_equal(np.concatenate(sink.audio)[: len(audio)], audio)


def test_source_gap_is_filled_with_silence():
    audio = speechlike(1.0)
    sched, sink = make(audio, MelEchoRenderer(), realtime=False, skip_blocks=(10, 11))
    sched.run()
    out = np.concatenate(sink.audio)[: len(audio)]
    assert np.all(out[3200:3840] == 0)
    np.testing.assert_array_equal(out[:3200], audio[:3200])
    np.testing.assert_array_equal(out[3840:], audio[3840:])


def test_stop_event_ends_a_live_run():
    audio = speechlike(30.0)
    sched, sink = make(audio, MelEchoRenderer(), realtime=True)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    summary = sched.run(stop)
    assert summary.stopped_early and summary.frames_out < 750 and sink.closed


def test_looped_source_continues_the_timeline_across_loops():
    from capture.looped_audio import LoopedAudioSource
    clip = speechlike(0.1)  # 1600 samples = 5 blocks
    src = LoopedAudioSource(lambda start_at: ListSource(clip))
    src.start()
    chunks = []
    try:
        while len(chunks) < 12:
            c = src.read(0.5)
            if c is not None:
                chunks.append(c)
    finally:
        src.stop()
    assert [c.start_sample for c in chunks] == [320 * i for i in range(12)]
    np.testing.assert_array_equal(np.concatenate([c.samples for c in chunks])[:3200], np.tile(clip, 2))
    assert src.loops >= 2 and not src.finished


def test_frame_is_ready_exactly_when_its_look_ahead_audio_arrives():
    """Frame k needs audio up to 40k+200 ms (spec §4): ready with that sample, not one sample earlier."""
    from pcavs.mel import StreamingMel, samples_needed_for_frame
    for k in (0, 3, 10):
        timeline = AudioTimeline(StreamingMel(1.0))
        need = samples_needed_for_frame(k)
        timeline.append(speechlike(need / 16000)[: need - 1], 0.0)
        assert timeline.frames_ready == k
        timeline.append(np.zeros(1, np.float32), 0.0)
        assert timeline.frames_ready == k + 1
