"""Issue 20, pose at scale: sessions' FAN crops through one batched forward (`pcavs.alignment.fan_batch`),
routed back to their own sessions, with a bounded queue and counted drops and timeouts."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pcavs.alignment.errors import LandmarksBusy
from pcavs.alignment.fan_batch import BatchedLandmarkModel, FanBatcher, StagedLandmarkModel
from pcavs.alignment.tracking import TrackingDetector, tracking_detector


class FakeFan:
    """A staged landmark model whose 'network' is counted and whose heatmaps carry each crop's own
    value, so a test can tell whose landmarks came back. Landmarks: a 68-point grid inside the box;
    score 0.5 + the crop's value / 1000 (the session's id)."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        self.forwards: list[int] = []
        self.inside = threading.Event()
        self.hold = hold
        self.boxes = 0
        self.session_value: dict[int, float] = {}   # id(frame) → value put into its crops

    def face_boxes(self, rgb):
        self.boxes += 1
        v = float(rgb[0, 0, 0])
        return [np.array([20.0 + v, 20.0, 80.0 + v, 80.0, 0.99])]

    def fan_inputs(self, rgb, boxes):
        v = float(rgb[0, 0, 0])
        return np.full((len(boxes), 3, 8, 8), v, np.float32), [np.asarray(b) for b in boxes]

    def fan_heatmaps(self, inputs):
        self.forwards.append(len(inputs))
        self.inside.set()
        if self.hold is not None:
            assert self.hold.wait(30)
        return inputs[:, :1, :2, :2].repeat(68, axis=1) * 1.0   # (n,68,2,2): the crop's value

    def landmarks_from_heatmaps(self, heatmaps, frames):
        out = []
        for hm, box in zip(heatmaps, frames):
            x1, y1, x2, y2 = box[:4]
            grid = np.stack(np.meshgrid(np.linspace(x1 + 5, x2 - 5, 17), np.linspace(y1 + 5, y2 - 5, 4)), -1)
            out.append((grid.reshape(68, 2).astype(np.float32), 0.5 + float(hm[0, 0, 0]) / 1000))
        return out


def frame(value: int) -> np.ndarray:
    rgb = np.zeros((120, 160, 3), np.uint8)
    rgb[0, 0, 0] = value
    return rgb


def wait_until(cond, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def pending(batcher: FanBatcher) -> int:
    with batcher._cond:
        return sum(len(r.inputs) for r in batcher._pending)


def test_each_session_gets_its_own_landmarks_and_k_crops_cost_one_forward():
    """Session 1 leads a forward (held); sessions 2..6 submit meanwhile and go through ONE forward
    together; every session gets its own landmarks back (distinct inputs, distinct outputs)."""
    hold = threading.Event()
    fan = FakeFan(hold)
    assert isinstance(fan, StagedLandmarkModel)
    batcher = FanBatcher(fan.fan_heatmaps, max_batch=16)
    got: dict[int, list] = {}

    def session(i: int) -> None:
        model = BatchedLandmarkModel(fan, batcher)
        box = np.array([20.0 + i, 20.0, 80.0 + i, 80.0, 1.0])
        got[i] = model.landmarks_in_boxes(frame(i), [box])

    first = threading.Thread(target=session, args=(1,))
    first.start()
    assert fan.inside.wait(30)
    rest = [threading.Thread(target=session, args=(i,)) for i in range(2, 7)]
    for t in rest:
        t.start()
    wait_until(lambda: pending(batcher) == 5)
    hold.set()
    for t in [first, *rest]:
        t.join(30)
    assert fan.forwards == [1, 5]
    for i in range(1, 7):
        (landmarks, score), = got[i]
        # session i's own crop's value came back, with the grid inside session i's own box
        assert score == pytest.approx(0.5 + i / 1000) and landmarks[0, 0] == pytest.approx(20.0 + i + 5)
    stats = batcher.stats()
    assert stats["pose_fan_passes"] == 2 and stats["pose_fan_crops"] == 6 and stats["pose_fan_largest_batch"] == 5
    assert stats["pose_fan_dropped"] == 0 and stats["pose_fan_timeouts"] == 0


def test_a_lone_session_runs_its_forward_at_once():
    fan = FakeFan()
    batcher = FanBatcher(fan.fan_heatmaps)
    model = BatchedLandmarkModel(fan, batcher)
    for i in range(3):
        (lm, score), = model.landmarks_in_boxes(frame(i), [np.array([10.0, 10.0, 50.0, 50.0, 1.0])])
        assert lm[0, 0] == pytest.approx(15.0) and score == pytest.approx(0.5 + i / 1000)
    assert fan.forwards == [1, 1, 1] and model.landmarks_in_boxes(frame(0), []) == []


def test_a_window_holds_the_forward_open_for_other_sessions_crops():
    """With a window the leader waits for more crops before its forward; a full batch ends the window
    at once (a 30 s window here, so the test never waits on the clock)."""
    fan = FakeFan()
    batcher = FanBatcher(fan.fan_heatmaps, max_batch=3, window_s=30.0)
    got: dict[int, float] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(
        i, batcher.heatmaps(np.full((1, 3, 8, 8), i, np.float32))[0, 0, 0, 0])) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert fan.forwards == [3] and got == {0: 0.0, 1: 1.0, 2: 2.0}


