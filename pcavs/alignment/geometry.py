"""The align_68 rule (spec §5, upstream `scripts/align_68.py`): landmarks → anchors → similarity → crop.

Three anchor points — the means of landmarks 36–41 and 42–47 (the eyes) and 60–67 (inner mouth) — are
mapped by a least-squares similarity transform onto the template (87,59), (137,59), (112,120) of a
224×224 canvas; the translation is then corrected so the mouth centre lands exactly on (112,120)
("mouth bias"); `cv2.warpAffine`, bilinear, black border. Pure functions: the aligners decide which
anchors (this frame's, or a running average) the transform is estimated from.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from pcavs.alignment.errors import AlignmentError
from pcavs.constants import CROP_SIZE

TEMPLATE = np.array([[87.0, 59.0], [137.0, 59.0], [112.0, 120.0]])  # left eye, right eye, mouth
MOUTH_TARGET = TEMPLATE[2]
# Index ranges of the 68-point (iBUG/FAN) layout used for the anchors.
LEFT_EYE, RIGHT_EYE, INNER_MOUTH = slice(36, 42), slice(42, 48), slice(60, 68)


def anchor_points(points: np.ndarray) -> np.ndarray:
    """(68,2) landmarks → (3,2) eye/eye/mouth means; (3,2) input is taken as the anchors already."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.shape == (3, 2):
        return pts.copy()
    if pts.shape[0] != 68 or pts.ndim != 2 or pts.shape[1] < 2:
        raise AlignmentError(f"expected 68x2 landmarks or 3x2 anchor points, got an array of shape {pts.shape}")
    pts = pts[:, :2]
    return np.stack([pts[LEFT_EYE].mean(0), pts[RIGHT_EYE].mean(0), pts[INNER_MOUTH].mean(0)])


def similarity_matrix(src: np.ndarray, dst: np.ndarray = TEMPLATE) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) src → dst as a (2,3) matrix.

    Umeyama's method, the same estimator as skimage's `SimilarityTransform.estimate` that upstream
    calls (reimplemented to avoid its deprecation churn; the tests compare the two).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = src_c.var(0).sum()
    if not np.isfinite(src_var) or src_var < 1e-12:
        raise AlignmentError("landmark anchors are degenerate (all points coincide); cannot align the face")
    cov = dst_c.T @ src_c / src.shape[0]
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[-1] = -1.0
    u, s, vt = np.linalg.svd(cov)
    rank = np.linalg.matrix_rank(cov)
    if rank == 1 and np.linalg.det(u) * np.linalg.det(vt) <= 0:
        d_r = d.copy()
        d_r[-1] = -1.0
        rot = u @ np.diag(d_r) @ vt
    elif rank == 1:
        rot = u @ vt
    else:
        rot = u @ np.diag(d) @ vt
    scale = (s @ d) / src_var
    m = np.empty((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = dst_mean - scale * (rot @ src_mean)
    return m


def mouth_bias(matrix: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Translation that moves this frame's mapped mouth centre onto the template mouth (112,120)."""
    mouth = matrix[:, :2] @ anchors[2] + matrix[:, 2]
    return MOUTH_TARGET - mouth


def warp_to_crop(rgb: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Bilinear warp into the 224×224 canvas with a black border, exactly like upstream."""
    return cv2.warpAffine(rgb, matrix, (CROP_SIZE, CROP_SIZE), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def face_area(landmarks: np.ndarray) -> float:
    """Bounding-box area of a face's landmarks (used to pick the main face)."""
    pts = np.asarray(landmarks)[:, :2]
    span = pts.max(0) - pts.min(0)
    return float(span[0] * span[1])


def largest_face(faces: Sequence[np.ndarray]) -> np.ndarray:
    return max(faces, key=face_area)
