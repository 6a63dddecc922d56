"""The aligners: a photo aligned once (the identity), and pose frames aligned against their clip's average.

Upstream aligns a whole pose video with ONE transform estimated from the folder-average anchors and a
per-frame, smoothed mouth bias. The pose encoder therefore learned to read head rotation and scale
*relative to the clip's average* from the crop. `ClipAligner` does exactly that for a video file (all
landmarks first, then every frame); `LiveAligner` approximates it online with a running average, so live
head motion turns into pose the way it did in training.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Protocol, Sequence

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


class ClipAligner:
    """Upstream's align_68 rule for a whole clip (spec §5), as it aligned a pose-video folder.

    ONE similarity M from the mean anchors of every frame with a face, then, frame by frame in order, the
    translation corrected by that frame's mouth bias smoothed as 0.2·previous + 0.8·current. It needs
    all landmarks before the first crop (one detector pass over the file), which only a file allows; live
    frames use `LiveAligner`. Frames without a face (upstream refused such a folder) get no matrix and
    take no part in the mean or in the bias smoothing.
    """

    def __init__(self, landmarks: Sequence[np.ndarray | None], name: str = "pose video") -> None:
        anchors = [None if pts is None else anchor_points(pts) for pts in landmarks]
        found = [a for a in anchors if a is not None]
        if not found:
            raise FaceNotFoundError(f"no face found in any frame of {name}; use a video of one visible face")
        # Summed in frame order and divided once, as align_68.py does.
        self.mean_anchors: np.ndarray = sum(found[1:], found[0].copy()) / len(found)
        self.matrix: np.ndarray = similarity_matrix(self.mean_anchors)
        self.matrices: list[np.ndarray | None] = []
        self.landmarks = [None if pts is None else np.asarray(pts, dtype=np.float64) for pts in landmarks]
        self.anchors = anchors
        bias: np.ndarray | None = None
        memory = UPSTREAM_BIAS_MEMORY
        for a in anchors:
            if a is None:
                self.matrices.append(None)
                continue
            raw = mouth_bias(self.matrix, a)
            bias = raw if bias is None else memory * bias + (1 - memory) * raw
            m = self.matrix.copy()
            m[:, 2] += bias
            self.matrices.append(m)

    def __len__(self) -> int:
        return len(self.matrices)

    def align(self, index: int, rgb: np.ndarray) -> AlignedFace | None:
        """Frame `index` of the clip → its crop, or None when that frame had no face."""
        m = self.matrices[index]
        if m is None:
            return None
        pts = self.landmarks[index]
        return AlignedFace(warp_to_crop(as_rgb_uint8(rgb, "pose frame"), m), m, self.anchors[index],
                           pts if pts is not None and pts.shape[0] == 68 else None)


class LiveAligner:
    """Online approximation of upstream's per-folder alignment, for pose frames arriving live.

    Upstream: one similarity M from the average anchors of the whole clip + a per-frame mouth bias
    smoothed as 0.2·previous + 0.8·current. Live we cannot see the future, so the average is a running
    one: the cumulative mean of the frames seen so far (for the first `average_window` frames), then an
    exponential average with the same weight 1/average_window, so a user who settles into a new position
    is re-centred over ~window frames instead of never. This is NOT upstream's crop: frame t is aligned
    with the mean of frames 0..t, which equals the clip's mean only at the clip's last frame, so early
    crops (and their pose codes) differ. A video file is aligned with `ClipAligner` instead.
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