def test_buckets_pad_a_forward_and_warm_up_runs_each_bucket_once():
    """With buckets a forward of n crops runs at the smallest bucket holding n (zero crops added,
    counted, and never handed to anyone); the warm-up runs exactly the sizes 1..N sessions can form."""
    fan = FakeFan()
    batcher = FanBatcher(fan.fan_heatmaps, max_batch=8, buckets=(1, 2, 4, 8))
    out = batcher.heatmaps(np.stack([np.full((3, 8, 8), v, np.float32) for v in (5.0, 6.0, 7.0)]))
    assert fan.forwards == [4] and out.shape[0] == 3 and list(out[:, 0, 0, 0]) == [5.0, 6.0, 7.0]
    assert batcher.stats()["pose_fan_padded"] == 1 and batcher.stats()["pose_fan_crops"] == 3
    assert batcher.padded_size(5) == 8 and batcher.padded_size(9) == 9
    fan.forwards.clear()
    assert batcher.warm_up(6, np.zeros((3, 8, 8), np.float32)) == [1, 2, 4, 8] and fan.forwards == [1, 2, 4, 8]
    assert batcher.warm_up(100, np.zeros((3, 8, 8), np.float32)) == [1, 2, 4, 8]   # up to max_batch


def test_max_batch_splits_the_waiting_crops_into_several_forwards():
    hold = threading.Event()
    fan = FakeFan(hold)
    batcher = FanBatcher(fan.fan_heatmaps, max_batch=3)
    threads = [threading.Thread(target=lambda i=i: batcher.heatmaps(np.full((1, 3, 8, 8), i, np.float32)))
               for i in range(7)]
    threads[0].start()
    assert fan.inside.wait(30)
    for t in threads[1:]:
        t.start()
    wait_until(lambda: pending(batcher) == 6)
    hold.set()
    for t in threads:
        t.join(30)
    assert fan.forwards == [1, 3, 3]


def test_queue_is_bounded_and_a_full_queue_drops_counted():
    hold = threading.Event()
    fan = FakeFan(hold)
    batcher = FanBatcher(fan.fan_heatmaps, max_batch=2, max_pending=2)
    crop = np.zeros((1, 3, 8, 8), np.float32)
    threads = [threading.Thread(target=batcher.heatmaps, args=(crop,)) for _ in range(3)]
    threads[0].start()
    assert fan.inside.wait(30)
    for t in threads[1:]:
        t.start()
    wait_until(lambda: pending(batcher) == 2)
    with pytest.raises(LandmarksBusy, match="queue full"):
        batcher.heatmaps(crop)
    hold.set()
    for t in threads:
        t.join(30)
    stats = batcher.stats()
    assert stats["pose_fan_dropped"] == 1 and stats["pose_fan_crops"] == 3 and stats["pose_fan_waiting"] == 0


