"""Live pose cost: the face is detected once and then tracked; the pose rate is capped and the code
interpolated per output frame. The detector is injected and counts its calls."""
from __future__ import annotations

import os

import numpy as np
import pytest

from capture.pose_rate import InterpolatedPose, PoseBudget, PoseInterpolator, RateLimitedSource
from capture.pose_sources import PoseSample
from pcavs.alignment import LiveAligner
from pcavs.alignment.tracking import (ScopedDetector, TrackingDetector, box_from_landmarks, fraction_inside,
                                      tracking_detector)
from tests.fakes import ListFrameSource

W, H = 320, 240


def face_at(cx: float, cy: float, size: float = 60.0) -> np.ndarray:
    """68 landmarks of a schematic face centred at (cx, cy): eyes above the mouth, jaw around."""
    rng = np.random.default_rng(0)
    pts = rng.uniform(-0.5, 0.5, (68, 2))
    pts[36:42] = [-0.2, -0.15]
    pts[42:48] = [0.2, -0.15]
    pts[60:68] = [0.0, 0.25]
    return (pts * size + [cx, cy]).astype(np.float32)


class FakeModel:
    """Box detector + landmarks in a box. The face is wherever `self.face` says (None: no face); the
    landmark score is high when the asked box contains the face's centre."""

    def __init__(self) -> None:
        self.face: tuple[float, float] | None = (160.0, 120.0)
        self.box_calls = 0
        self.landmark_calls = 0
        self.score = 0.9

    def face_boxes(self, rgb):
        self.box_calls += 1
        if self.face is None:
            return []
        cx, cy = self.face
        return [np.array([cx - 40, cy - 45, cx + 40, cy + 40, 0.99])]

    def landmarks_in_boxes(self, rgb, boxes):
        self.landmark_calls += 1
        out = []
        for box in boxes:
            inside = self.face is not None and box[0] <= self.face[0] <= box[2] and box[1] <= self.face[1] <= box[3]
            centre = self.face if inside else ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            out.append((face_at(*centre), self.score if inside else 0.05))
        return out


FRAME = np.zeros((H, W, 3), np.uint8)


def test_detects_once_then_tracks_the_moving_face():
    model = FakeModel()
    tracker = TrackingDetector(model)
    for step in range(6):
        model.face = (160.0 + 4 * step, 120.0 - 2 * step)  # a few pixels per pose frame
        faces = tracker.detect(FRAME)
        assert len(faces) == 1
        np.testing.assert_allclose(faces[0].mean(0), face_at(*model.face).mean(0), atol=1e-3)
    assert model.box_calls == 1
    assert tracker.counters.detections == 1 and tracker.counters.tracked == 5 and tracker.counters.lost == 0


def test_low_landmark_quality_loses_the_track_and_detects_again():
    model = FakeModel()
    tracker = TrackingDetector(model, min_score=0.3)
    tracker.detect(FRAME)
    model.face = (60.0, 60.0)            # a jump far outside the tracked box: FAN sees no face there
    faces = tracker.detect(FRAME)
    assert model.box_calls == 2 and tracker.counters.lost == 1
    np.testing.assert_allclose(faces[0].mean(0), face_at(60.0, 60.0).mean(0), atol=1e-3)
    tracker.detect(FRAME)
    assert model.box_calls == 2            # tracking again


def test_box_leaving_the_frame_loses_the_track():
    """The face walks out at the right edge, tracked all the way (FAN keeps finding it in the box) until
    less than `min_inside` of the box is in the frame: then the detector runs."""
    model = FakeModel()
    tracker = TrackingDetector(model, min_inside=0.75)
    tracker.detect(FRAME)
    inside_when_lost = None
    for x in range(170, W + 60, 10):
        model.face = (float(x), 120.0)
        box = tracker._box.copy()
        calls = model.box_calls
        tracker.detect(FRAME)
        if model.box_calls > calls:
            inside_when_lost = fraction_inside(box, W, H)
            break
    assert inside_when_lost is not None and inside_when_lost < 0.75
    assert tracker.counters.lost == 1 and tracker.counters.tracked >= 5


