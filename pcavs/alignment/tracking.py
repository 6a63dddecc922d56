"""Face tracking for the live pose path: detect once, then follow the face with its own landmarks.

A live pose frame through face_alignment costs the SFD face detector (~195 GFLOP at 640×480, ~50 at
the 320-pixel box resolution) plus FAN (~50 GFLOP): more than a generator frame. Between two pose
frames a head moves a few pixels, so the box FAN needs is known from the previous landmarks; SFD is
only needed to find a face again. `TrackingDetector` is a `LandmarkDetector` (a drop-in for
`LiveAligner`) that runs the box detector only when tracking is lost:

* no track yet (first frame, or after a loss);
* the landmark quality is low (FAN's mean heatmap peak below `min_score`: the box holds no face);
* the tracked box leaves the frame (less than `min_inside` of it inside the image).

The next box is the bounding box of the last landmarks, enlarged by `margin` on every side and by
`top_extra` upwards (SFD's boxes include the forehead above the brows that no landmark marks), so FAN
sees about the crop a fresh detection would give it, with room for the motion between pose frames.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, ContextManager, Protocol, runtime_checkable

import numpy as np

from pcavs.alignment.geometry import face_area

log = logging.getLogger(__name__)

Scope = Callable[[], ContextManager[object]]


@runtime_checkable
class BoxLandmarkModel(Protocol):
    """The two stages of a landmark detector, callable separately (FaceAlignmentDetector has them)."""

    def face_boxes(self, rgb: np.ndarray) -> list[np.ndarray]:
        """Face boxes [x1, y1, x2, y2, (score)] in pixels."""
        ...

    def landmarks_in_boxes(self, rgb: np.ndarray, boxes: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        """(68,2) landmarks and a quality score in [0, 1] (mean heatmap peak) per box."""
        ...


@dataclass
class TrackingCounters:
    detections: int = 0        # box-detector runs
    tracked: int = 0           # frames whose landmarks came from the tracked box alone
    lost: int = 0              # times tracking was lost (low quality or the box left the frame)


def box_from_landmarks(landmarks: np.ndarray, margin: float = 0.1, top_extra: float = 0.1) -> np.ndarray:
    """[x1, y1, x2, y2, 1] around the landmarks, enlarged by `margin`·size on each side and `top_extra`·
    height more at the top."""
    pts = np.asarray(landmarks, dtype=np.float64)[:, :2]
    (x1, y1), (x2, y2) = pts.min(0), pts.max(0)
    w, h = x2 - x1, y2 - y1
    return np.array([x1 - margin * w, y1 - (margin + top_extra) * h, x2 + margin * w, y2 + margin * h, 1.0])


def fraction_inside(box: np.ndarray, width: int, height: int) -> float:
    """Share of the box's area inside a width×height image."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    area = max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
    if area <= 0:
        return 0.0
    ix = max(0.0, min(x2, width) - max(x1, 0.0))
    iy = max(0.0, min(y2, height) - max(y1, 0.0))
    return ix * iy / area


class TrackingDetector:
    """`LandmarkDetector` that detects once and then tracks (see the module doc). Not thread-safe: one
    owner (the pose worker). `scope` is entered around every model call (the pose worker's CUDA
    stream, `pcavs.gpu.WorkerStream.scope`)."""

    def __init__(self, model: BoxLandmarkModel, min_score: float = 0.3, min_inside: float = 0.75,
                 margin: float = 0.1, top_extra: float = 0.1, scope: Scope | None = None) -> None:
        self.model = model
        self.min_score, self.min_inside = min_score, min_inside
        self.margin, self.top_extra = margin, top_extra
        self._scope: Scope = scope or contextlib.nullcontext
        self._box: np.ndarray | None = None
        self.counters = TrackingCounters()

    @property
    def tracking(self) -> bool:
        return self._box is not None

    def reset(self) -> None:
        self._box = None

    def detect(self, rgb: np.ndarray) -> list[np.ndarray]:
        with self._scope():
            if self._box is not None:
                tracked = self._track(rgb)
                if tracked is not None:
                    return [tracked]
                self.counters.lost += 1
                self._box = None
            return self._detect(rgb)

    def _track(self, rgb: np.ndarray) -> np.ndarray | None:
        assert self._box is not None
        if fraction_inside(self._box, rgb.shape[1], rgb.shape[0]) < self.min_inside:
            return None
        found = self.model.landmarks_in_boxes(rgb, [self._box])
        if not found or found[0][1] < self.min_score:
            return None
        landmarks = found[0][0]
        self._box = box_from_landmarks(landmarks, self.margin, self.top_extra)
        self.counters.tracked += 1
        return landmarks

    def _detect(self, rgb: np.ndarray) -> list[np.ndarray]:
        self.counters.detections += 1
        boxes = self.model.face_boxes(rgb)
        if not boxes:
            return []
        faces = [(lm, score) for lm, score in self.model.landmarks_in_boxes(rgb, boxes)]
        good = [lm for lm, score in faces if score >= self.min_score]
        if good:  # follow the largest face, as the aligner does
            self._box = box_from_landmarks(max(good, key=face_area), self.margin, self.top_extra)
        return [lm for lm, _ in faces]


class ScopedDetector:
    """A plain `LandmarkDetector` (one `detect` call, no separate stages: nothing to track with) whose
    calls run inside `scope`."""

    def __init__(self, detector, scope: Scope | None = None) -> None:
        self.detector = detector
        self._scope: Scope = scope or contextlib.nullcontext

    def detect(self, rgb: np.ndarray) -> list[np.ndarray]:
        with self._scope():
            return self.detector.detect(rgb)


def tracking_detector(detector, scope: Scope | None = None, **options: float):
    """`TrackingDetector` around a detector that offers both stages, else the detector as it is
    (inside `scope`)."""
    if isinstance(detector, BoxLandmarkModel):
        return TrackingDetector(detector, scope=scope, **options)
    return ScopedDetector(detector, scope)