def test_a_session_that_stops_waiting_leaves_the_others_unaffected():
    """Session B gives up (its wait bound passes) while A's forward runs: B gets LandmarksBusy, counted;
    its crop is never computed; A and the later C get their own landmarks."""
    hold = threading.Event()
    fan = FakeFan(hold)
    batcher = FanBatcher(fan.fan_heatmaps, timeout_s=0.3)
    got: dict[str, object] = {}

    def submit(name: str, value: float) -> None:
        try:
            got[name] = batcher.heatmaps(np.full((1, 3, 8, 8), value, np.float32))[0, 0, 0, 0]
        except LandmarksBusy as exc:
            got[name] = exc

    a = threading.Thread(target=submit, args=("a", 1.0))
    a.start()
    assert fan.inside.wait(30)
    b = threading.Thread(target=submit, args=("b", 2.0))
    b.start()
    b.join(30)
    assert isinstance(got["b"], LandmarksBusy) and batcher.stats()["pose_fan_timeouts"] == 1
    batcher.timeout_s = 30.0
    c = threading.Thread(target=submit, args=("c", 3.0))
    c.start()
    wait_until(lambda: pending(batcher) == 1)
    hold.set()
    for t in (a, c):
        t.join(30)
    assert got["a"] == 1.0 and got["c"] == 3.0 and fan.forwards == [1, 1]


def test_a_failing_forward_raises_in_each_of_its_submitters_only():
    calls = []

    def forward(x):
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("FAN failed")
        return np.zeros((len(x), 68, 2, 2), np.float32)
    batcher = FanBatcher(forward)
    with pytest.raises(RuntimeError, match="FAN failed"):
        batcher.heatmaps(np.zeros((1, 3, 8, 8), np.float32))
    assert batcher.heatmaps(np.zeros((2, 3, 8, 8), np.float32)).shape == (2, 68, 2, 2)


def test_sessions_track_through_the_batcher_and_detect_only_when_lost():
    """Several sessions' trackers over one staged model: one box detection each, then tracking, every
    tracked frame's landmarks the session's own, FAN forwards shared."""
    fan = FakeFan()
    batcher = FanBatcher(fan.fan_heatmaps)
    trackers = [tracking_detector(BatchedLandmarkModel(fan, batcher)) for _ in range(4)]
    assert all(isinstance(t, TrackingDetector) for t in trackers)
    results: dict[int, list] = {i: [] for i in range(4)}

    def run(i: int) -> None:
        for _ in range(5):
            results[i].append(trackers[i].detect(frame(10 * i)))
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert fan.boxes == 4 and [t.counters.tracked for t in trackers] == [4] * 4
    for i in range(4):
        for faces in results[i]:
            assert len(faces) == 1 and np.isfinite(faces[0]).all()
        # session i's frames carry value 10·i, its box is centred at x = 50 + 10·i: every landmark set
        # it got (detected, then tracked) is centred there
        for faces in results[i]:
            assert faces[0][:, 0].mean() == pytest.approx(50.0 + 10 * i, abs=1e-3)
    assert sum(fan.forwards) == 4 * 5


def test_busy_landmarks_skip_the_frame_and_keep_the_track():
    """LandmarksBusy from the tracked FAN call: the tracker keeps its box (no new detection), and the
    pose worker skips the frame (counted) instead of stopping."""
    from capture.pose_sources import PoseWorker

    class Busy(FakeFan):
        busy = False

        def fan_heatmaps(self, inputs):
            if self.busy:
                raise LandmarksBusy("FAN busy")
            return super().fan_heatmaps(inputs)
    fan = Busy()
    tracker = TrackingDetector(BatchedLandmarkModel(fan, FanBatcher(fan.fan_heatmaps)))
    tracker.detect(frame(1))
    fan.busy = True
    with pytest.raises(LandmarksBusy):
        tracker.detect(frame(1))
    assert tracker.tracking and fan.boxes == 1 and tracker.counters.lost == 0

    class Frames:
        realtime = False

        def close(self) -> None:
            pass

        def __init__(self) -> None:
            self.n = 0

        def read(self):
            self.n += 1
            return None if self.n > 3 else (frame(1), self.n / 10)

    class Aligner:
        def align(self, rgb):
            raise LandmarksBusy("FAN busy")
    worker = PoseWorker(Frames(), Aligner(), encode=lambda crop: np.zeros(12, np.float32), smoothing=None)
    worker.start()
    wait_until(lambda: worker.finished)
    worker.check()
    assert worker.frames_busy == 3 and worker.latest() is None
    worker.stop()


