"""The two aligners: a photo aligned once (the identity), and live pose frames aligned against their average.

Upstream aligns a whole pose video with ONE transform estimated from the folder-average anchors and a
per-frame, smoothed mouth bias. The pose encoder therefore learned to read head rotation and scale
*relative to the clip's average* from the crop. `LiveAligner` reproduces that online with a running
average, so live head motion turns into pose the way it did in training.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pcavs.alignment.errors import AlignmentError, FaceNotFoundError
from pcavs.alignment.geometry import anchor_points, largest_face, mouth_bias, similarity_matrix, warp_to_crop
from pcavs.alignment.images import as_rgb_uint8, read_rgb
from pcavs.alignment.sidecars import SIDECAR_SUFFIX, load_landmark_sidecar, sidecar_path

log = logging.getLogger(__name__)

UPSTREAM_BIAS_MEMORY = 0.2  # bias_t = 0.2·bias_{t−1} + 0.8·raw_bias_t (align_68.py)


class LandmarkDetector(Protocol):
    def detect(self, rgb: np.ndarray) -> list[np.ndarray]:
        """All faces in an RGB uint8 image, each as (68,2) float (x, y) pixel coordinates."""
        ...


@dataclass(frozen=True)
class AlignedFace:
    image: np.ndarray            # (224,224,3) uint8 RGB aligned crop
    matrix: np.ndarray           # (2,3) affine used for the warp (source pixels → crop pixels)
    anchors: np.ndarray          # (3,2) eye/eye/mouth anchor points in the source image
    landmarks: np.ndarray | None  # (68,2) in the source image, when known


class FaceAligner:
    """Aligns a single photo (the identity) the way upstream aligned a one-image folder."""

    def __init__(self, detector: LandmarkDetector | None = None) -> None:
        self.detector = detector

    def align_landmarks(self, rgb: np.ndarray, points: np.ndarray) -> AlignedFace:
        """Align with known landmarks (68 points) or anchors (3 points)."""
        rgb = as_rgb_uint8(rgb)
        anchors = anchor_points(points)
        m = similarity_matrix(anchors)
        m[:, 2] += mouth_bias(m, anchors)  # for one image the bias puts the mouth exactly on (112,120)
        pts = np.asarray(points, dtype=np.float64)
        return AlignedFace(warp_to_crop(rgb, m), m, anchors, pts if pts.shape[0] == 68 else None)

    def align_photo(self, rgb: np.ndarray, name: str = "photo",
                    landmarks: np.ndarray | None = None) -> AlignedFace:
        """Detect (unless `landmarks` is given) and align. Several faces → the largest, with a warning."""
        rgb = as_rgb_uint8(rgb, name)
        if landmarks is None:
            if self.detector is None:
                raise AlignmentError(f"no landmark detector configured and no landmarks given for {name} "
                                     f"(add {name}{SIDECAR_SUFFIX} or enable the face_alignment detector)")
            faces = self.detector.detect(rgb)
            if not faces:
                raise FaceNotFoundError(f"no face found in {name}; use a well-lit, frontal photo with one face")
            if len(faces) > 1:
                log.warning("%s: %d faces found; using the largest", name, len(faces))
            landmarks = largest_face(faces)
        return self.align_landmarks(rgb, landmarks)

    def align_photo_file(self, path: str | os.PathLike) -> AlignedFace:
        """Read a photo; a `<photo>.landmarks.json` sidecar, when present, replaces the detector."""
        rgb = read_rgb(path)
        side = sidecar_path(path)
        landmarks = load_landmark_sidecar(side) if side.is_file() else None
        return self.align_photo(rgb, name=str(path), landmarks=landmarks)


class LiveAligner:
    """Online version of upstream's per-folder alignment for pose frames.

    Upstream: one similarity M from the average anchors of the whole clip + a per-frame mouth bias
    smoothed as 0.2·previous + 0.8·current. Live we cannot see the future, so the average is a running
    one: the cumulative mean over the first `average_window` frames (identical to upstream's folder
    average for a clip that short), then an exponential average with the same weight 1/average_window,
    so a user who settles into a new position is re-centred over ~window frames instead of never.
    The anchor POINTS are averaged (as upstream does), not the transform parameters.
    Not thread-safe: one owner (the pose worker) calls `align`.
    """

    def __init__(self, detector: LandmarkDetector, average_window: int = 250) -> None:
        if average_window < 1:
            raise ValueError("average_window must be >= 1")
        self.detector = detector
        self.average_window = average_window
        self.reset()

    def reset(self) -> None:
        self._mean_anchors: np.ndarray | None = None
        self._count = 0
        self._bias: np.ndarray | None = None
        self._several_faces = False

    @property
    def mean_anchors(self) -> np.ndarray | None:
        return None if self._mean_anchors is None else self._mean_anchors.copy()

    def align(self, rgb: np.ndarray) -> AlignedFace | None:
        """One frame → aligned crop, or None when no face is visible (state is left untouched)."""
        rgb = as_rgb_uint8(rgb, "pose frame")
        faces = self.detector.detect(rgb)
        if not faces:
            return None
        several = len(faces) > 1
        if several and not self._several_faces:
            log.warning("pose source: %d faces in view; following the largest", len(faces))
        self._several_faces = several
        return self.align_landmarks(rgb, largest_face(faces))

    def align_landmarks(self, rgb: np.ndarray, points: np.ndarray) -> AlignedFace:
        anchors = anchor_points(points)
        self._count += 1
        if self._mean_anchors is None:
            self._mean_anchors = anchors.copy()
        else:
            weight = 1.0 / min(self._count, self.average_window)
            self._mean_anchors += weight * (anchors - self._mean_anchors)
        m = similarity_matrix(self._mean_anchors)
        raw = mouth_bias(m, anchors)
        memory = UPSTREAM_BIAS_MEMORY
        self._bias = raw if self._bias is None else memory * self._bias + (1 - memory) * raw
        m[:, 2] += self._bias
        pts = np.asarray(points, dtype=np.float64)
        return AlignedFace(warp_to_crop(rgb, m), m, anchors, pts if pts.shape[0] == 68 else None)
