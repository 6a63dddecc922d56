"""Face alignment: photo or live frame → the 224×224 crop PC-AVS was trained on (spec §5, `align_68.py`).

Rule (upstream `scripts/align_68.py`): three anchor points — the means of landmarks 36–41 and 42–47
(the eyes) and 60–67 (inner mouth) — are mapped by a least-squares similarity transform onto the
template (87,59), (137,59), (112,120) of a 224×224 canvas; the translation is then corrected so the
mouth centre lands exactly on (112,120) ("mouth bias"); `cv2.warpAffine`, bilinear, black border.

Upstream aligns a whole pose video with ONE transform estimated from the folder-average anchors and a
per-frame, smoothed mouth bias. The pose encoder therefore learned to read head rotation and scale
*relative to the clip's average* from the crop. `LiveAligner` reproduces that online with a running
average, so live head motion turns into pose the way it did in training.

Landmarks come from an injectable `LandmarkDetector`; `FaceAlignmentDetector` wraps the
`face_alignment` package (SFD face detector + 2D-FAN-4), whose weights are fetched at run time.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import cv2
import numpy as np

from common.errors import UserError

log = logging.getLogger(__name__)

CROP_SIZE = 224
TEMPLATE = np.array([[87.0, 59.0], [137.0, 59.0], [112.0, 120.0]])  # left eye, right eye, mouth
MOUTH_TARGET = TEMPLATE[2]
# Index ranges of the 68-point (iBUG/FAN) layout used for the anchors.
LEFT_EYE, RIGHT_EYE, INNER_MOUTH = slice(36, 42), slice(42, 48), slice(60, 68)
UPSTREAM_BIAS_MEMORY = 0.2  # bias_t = 0.2·bias_{t−1} + 0.8·raw_bias_t (align_68.py)
SIDECAR_SUFFIX = ".landmarks.json"


class AlignmentError(UserError):
    """A user-fixable alignment problem; the message is one actionable line."""


class FaceNotFoundError(AlignmentError):
    """No face in a photo that must contain one."""


class LandmarkModelUnavailable(AlignmentError):
    """The landmark detector's weights are missing and could not be fetched."""


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


# --------------------------------------------------------------------------- geometry
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


def as_rgb_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4) or img.dtype != np.uint8:
        raise AlignmentError(f"{name}: expected an RGB uint8 HxWx3 image, got shape {img.shape} dtype {img.dtype}")
    return np.ascontiguousarray(img[:, :, :3])


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Image file → RGB uint8 (the project's boundary format; OpenCV's BGR stays in here)."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise AlignmentError(f"cannot read image file {path} (missing or not an image)")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def sidecar_path(photo_path: str | os.PathLike) -> Path:
    return Path(str(photo_path) + SIDECAR_SUFFIX)


def load_landmark_sidecar(path: str | os.PathLike) -> np.ndarray:
    """Read `<photo>.landmarks.json`: a list of 68 or 3 [x, y] pairs, or {"landmarks": [...]}."""
    try:
        data = json.loads(Path(path).read_text())
        if isinstance(data, dict):
            data = data.get("landmarks", data.get("points"))
        pts = np.asarray(data, dtype=np.float64)
    except (OSError, ValueError, TypeError) as exc:
        raise AlignmentError(f"landmark file {path} is unreadable ({exc}); expected a JSON list of [x, y] pairs")
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] not in (3, 68):
        raise AlignmentError(f"landmark file {path} must hold 68 or 3 [x, y] points, got shape {pts.shape}")
    return pts


# --------------------------------------------------------------------------- aligners
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

    def __init__(self, detector: LandmarkDetector, average_window: int = 250,
                 bias_memory: float = UPSTREAM_BIAS_MEMORY) -> None:
        if average_window < 1:
            raise ValueError("average_window must be >= 1")
        self.detector = detector
        self.average_window = average_window
        self.bias_memory = bias_memory
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
        self._bias = raw if self._bias is None else self.bias_memory * self._bias + (1 - self.bias_memory) * raw
        m[:, 2] += self._bias
        pts = np.asarray(points, dtype=np.float64)
        return AlignedFace(warp_to_crop(rgb, m), m, anchors, pts if pts.shape[0] == 68 else None)


# --------------------------------------------------------------------------- face_alignment wrapper
# What face_alignment 1.5.0 fetches (face_alignment/api.py `models_urls`, detection/sfd/sfd_detector.py):
# both go through torch.hub into `torch.hub.get_dir()/checkpoints`, i.e. $TORCH_HOME/hub/checkpoints
# (default ~/.cache/torch/hub/checkpoints). We fetch them ourselves (with a timeout) into a configurable
# folder and hand the local paths to face_alignment, so no hidden download can hang the program.
LANDMARK_MODEL_FILES: dict[str, str] = {
    "s3fd-619a316812.pth": "https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth",
    "2DFAN4-11f355bf06.pth.tar": "https://www.adrianbulat.com/downloads/python-fan/2DFAN4-11f355bf06.pth.tar",
}
SFD_FILE, FAN_FILE = "s3fd-619a316812.pth", "2DFAN4-11f355bf06.pth.tar"