def test_no_face_keeps_detecting_every_frame():
    model = FakeModel()
    model.face = None
    tracker = TrackingDetector(model)
    assert tracker.detect(FRAME) == [] and tracker.detect(FRAME) == []
    assert model.box_calls == 2 and not tracker.tracking
    model.face = (100.0, 100.0)
    assert len(tracker.detect(FRAME)) == 1 and tracker.tracking


def test_tracker_drives_the_live_aligner():
    model = FakeModel()
    aligner = LiveAligner(TrackingDetector(model))
    rgb = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)
    crops = [aligner.align(rgb) for _ in range(3)]
    assert all(c is not None and c.image.shape == (224, 224, 3) for c in crops)
    assert model.box_calls == 1


def test_scope_is_entered_around_model_calls():
    entered = []

    class Scope:
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *exc):
            return False

    model = FakeModel()
    tracker = tracking_detector(model, scope=Scope)
    assert isinstance(tracker, TrackingDetector)
    tracker.detect(FRAME)
    tracker.detect(FRAME)
    assert len(entered) == 2

    class PlainDetector:  # one-call detectors (tests' fakes, sidecar-less stand-ins) are not tracked
        def detect(self, rgb):
            return [face_at(100, 100)]

    plain = tracking_detector(PlainDetector(), scope=Scope)
    assert isinstance(plain, ScopedDetector) and len(plain.detect(FRAME)) == 1 and len(entered) == 3


def test_box_geometry():
    box = box_from_landmarks(np.array([[10.0, 20.0], [50.0, 100.0]]), margin=0.1, top_extra=0.1)
    np.testing.assert_allclose(box, [6.0, 4.0, 54.0, 108.0, 1.0])
    assert fraction_inside(np.array([-10, 0, 10, 10]), 100, 100) == pytest.approx(0.5)
    assert fraction_inside(np.array([0, 0, 10, 10]), 100, 100) == 1.0
    assert fraction_inside(np.array([200, 0, 210, 10]), 100, 100) == 0.0


# ------------------------------------------------------------------------------------- rate and interpolation
def frames_at(times, frame=None):
    """A live camera that captured `frame` (FRAME) at each of `times`."""
    return ListFrameSource([FRAME if frame is None else frame] * len(times), times=times, realtime=True)


def test_rate_cap_passes_12_5_frames_per_second_of_a_30_fps_camera():
    times = [i / 30 for i in range(60)]  # two seconds
    src = RateLimitedSource(frames_at(times), rate_hz=12.5)
    passed = []
    while (item := src.read()) is not None:
        passed.append(item[1])
    assert len(passed) == src.frames_passed and src.frames_passed + src.frames_skipped == 60
    assert 24 <= len(passed) <= 26
    gaps = np.diff(passed)
    assert gaps.min() >= 1 / 30 - 1e-9 and gaps.max() <= 0.1 + 1e-9
    src.close()
    assert src.source.closed


def test_rate_cap_never_bursts_after_a_stall():
    src = RateLimitedSource(frames_at([0.0, 1.0, 1.01, 1.02, 1.05, 1.09]), rate_hz=12.5)
    passed = [src.read()[1] for _ in range(3)]
    # After the stall the next frame waits at least half a period (no burst of "overdue" frames).
    assert passed == [0.0, 1.0, 1.05] and src.read() is None and src.frames_skipped == 3


