"""Pose frame sources and the pose worker (alignment + injected encoder on real threads)."""
from __future__ import annotations

import logging
import threading
import time

import av
import numpy as np
import pytest

from capture.pose_sources import (CameraError, EmaFilter, PoseSample, PoseWorker, VideoFileSource, VideoSourceError,
                                  WebcamSource, encode_pose_video, make_pose_filter, ping_pong_index)
from pcavs.alignment import LiveAligner
from tests.fakes import ListFrameSource, RepeatFrameSource

DEADLINE_S = 20.0  # generous upper bound for waiting on threads (never a speed assert)


def wait_for(predicate, what: str) -> None:
    end = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


# --------------------------------------------------------------------------- sources
def test_webcam_that_does_not_exist_raises_camera_error():
    with pytest.raises(CameraError, match=r"cannot open camera 97 .*available: .*/dev/video") as e:
        WebcamSource(97)
    assert "\n" not in str(e.value)


def write_mp4(path, colours, size=(64, 48), fps=25, gop: int | None = None) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"qscale": "2"}
        if gop is not None:
            stream.codec_context.gop_size = gop
        for c in colours:
            img = np.empty((size[1], size[0], 3), np.uint8)
            img[:] = c
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


COLOURS = [(20 * i + 10, 200 - 15 * i, 120) for i in range(8)]


def test_video_file_source_yields_every_frame_then_none(tmp_path):
    path = tmp_path / "pose.mp4"
    write_mp4(path, COLOURS)
    src = VideoFileSource(path, realtime=False, ping_pong=False)
    frames = []
    while (item := src.read()) is not None:
        frames.append(item)
    src.close()
    assert len(frames) == len(COLOURS)
    for (rgb, _), colour in zip(frames, COLOURS):
        assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
        assert np.abs(rgb.reshape(-1, 3).mean(0) - colour).max() < 6  # lossy codec, flat colours
    steps = np.diff([t for _, t in frames])
    np.testing.assert_allclose(steps, 1 / 25, atol=1e-6)  # media-time stamps even when decoding fast


# upstream's calc_loop_idx(i, n) for i = 0..13, as printed by running upstream's util.py
UPSTREAM_LOOP_IDX = {1: [0] * 14,
                     2: [0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1],
                     3: [0, 1, 2, 2, 1, 0, 0, 1, 2, 2, 1, 0, 0, 1],
                     5: [0, 1, 2, 3, 4, 4, 3, 2, 1, 0, 0, 1, 2, 3]}


def test_ping_pong_index_is_upstreams_loop_index():
    for n, expected in UPSTREAM_LOOP_IDX.items():
        assert [ping_pong_index(i, n) for i in range(14)] == expected, n
    for n, length in ((4, 30), (7, 25), (10, 64), (25, 200)):  # spec §5: 0…n−1, n−1…0, 0…n−1, …
        lap = list(range(n)) + list(range(n - 1, -1, -1))
        assert [ping_pong_index(i, n) for i in range(length)] == (lap * length)[:length], n


def colour_index(rgb: np.ndarray, colours) -> int:
    return int(np.argmin([np.abs(rgb.reshape(-1, 3).mean(0) - c).sum() for c in colours]))


@pytest.mark.parametrize("gop, chunk_frames", [(3, 2), (100, 3), (100, 1000)])
def test_video_file_source_ping_pongs_with_continuous_timestamps(tmp_path, gop, chunk_frames):
    """Back and forth in upstream's order on one clock (the end frames shown twice, one interval each),
    whatever the keyframe spacing and the size of the chunks a backward pass decodes."""
    path = tmp_path / "pose.mp4"
    write_mp4(path, COLOURS, gop=gop)
    src = VideoFileSource(path, realtime=False, ping_pong=True, reverse_chunk_bytes=chunk_frames * 64 * 48 * 3)
    items = [src.read() for _ in range(3 * len(COLOURS) + 5)]
    src.close()
    assert [colour_index(rgb, COLOURS) for rgb, _ in items] == \
        [ping_pong_index(i, len(COLOURS)) for i in range(len(items))]
    np.testing.assert_allclose(np.diff([t for _, t in items]), 1 / 25, atol=1e-6)
    np.testing.assert_array_equal(items[7][0], items[8][0])  # the last frame twice, decoded alike


def test_video_file_source_realtime_never_returns_a_frame_early(tmp_path):
    path = tmp_path / "pose.mp4"
    write_mp4(path, COLOURS[:4])
    src = VideoFileSource(path, realtime=True)
    while (item := src.read()) is not None:
        assert time.monotonic() >= item[1]
    src.close()