def test_studio_pose_models_share_one_fan_batcher_and_report_its_counters():
    """The studio's SharedLandmarkModel hands each session's pose worker the staged model through the
    one batcher; StudioSessions.stats carries the batcher's (and the pose encoder batcher's) counters."""
    from pcavs_live.pipeline.engine_setup import PoseBatcher
    from pcavs_live.pipeline.studio import SharedLandmarkModel, StudioSessions

    class Renderer:
        def stats(self):
            return {"batches": 0}
    fan = FakeFan()
    shared = SharedLandmarkModel(lambda: fan, fan_batch=8)
    models = [shared.for_pose(320) for _ in range(3)]
    assert all(isinstance(m, BatchedLandmarkModel) and m.batcher is shared.fan_batcher for m in models)
    assert shared(None) is fan   # the identity encoder gets the model itself
    for i, m in enumerate(models):
        m.landmarks_in_boxes(frame(i), [np.array([10.0, 10.0, 50.0, 50.0, 1.0])])
    sessions = StudioSessions(encode=None, renderer=Renderer(), config=None, pose_batcher=PoseBatcher(),
                              landmarks=shared)
    stats = sessions.stats()
    assert stats["batches"] == 0 and stats["pose_fan_passes"] == 3 and stats["pose_fan_dropped"] == 0
    assert stats["pose_fan_timeouts"] == 0 and stats["pose_encoder_passes"] == 0
    fan.forwards.clear()
    assert SharedLandmarkModel(lambda: fan, fan_batch=8, fan_buckets=(1, 4, 8)).warm_up(5) == [1, 4, 8]
    assert fan.forwards == [1, 4, 8]


def test_staged_fan_equals_face_alignments_own_landmarks():
    """The three FAN steps (crop, network, decode) give what face_alignment's get_landmarks_from_image
    gives for the same boxes, and two sessions' crops batched into one forward give each session the
    same landmarks as alone (random stand-in FAN of one hourglass, on the loaded model's attributes
    without the weight files, to keep it quick)."""
    from types import SimpleNamespace

    import face_alignment
    import skimage.data
    import torch
    from face_alignment.models import FAN

    from pcavs.alignment import FaceAlignmentDetector

    torch.manual_seed(0)
    fa = SimpleNamespace(face_alignment_net=FAN(1).eval(), device="cpu", dtype=torch.float32, flip_input=False,
                         max_batch_size=8, landmarks_type=face_alignment.LandmarksType.TWO_D,
                         face_detector=SimpleNamespace(reference_scale=195.0))
    det = object.__new__(FaceAlignmentDetector)
    det._fa = fa
    assert isinstance(det, StagedLandmarkModel)
    rgb = skimage.data.astronaut()
    boxes = [np.array([150.0, 60.0, 300.0, 220.0, 0.99]), np.array([100.0, 40.0, 260.0, 230.0, 0.9])]
    with torch.inference_mode():
        ref, ref_scores, _ = face_alignment.FaceAlignment.get_landmarks_from_image(
            fa, rgb, detected_faces=boxes, return_landmark_score=True)
    staged = det.landmarks_in_boxes(rgb, boxes)
    for (lm, score), r, rs in zip(staged, ref, ref_scores):
        np.testing.assert_allclose(lm, np.asarray(r)[:, :2], atol=1e-3)
        assert score == pytest.approx(float(np.mean(rs)), abs=1e-5)
    other = np.ascontiguousarray(rgb[::-1])
    inputs_a, frames_a = det.fan_inputs(rgb, boxes[:1])
    inputs_b, frames_b = det.fan_inputs(other, boxes[1:])
    both = det.fan_heatmaps(np.concatenate([inputs_a, inputs_b]))
    batched_a = det.landmarks_from_heatmaps(both[:1], frames_a)[0][0]
    batched_b = det.landmarks_from_heatmaps(both[1:], frames_b)[0][0]
    np.testing.assert_allclose(batched_a, staged[0][0], atol=1e-3)
    np.testing.assert_allclose(batched_b, det.landmarks_in_boxes(other, boxes[1:])[0][0], atol=1e-3)