def test_interpolation_between_the_two_newest_codes():
    interp = PoseInterpolator(horizon_s=0.04)
    assert interp.at(0.0) is None
    interp.update(np.zeros(12), 1.0)
    np.testing.assert_array_equal(interp.at(5.0), np.zeros(12))        # one sample: held
    interp.update(np.ones(12), 1.08)
    np.testing.assert_allclose(interp.at(1.04), np.full(12, 0.5))      # half-way
    np.testing.assert_allclose(interp.at(0.9), np.zeros(12))           # clamped before the older
    np.testing.assert_allclose(interp.at(1.10), np.full(12, 1.25))     # extrapolated within the horizon
    np.testing.assert_allclose(interp.at(2.00), np.full(12, 1.5))      # held past it (0.04 s beyond)
    interp.update(np.full(12, 3.0), 1.16)                              # the older sample drops out
    np.testing.assert_allclose(interp.at(1.12), np.full(12, 2.0))


def test_interpolated_pose_follows_the_worker():
    class Worker:
        sample = None

        def latest(self):
            return self.sample

    now = [10.0]
    seen = []
    worker = Worker()
    pose = InterpolatedPose(worker, rate_hz=12.5, clock=lambda: now[0], on_sample=seen.append)
    assert pose() is None
    worker.sample = PoseSample(np.zeros(12, np.float32), 9.92, True, 0)
    worker.sample = PoseSample(np.zeros(12, np.float32), 9.92, True, 0)
    pose()
    worker.sample = PoseSample(np.ones(12, np.float32), 10.0, True, 0)
    now[0] = 10.04                       # shown: the pose at 10.04 − 0.08 = 9.96, half-way
    np.testing.assert_allclose(pose(), np.full(12, 0.5))
    pose()
    assert len(seen) == 2                # each new sample once


def test_live_pose_path_tracks_caps_and_interpolates():
    """start_live_pose end to end on the CPU: a 30 fps source through the rate cap, one detection then
    tracking, codes published and interpolated, counters in the metrics."""
    import time

    from pcavs_live.pipeline.engine_setup import start_live_pose
    from pcavs_live.pipeline.metrics import LiveMetrics

    class Avatar:  # what the pose path uses of an avatar
        device = "cpu"

        def __init__(self):
            self.calls = 0

        def pose_code(self, x):
            self.calls += 1
            return np.full(12, float(self.calls), np.float32)

    rgb = np.random.default_rng(2).integers(0, 256, (H, W, 3), dtype=np.uint8)
    source = frames_at([i / 30 for i in range(30)], rgb)
    source.realtime = False  # read in order by the worker: every passed frame is processed
    model, metrics, avatar = FakeModel(), LiveMetrics(), Avatar()
    worker, pose = start_live_pose(source, avatar, model, smoothing=None, rate_hz=12.5, metrics=metrics)
    try:
        deadline = time.monotonic() + 10
        while not worker.finished and time.monotonic() < deadline:
            time.sleep(0.01)
        worker.check()
    finally:
        worker.stop()
    assert worker.finished and 12 <= worker.frames_processed <= 14 and avatar.calls == worker.frames_processed
    assert model.box_calls == 1
    code = pose()
    assert code is not None and code.shape == (12,)
    snap = metrics.snapshot()
    assert snap["pose_detections"] == 1 and snap["pose_frames_skipped"] == 30 - worker.frames_processed
    assert snap["pose_face_found"] is True


