"""Scheduler behaviour with fakes at the seams: frame counts, audio continuity, dropping under load."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from capture.audio_sources import AudioChunk
from pcavs_live.pipeline.scheduler import Scheduler, SchedulerOptions
from pcavs_live.pipeline.timeline import AudioTimeline
from tests.fakes import ListAudioSource, RecordingSink


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


def speechlike(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def make(audio, renderer, realtime, **src_kw):
    sink = RecordingSink()
    sched = Scheduler(ListAudioSource(audio, realtime=realtime, **src_kw), AudioTimeline(HopMel()), renderer, sink,
                      placeholder=np.zeros((8, 8, 3), np.uint8),
                      options=SchedulerOptions())
    return sched, sink


def test_slow_generator_drops_frames_and_keeps_latency_bounded():
    audio = speechlike(3.0)
    renderer = MelEchoRenderer(delay_s=0.2)  # 5 fps generator vs 25 fps stream
    sched, sink = make(audio, renderer, realtime=True)
    summary = sched.run()
    assert summary.frames_out == 75  # every slot is still filled (audio keeps flowing)
    assert sink.indices == list(range(75))
    assert 0 < summary.frames_generated < 40 and summary.frames_repeated > 30
    snap = sched.metrics.snapshot()
    # A growing backlog would reach seconds; bounded latency stays near one render + one block.
    assert snap["latency_ms_max"] is not None and snap["latency_ms_max"] < 1000
    np.testing.assert_array_equal(np.concatenate(sink.audio)[: len(audio)], audio)


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
    src = LoopedAudioSource(lambda start_at: ListAudioSource(clip))
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


@pytest.mark.parametrize("upstream_numbering, look_ahead_ms", [(False, 120), (True, 200)])
def test_frame_is_ready_exactly_when_its_look_ahead_audio_arrives(upstream_numbering, look_ahead_ms):
    """Slot t needs audio up to 40t+120 ms (its window is the model's, spec §4), or 40t+200 ms with
    upstream's output numbering: ready with that sample, not one sample earlier."""
    from pcavs.mel import StreamingMel
    for t in (0, 1, 3, 10):
        timeline = AudioTimeline(StreamingMel(1.0), upstream_frame_numbering=upstream_numbering)
        need = 16 * (40 * t + look_ahead_ms)  # 16 samples per ms
        assert timeline.samples_needed(t) == need
        timeline.append(speechlike(need / 16000)[: need - 1], 0.0)
        assert timeline.frames_ready == t
        timeline.append(np.zeros(1, np.float32), 0.0)
        assert timeline.frames_ready == t + 1


# ------------------------------------------------------------------ the live loop (issue 10)
class TaggingRenderer:
    """Each frame carries its render number in pixel (0, 0); `windows[i]` is the mel window it was
    rendered from, so a test can tell which slot a frame was made for."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.windows: list[np.ndarray] = []
        self.started = threading.Event()

    def render(self, mel_windows, pose_codes=None, times=None):
        self.started.set()
        if self.delay_s:
            time.sleep(self.delay_s)
        frames = []
        for window in np.asarray(mel_windows):
            f = np.zeros((8, 8, 3), np.uint8)
            f[0, 0, 0], f[0, 0, 1] = len(self.windows) % 256, len(self.windows) // 256
            self.windows.append(window.copy())
            frames.append(f)
        return np.stack(frames)


def live(audio, renderer, sink=None, source=None, **options):
    sink = sink or RecordingSink()
    timeline = AudioTimeline(HopMel())
    sched = Scheduler(source or ListAudioSource(audio, realtime=True), timeline, renderer, sink,
                      placeholder=np.full((8, 8, 3), 255, np.uint8), options=SchedulerOptions(**options))
    return sched, sink, timeline


def test_live_slots_go_out_paced_one_by_one_never_in_bursts():
    """A generator at 5 fps: every slot still goes out once, in order, with its audio, and the output is
    paced at 25 fps instead of a burst of stale slots after each render (viewers drop bursts)."""
    audio = speechlike(3.0)
    sched, sink, _ = live(audio, MelEchoRenderer(delay_s=0.2))
    summary = sched.run()
    assert sink.indices == list(range(75)) and summary.frames_out == 75
    np.testing.assert_array_equal(np.concatenate(sink.audio)[: len(audio)], audio)
    gaps = np.diff(sink.times)
    # A release is never earlier than half a period after the one before; the old loop wrote the
    # stale slots back to back (gaps of microseconds).
    assert gaps.min() > 0.01, sorted(gaps)[:5]
    assert 0 < summary.frames_generated < 40


def test_live_frame_goes_out_with_its_own_slot():
    """Lips in sync: a frame rendered for slot k is shown first at slot k (with slot k's audio), not
    earlier and not later, while renders fit in the latency budget."""
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, 48000).astype(np.float32)  # every window unique
    renderer = TaggingRenderer(delay_s=0.15)
    sched, sink, timeline = live(audio, renderer)
    sched.run()
    first_shown: dict[int, int] = {}
    for k, frame in zip(sink.indices, sink.frames):
        if frame[0, 0, 2] == 0:  # a rendered frame, not the white placeholder
            first_shown.setdefault(int(frame[0, 0, 0]) + 256 * int(frame[0, 0, 1]), k)
    made_for = {}
    for i, window in enumerate(renderer.windows[sched.options.warmup_renders:], sched.options.warmup_renders):
        made_for[i] = next(k for k in range(75) if np.array_equal(timeline.mel_window(k), window))
    on_time = [i for i, k in first_shown.items() if made_for[i] == k]
    assert len(first_shown) >= 8
    assert all(made_for[i] <= k for i, k in first_shown.items())         # never shown early
    assert len(on_time) >= len(first_shown) - 1, (first_shown, made_for)
    assert sched.metrics.snapshot()["frames_late"] == len(first_shown) - len(on_time)


def test_a_render_longer_than_the_source_queue_loses_no_input_audio():
    """The source queue holds 0.2 s and one render takes 0.6 s: the audio pump keeps reading while the
    renderer works, so the output carries every input sample from the first one, nothing dropped."""
    from capture.audio_sources import FileAudioSource
    audio = speechlike(3.0)
    source = FileAudioSource.from_samples(audio, realtime=True, block_ms=20, max_queue_ms=200)
    sched, sink, _ = live(audio, MelEchoRenderer(delay_s=0.6), source=source)
    sched.run()
    assert source.dropped_blocks == 0
    assert sink.indices == list(range(75))
    np.testing.assert_array_equal(np.concatenate(sink.audio)[: len(audio)], audio)


def test_stop_during_a_long_render_returns_after_that_render():
    """A 3 s render: a stop 0.5 s into it ends run() when that render ends (within 1 s more), and
    the loop's threads are gone."""
    renderer = TaggingRenderer(delay_s=3.0)
    sched, sink, _ = live(speechlike(30.0), renderer, latency_s=0.2, warmup_renders=0)
    stop = threading.Event()
    result: dict = {}
    runner = threading.Thread(target=lambda: result.setdefault("summary", sched.run(stop)))
    runner.start()
    assert renderer.started.wait(10)
    time.sleep(0.5)
    t = time.monotonic()
    stop.set()
    runner.join(10)
    elapsed = time.monotonic() - t
    assert not runner.is_alive() and result["summary"].stopped_early and sink.closed
    assert elapsed < 2.5 + 1.0, elapsed
    assert not [th for th in threading.enumerate() if th.name in ("render", "audio-pump")]


def test_stop_while_waiting_returns_promptly():
    sched, sink, _ = live(speechlike(30.0), MelEchoRenderer())
    stop = threading.Event()
    result: dict = {}
    runner = threading.Thread(target=lambda: result.setdefault("summary", sched.run(stop)))
    runner.start()
    deadline = time.monotonic() + 10
    while len(sink.indices) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    t = time.monotonic()
    stop.set()
    runner.join(10)
    assert time.monotonic() - t < 1.0
    assert result["summary"].stopped_early and 10 <= result["summary"].frames_out < 750


def test_a_failing_render_ends_the_run_with_its_error_and_stops_the_threads():
    class Failing(MelEchoRenderer):
        def render(self, mel_windows, pose_codes=None, times=None):
            if len(self.calls) >= 3:
                raise RuntimeError("out of memory")
            return super().render(mel_windows, pose_codes, times)

    sched, sink, _ = live(speechlike(5.0), Failing())
    with pytest.raises(RuntimeError, match="out of memory"):
        sched.run()
    assert sink.closed
    assert not [th for th in threading.enumerate() if th.name in ("render", "audio-pump")]


def test_looped_file_keeps_one_clock_across_its_seams():
    """A real-time file looped five times, read by a consumer that dozes off now and then: every
    block is due at origin + its end sample / 16 kHz on one schedule, so no seam loses time (each pass
    used to restart its clock when the reader noticed the previous pass had ended)."""
    from capture.audio_sources import FileAudioSource
    from capture.looped_audio import LoopedAudioSource
    clip = speechlike(0.2)
    src = LoopedAudioSource(lambda start_at: FileAudioSource.from_samples(clip, realtime=True, start_at=start_at))
    src.start()
    chunks = []
    try:
        while len(chunks) < 50:
            c = src.read(0.5)
            if c is not None:
                chunks.append(c)
            if len(chunks) % 7 == 3:
                time.sleep(0.06)
    finally:
        src.stop()
    assert src.loops >= 4
    assert [c.start_sample for c in chunks] == [320 * i for i in range(50)]
    origin = chunks[0].captured_at - 320 / 16000
    drift = [c.captured_at - (origin + (c.start_sample + len(c.samples)) / 16000) for c in chunks]
    assert max(abs(d) for d in drift) < 1e-6, drift


def test_live_input_gap_is_filled_with_silence_and_counted():
    audio = speechlike(2.0)
    sched, sink, _ = live(audio, MelEchoRenderer(), source=ListAudioSource(audio, realtime=True, skip_blocks=(10, 11)))
    sched.run()
    out = np.concatenate(sink.audio)[: len(audio)]
    assert np.all(out[3200:3840] == 0)
    np.testing.assert_array_equal(out[:3200], audio[:3200])
    np.testing.assert_array_equal(out[3840:], audio[3840:])
    assert sched.metrics.snapshot()["input_silence_ms"] == 40.0