class PatchFace:
    """A staged model over frames holding one bright square (the 'face') on black: the box detector
    finds the square; FAN's stand-in encodes, per crop, where the face's centre is and whether the box
    holds it, and decodes that into a schematic face there (high score only when inside)."""

    def __init__(self) -> None:
        self.forwards: list[int] = []
        self.boxes = 0
        self._lock = threading.Lock()

    @staticmethod
    def _centre(rgb):
        ys, xs = np.nonzero(rgb[..., 0])
        return float(xs.mean()), float(ys.mean())

    def face_boxes(self, rgb):
        with self._lock:
            self.boxes += 1
        cx, cy = self._centre(rgb)
        return [np.array([cx - 40, cy - 45, cx + 40, cy + 40, 0.99])]

    def fan_inputs(self, rgb, boxes):
        cx, cy = self._centre(rgb)
        rows = [[cx, cy, float(b[0] <= cx <= b[2] and b[1] <= cy <= b[3])] for b in boxes]
        return np.asarray(rows, np.float32), list(boxes)

    def fan_heatmaps(self, inputs):
        with self._lock:
            self.forwards.append(len(inputs))
        return inputs.copy()

    def landmarks_from_heatmaps(self, heatmaps, frames):
        from tests.test_pose_tracking import face_at
        return [(face_at(cx, cy), 0.9 if inside else 0.05) for cx, cy, inside in heatmaps]


def test_live_pose_paths_of_several_sessions_share_the_batchers_and_keep_their_own_poses():
    """Four sessions' start_live_pose (rate cap → tracking → live alignment → pose encoder) over one
    staged model and one FanBatcher and one PoseBatcher: one box detection per session, every crop's FAN
    through the shared batcher, and each session's pose code from its own face (the code is the aligned
    crop's centre pixel: the session's own patch value only when its own landmarks aligned it)."""
    from pcavs_live.pipeline.engine_setup import PoseBatcher, start_live_pose
    from pcavs_live.pipeline.metrics import LiveMetrics
    from tests.test_pose_tracking import frames_at

    def encode_many(networks, crops):
        return np.repeat(np.asarray(crops)[:, 112, 112, :1].astype(np.float32), 12, axis=1)

    class Avatar:
        device, networks = "cpu", object()

    model = PatchFace()
    fan_batcher, pose_batcher = FanBatcher(model.fan_heatmaps, window_s=0.01), PoseBatcher(encode_many)
    values = [60, 120, 180, 240]
    workers = []
    try:
        for i, v in enumerate(values):
            rgb = np.zeros((240, 320, 3), np.uint8)
            cx, cy = 70 + 60 * i, 110 + 10 * i
            rgb[cy - 50:cy + 50, cx - 45:cx + 45] = v
            source = frames_at([k / 30 for k in range(24)], rgb)
            source.realtime = False
            worker, _ = start_live_pose(source, Avatar(), BatchedLandmarkModel(model, fan_batcher), smoothing=None,
                                        rate_hz=12.5, metrics=LiveMetrics(), pose_batcher=pose_batcher)
            workers.append(worker)
        wait_until(lambda: all(w.finished or not w.alive for w in workers), timeout=120)
        for w in workers:
            w.check()
    finally:
        for w in workers:
            w.stop()
    processed = [w.frames_processed for w in workers]
    assert all(n >= 8 for n in processed) and model.boxes == 4
    assert sum(model.forwards) == sum(processed) and fan_batcher.stats()["pose_fan_crops"] == sum(processed)
    for w, v in zip(workers, values):
        assert w.latest() is not None and w.latest().code[0] == pytest.approx(v)
    assert pose_batcher.crops == sum(processed) and all(w.frames_busy == 0 for w in workers)