# ------------------------------------------------------------------------------------- CPU pose budget
class FakeCpuClock:
    """Thread CPU time that advances only when a pose step 'spends' it."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def spend(clock, seconds):
    def step(*_):
        clock.t += seconds
        return "done"
    return step


@pytest.mark.parametrize("cost_s,expected_hz", [(0.2, 2.5), (0.01, 12.5), (2.0, 1.0)])
def test_pose_budget_leaves_three_quarters_of_the_machine(cost_s, expected_hz):
    """2 cores, a quarter for the pose worker: 0.5 CPU-s per second. A 200 ms pose frame → 2.5 Hz; a cheap
    one stays at the configured 12.5 Hz; a very slow one is held at the 1 Hz floor."""
    clock = FakeCpuClock()
    budget = PoseBudget(12.5, cores=2, alpha=1.0, cpu_clock=clock)
    assert budget.rate_hz == 12.5 and budget.frame_cpu_ms is None      # nothing measured yet
    align = budget.wrap(spend(clock, cost_s * 0.75), new_frame=True)
    encode = budget.wrap(spend(clock, cost_s * 0.25))
    for _ in range(3):
        assert align() == "done" and encode() == "done"
    budget.close_frame()
    assert budget.frames_measured == 3
    assert budget.frame_cpu_ms == pytest.approx(cost_s * 1e3)
    assert budget.rate_hz == pytest.approx(expected_hz) and budget() == budget.rate_hz


def test_pose_budget_averages_and_ignores_idle_time():
    clock = FakeCpuClock()
    budget = PoseBudget(12.5, cores=4, alpha=0.5, cpu_clock=clock)
    align = budget.wrap(spend(clock, 0.1), new_frame=True)
    align()
    budget.close_frame()
    budget.close_frame()                       # nothing spent since: no frame, no change
    clock.t += 5.0                             # CPU spent outside the wrapped steps is not the worker's
    align = budget.wrap(spend(clock, 0.3), new_frame=True)
    align()
    budget.close_frame()
    assert budget.frames_measured == 2 and budget.frame_cpu_ms == pytest.approx(200.0)
    assert budget.rate_hz == pytest.approx(0.25 * 4 / 0.2)
    with pytest.raises(ValueError):
        PoseBudget(12.5, min_hz=20.0)


def test_rate_cap_follows_a_changing_rate():
    rate = [12.5]
    src = RateLimitedSource(frames_at([i / 100 for i in range(200)]), rate_hz=lambda: rate[0])
    first = [src.read()[1] for _ in range(5)]
    assert np.diff(first).min() >= 0.08 - 1e-9
    rate[0] = 2.0
    later = [src.read()[1] for _ in range(3)]
    assert np.diff(later).min() >= 0.5 - 1e-9 and src.period == 0.5


def test_live_pose_on_a_cpu_lowers_the_rate_for_a_costly_pose_frame():
    """start_live_pose on the CPU with a pose encoder burning 150 ms of CPU per frame: the budget measures
    the worker thread's CPU time and brings the rate under the configured 12.5 Hz, in the stats; the
    worker thread's torch runs on one intra-op thread, the caller's is left as it was."""
    import time

    import torch

    from pcavs_live.pipeline.engine_setup import cpu_pose_threads, start_live_pose
    from pcavs_live.pipeline.metrics import LiveMetrics

    threads_seen = []

    class Avatar:
        device = "cpu"

        def pose_code(self, x):
            threads_seen.append(torch.get_num_threads())
            t0 = time.thread_time()
            while time.thread_time() - t0 < 0.15:
                pass
            return np.zeros(12, np.float32)

    caller_threads = torch.get_num_threads()
    rgb = np.random.default_rng(3).integers(0, 256, (H, W, 3), dtype=np.uint8)
    source = ListFrameSource([rgb] * 30, times=[i / 30 for i in range(30)], realtime=False)
    metrics = LiveMetrics()
    worker, pose = start_live_pose(source, Avatar(), FakeModel(), smoothing=None, rate_hz=12.5, metrics=metrics)
    try:
        deadline = time.monotonic() + 30
        while not worker.finished and time.monotonic() < deadline:
            time.sleep(0.01)
        worker.check()
    finally:
        worker.stop()
    snap = metrics.snapshot()
    cores = len(os.sched_getaffinity(0))
    assert snap["pose_cpu_ms"] >= 150
    assert snap["pose_rate_hz"] <= max(1.0, 0.25 * cores / 0.15) + 0.01 < 12.5 or cores >= 8
    assert worker.frames_processed < 12        # 12.5 Hz would have passed 12-13 of the 30 frames
    assert threads_seen and set(threads_seen) == {cpu_pose_threads()} == {caller_threads}
    assert torch.get_num_threads() == caller_threads