def test_video_file_errors_name_the_file(tmp_path):
    with pytest.raises(VideoSourceError, match="pose video not found: .*nope.mp4"):
        VideoFileSource(tmp_path / "nope.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(VideoSourceError, match="bad.mp4"):
        VideoFileSource(bad)


# --------------------------------------------------------------------------- smoothing
def noisy_then_step(n_noise=200, n_step=40, seed=0):
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, 0.05, (n_noise, 12))
    step = np.ones((n_step, 12)) + rng.normal(0.0, 0.05, (n_step, 12))
    return np.concatenate([noise, step]), np.arange(n_noise + n_step) / 25.0


def test_ema_filter_reduces_jitter_and_follows_a_step():
    codes, times = noisy_then_step()
    f, max_steps = EmaFilter(0.1), 8
    out = np.array([f.update(c, t) for c, t in zip(codes, times)])
    still_in, still_out = codes[50:200], out[50:200]
    assert still_out.var(0).mean() < 0.3 * still_in.var(0).mean()
    # after the step (value 0 → 1) the output is within 0.15 of the new level after max_steps updates
    assert np.abs(out[200 + max_steps:].mean(1) - 1.0).max() < 0.15
    assert np.abs(out[200 + 1].mean() - 1.0) > 0.15  # ... and it was smoothing, not passing through


def test_config_smoothing_float_matches_per_frame_ema_at_25_fps():
    f = make_pose_filter(0.5)
    assert isinstance(f, EmaFilter)
    y = [f.update(np.full(12, x), t / 25) for t, x in enumerate([0.0, 1.0, 1.0])]
    np.testing.assert_allclose([v[0] for v in y], [0.0, 0.5, 0.75], atol=1e-6)  # y = .5·y + .5·x
    assert make_pose_filter(0) is None and make_pose_filter(None) is None
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        make_pose_filter(1.0)


def test_filter_survives_repeated_timestamps():
    f = EmaFilter(0.1)
    f.update(np.zeros(12), 1.0)
    assert np.isfinite(f.update(np.ones(12), 1.0)).all()


# --------------------------------------------------------------------------- worker
def run_recording(worker: PoseWorker, source: ListFrameSource) -> list[PoseSample]:
    """Run `worker` over an in-order (not real-time) ListFrameSource to its end and return the sample published
    after each frame: the processing thread itself reads the next frame, so at read n the worker has
    finished frame n-1."""
    seen: list[PoseSample | None] = []
    source.on_read = lambda n: seen.append(worker.latest()) if n > 0 else None
    worker.start()
    wait_for(lambda: worker.finished, "the source to end")
    worker.stop()
    worker.check()
    return seen


def flat_frame(value: int) -> np.ndarray:
    return np.full((160, 160, 3), value, np.uint8)


FACE = None


def face_landmarks() -> np.ndarray:
    global FACE
    if FACE is None:
        from tests.test_alignment import synthetic_landmarks
        FACE = synthetic_landmarks(np.array([[60.0, 60.0], [100.0, 60.0], [80.0, 105.0]]))
    return FACE


class ValueDetector:
    """A face wherever the frame is not black (so tests control presence per frame)."""

    def detect(self, rgb):
        return [] if rgb[0, 0, 0] == 0 else [face_landmarks()]


def value_encoder(aligned: np.ndarray) -> np.ndarray:
    # the crop centre comes from inside the flat frame, so the code carries the frame's value
    return np.full(12, aligned[112, 112, 0] / 255.0)


def test_worker_holds_last_pose_without_face_and_recovers(caplog):
    values = [50] * 4 + [0] * 3 + [200] * 4
    source = ListFrameSource([flat_frame(v) for v in values])
    worker = PoseWorker(source, LiveAligner(ValueDetector()), value_encoder, smoothing=None)
    with caplog.at_level(logging.INFO, logger="capture.pose_sources"):
        samples = run_recording(worker, source)
    assert len(samples) == len(values)
    assert [s.face_found for s in samples] == [v != 0 for v in values]
    assert [s.frames_without_face for s in samples] == [0] * 4 + [1, 2, 3] + [0] * 4
    codes = np.array([s.code for s in samples])
    np.testing.assert_allclose(codes[:7], 50 / 255, atol=1e-6)      # held through the gap
    np.testing.assert_allclose(codes[7:], 200 / 255, atol=1e-6)     # recovered
    messages = [r.getMessage() for r in caplog.records]
    assert sum("face lost; holding last pose" in m for m in messages) == 1
    assert sum("face found" in m for m in messages) == 1
    assert worker.latest().code[0] == pytest.approx(200 / 255) and worker.finished


def test_worker_publishes_nothing_before_the_first_face():
    """Until a face is seen, latest() stays None: the engine then renders the photo's own pose."""
    source = ListFrameSource([flat_frame(0), flat_frame(0), flat_frame(90)])
    worker = PoseWorker(source, LiveAligner(ValueDetector()), value_encoder, smoothing=None)
    assert worker.latest() is None
    samples = run_recording(worker, source)
    assert samples[:2] == [None, None]
    assert samples[2].face_found and samples[2].code[0] == pytest.approx(90 / 255)