def default_landmark_model_dir() -> Path:
    """Where face_alignment itself would cache the files (honours TORCH_HOME)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def _download(url: str, dest: Path, timeout_s: float) -> None:
    """Fetch to `dest` atomically (a .part file renamed at the end): a failed fetch leaves nothing."""
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(part, "wb") as out:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
        part.replace(dest)
    finally:
        part.unlink(missing_ok=True)


def ensure_landmark_models(model_dir: str | os.PathLike | None = None, allow_download: bool = True,
                           timeout_s: float = 30.0) -> dict[str, Path]:
    """Local paths of the SFD and FAN weights, downloading missing ones when allowed."""
    folder = Path(model_dir) if model_dir is not None else default_landmark_model_dir()
    paths = {name: folder / name for name in LANDMARK_MODEL_FILES}
    missing = [name for name, p in paths.items() if not p.is_file()]
    if not missing:
        return paths
    hint = (f"put {' and '.join(f'{n} ({LANDMARK_MODEL_FILES[n]})' for n in missing)} into {folder} "
            f"(or point TORCH_HOME / the landmark model dir there), or run once with internet access")
    if not allow_download:
        raise LandmarkModelUnavailable(f"face landmark weights missing (downloads disabled): {hint}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name in missing:
            log.info("downloading face landmark weights %s to %s", LANDMARK_MODEL_FILES[name], folder)
            _download(LANDMARK_MODEL_FILES[name], paths[name], timeout_s)
    except (OSError, ValueError) as exc:  # URLError/HTTPError/timeouts are OSErrors
        reason = str(getattr(exc, "reason", exc)).replace("\n", " ")
        raise LandmarkModelUnavailable(f"cannot download face landmark weights ({reason}): {hint}") from None
    return paths


class FaceAlignmentDetector:
    """68-point landmarks from the `face_alignment` package (SFD detector + 2D-FAN-4), as upstream used.

    `flip_input=False` (upstream relied on the old default True for a little accuracy at twice the
    cost; not worth it live) and `compile=False` (torch.compile's warm-up takes minutes on CPU).

    Cost: the SFD face detector is ~195 GFLOP on a 640×480 frame, FAN ~50 GFLOP per face (≈4 s and
    ≈0.6 s on the 2-core dev CPU). `detect_max_side` runs only the box detector on a downscaled copy
    (boxes scaled back; FAN still sees full resolution): 320 makes SFD ~4× cheaper and is plenty for a
    webcam face. None (default) = full resolution, as upstream did for the photos it aligned.
    """

    def __init__(self, device: str = "cpu", model_dir: str | os.PathLike | None = None,
                 allow_download: bool = True, download_timeout_s: float = 30.0,
                 flip_input: bool = False, detect_max_side: int | None = None) -> None:
        paths = ensure_landmark_models(model_dir, allow_download, download_timeout_s)
        self._fa = _build_face_alignment(device, paths[SFD_FILE], paths[FAN_FILE], flip_input)
        self.detect_max_side = detect_max_side
        self._lock = threading.Lock()  # the photo aligner and the pose worker may share one detector

    def with_detect_max_side(self, detect_max_side: int | None) -> "FaceAlignmentDetector":
        """The same loaded models (and lock) with another box-detector resolution: the identity photo is
        detected at full size, live pose frames downscaled, without loading the weights twice."""
        sibling = object.__new__(FaceAlignmentDetector)
        sibling._fa, sibling._lock, sibling.detect_max_side = self._fa, self._lock, detect_max_side
        return sibling

    def _face_boxes(self, rgb: np.ndarray) -> list[np.ndarray]:
        scale = 1.0
        small = rgb
        if self.detect_max_side is not None and max(rgb.shape[:2]) > self.detect_max_side:
            scale = self.detect_max_side / max(rgb.shape[:2])
            small = cv2.resize(rgb, (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)),
                               interpolation=cv2.INTER_AREA)
        boxes = self._fa.face_detector.detect_from_image(small.copy())
        out = []
        for b in boxes:
            b = np.array(b, dtype=np.float64)
            b[:4] /= scale
            out.append(b)
        return out

    def detect(self, rgb: np.ndarray) -> list[np.ndarray]:
        rgb = as_rgb_uint8(rgb)
        with self._lock:
            # Boxes first, by ourselves: get_landmarks_from_image warns on every face-less frame.
            boxes = self._face_boxes(rgb)
            if not boxes:
                return []
            result = self._fa.get_landmarks_from_image(rgb, detected_faces=boxes)
        return [np.asarray(p, dtype=np.float32)[:, :2] for p in (result or [])]


def _build_face_alignment(device: str, sfd_path: Path, fan_path: Path, flip_input: bool):
    import inspect

    import torch
    import face_alignment
    from face_alignment.models import FAN

    class _LocalFaceAlignment(face_alignment.FaceAlignment):
        """Loads FAN from our local file instead of torch.hub's cache (its only download path)."""

        def _load_native(self, network_name, network_size, device, dtype):
            net = FAN(network_size)
            net.load_state_dict(torch.load(fan_path, map_location=device, weights_only=True))
            return net.to(device, dtype=dtype).eval()

    kwargs = dict(device=device, face_detector="sfd", flip_input=flip_input,
                  face_detector_kwargs={"path_to_detector": str(sfd_path)})
    if "compile" in inspect.signature(face_alignment.FaceAlignment.__init__).parameters:
        kwargs["compile"] = False
    return _LocalFaceAlignment(face_alignment.LandmarksType.TWO_D, **kwargs)