def test_worker_applies_the_smoothing_filter():
    rng = np.random.default_rng(1)
    values = [int(v) for v in rng.integers(60, 200, 30)]
    source = ListFrameSource([flat_frame(v) for v in values])
    worker = PoseWorker(source, LiveAligner(ValueDetector()), value_encoder, smoothing=EmaFilter(0.2))
    samples = run_recording(worker, source)
    out = np.array([s.code[0] for s in samples])
    raw = np.array(values) / 255.0
    assert len(out) == len(raw) and out.var() < 0.5 * raw.var()


def test_worker_drops_stale_frames_from_realtime_sources():
    """While frame 0 is being encoded, frames 1..5 arrive: only the newest (5) must be processed."""
    encoding_started, all_pushed = threading.Event(), threading.Event()

    def on_read(n):
        if n == 1:
            assert encoding_started.wait(DEADLINE_S)
        if n == 6:  # frames 1..5 are in the mailbox (each replacing the previous)
            all_pushed.set()

    encoded = []

    def slow_encode(aligned):
        encoding_started.set()
        assert all_pushed.wait(DEADLINE_S)
        encoded.append(value_encoder(aligned))
        return encoded[-1]

    source = ListFrameSource([flat_frame(10 * (i + 1)) for i in range(6)], realtime=True, on_read=on_read)
    worker = PoseWorker(source, LiveAligner(ValueDetector()), slow_encode, smoothing=None)
    worker.start()
    wait_for(lambda: worker.finished, "the source to end")
    worker.stop()
    worker.check()
    assert worker.frames_processed == 2 and worker.frames_dropped == 4
    np.testing.assert_allclose([code[0] for code in encoded], [10 / 255, 60 / 255], atol=1e-6)
    assert worker.latest().code[0] == pytest.approx(60 / 255)


def test_worker_exception_surfaces_through_check():
    def broken_encode(aligned):
        raise RuntimeError("pose encoder exploded")

    worker = PoseWorker(RepeatFrameSource(flat_frame(80), interval=0.01), LiveAligner(ValueDetector()),
                        broken_encode, smoothing=None)
    worker.start()
    wait_for(lambda: not worker.alive, "the worker to die")
    with pytest.raises(RuntimeError, match="pose encoder exploded"):
        worker.check()
    worker.stop()
    assert not worker.finished


def test_reader_exception_surfaces_through_check():
    class Failing(ListFrameSource):
        def read(self):
            raise OSError("camera unplugged")

    worker = PoseWorker(Failing([], realtime=True), LiveAligner(ValueDetector()), value_encoder, None)
    worker.start()
    wait_for(lambda: not worker.alive, "the worker to die")
    with pytest.raises(OSError, match="camera unplugged"):
        worker.check()
    worker.stop()


def test_bad_encoder_output_is_reported():
    worker = PoseWorker(ListFrameSource([flat_frame(80)]), LiveAligner(ValueDetector()),
                        lambda a: np.zeros(5), smoothing=None)
    worker.start()
    wait_for(lambda: not worker.alive, "the worker to die")
    with pytest.raises(ValueError, match="12 finite values"):
        worker.check()
    worker.stop()


def test_stop_joins_the_threads_and_closes_the_source():
    source = RepeatFrameSource(flat_frame(120), interval=0.01)
    worker = PoseWorker(source, LiveAligner(ValueDetector()), value_encoder, smoothing=EmaFilter(0.1))
    worker.start()
    wait_for(lambda: worker.latest() is not None, "a first pose")
    assert worker.alive and not worker.finished
    worker.stop()
    assert not worker.alive and worker._workers and not any(w.alive for w in worker._workers)
    assert source.read() is None  # closed
    worker.stop()  # idempotent


# --------------------------------------------------------------------------- offline pose sequence
def test_offline_crops_of_a_pose_video_are_align_68_folder_mean_crops(tmp_path):
    """The crops `encode_pose_video` encodes are upstream's align_68 crops of the whole clip (one transform
    from the folder-mean anchors, smoothed mouth bias), computed independently from the same landmarks."""
    from tests.test_alignment import align_68_folder_crops, assert_same_crop, moving_head
    frames, marks = moving_head(6)
    path = tmp_path / "head.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 512, 512, "yuv420p"
        stream.options = {"qscale": "2"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    src = VideoFileSource(path, realtime=False)
    decoded = [item[0] for item in iter(src.read, None)]  # what the pose path sees of the file
    landmarks = iter(marks)

    class InOrder:
        def detect(self, rgb):
            return [next(landmarks)]

    crops: list[np.ndarray] = []

    def encoder(batch):
        crops.extend(batch)
        return np.zeros((len(batch), 12), np.float32)

    sequence = encode_pose_video(path, InOrder(), encoder, batch_size=4)
    assert len(sequence) == len(crops) == 6 and sequence.face_found.all()
    for got, want in zip(crops, align_68_folder_crops(decoded, marks)):
        assert_same_crop(got, want)
