"""68-point landmarks from the `face_alignment` package (SFD face detector + 2D-FAN-4), as upstream used.

What face_alignment 1.5.0 fetches (face_alignment/api.py `models_urls`, detection/sfd/sfd_detector.py):
both go through torch.hub into `torch.hub.get_dir()/checkpoints`, i.e. $TORCH_HOME/hub/checkpoints
(default ~/.cache/torch/hub/checkpoints). We fetch them ourselves (with a timeout and a SHA-256 check,
through `pcavs_live.common.download` and its registry) into a configurable folder and hand the local paths to face_alignment, so no hidden
download can hang the program.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import cv2
import numpy as np

from pcavs_live.common.download import DownloadError, download, load_registry
from pcavs.alignment.errors import LandmarkModelUnavailable
from pcavs.alignment.images import as_rgb_uint8

log = logging.getLogger(__name__)

SFD_FILE, FAN_FILE = "s3fd-619a316812.pth", "2DFAN4-11f355bf06.pth.tar"
LANDMARK_WEIGHTS = {name: load_registry()[name] for name in (SFD_FILE, FAN_FILE)}  # name → (sha256, url)
LANDMARK_MODEL_FILES: dict[str, str] = {name: weight.url for name, weight in LANDMARK_WEIGHTS.items()}


def default_landmark_model_dir() -> Path:
    """Where face_alignment itself would cache the files (honours TORCH_HOME)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


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
            weight = LANDMARK_WEIGHTS[name]
            download(LANDMARK_MODEL_FILES[name], paths[name], sha256=weight.sha256, timeout_s=timeout_s)
    except DownloadError as exc:
        raise LandmarkModelUnavailable(f"cannot download face landmark weights ({exc.reason}): {hint}") from None
    except OSError as exc:  # the folder cannot be created
        reason = " ".join(str(exc).split())
        raise LandmarkModelUnavailable(f"cannot download face landmark weights ({reason}): {hint}") from None
    return paths


class FaceAlignmentDetector:
    """The `LandmarkDetector` the app uses, built from local weight files only.

    `flip_input=False` (upstream relied on the old default True for a little accuracy at twice the
    cost; not worth it live) and `compile=False` (torch.compile's warm-up takes minutes on CPU).

    Cost: the SFD face detector is ~195 GFLOP on a 640×480 frame, FAN ~50 GFLOP per face.
    `detect_max_side` runs only the box detector on a downscaled copy (boxes scaled back; FAN still sees
    full resolution): 320 makes SFD ~4× cheaper and is plenty for a webcam face. None (default) = full
    resolution, as upstream did for the photos it aligned.
    """

    def __init__(self, device: str = "cpu", model_dir: str | os.PathLike | None = None,
                 allow_download: bool = True, download_timeout_s: float = 30.0,
                 detect_max_side: int | None = None) -> None:
        paths = ensure_landmark_models(model_dir, allow_download, download_timeout_s)
        self._fa = _build_face_alignment(device, paths[SFD_FILE], paths[FAN_FILE])
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

    def face_boxes(self, rgb: np.ndarray) -> list[np.ndarray]:
        """SFD boxes [x1, y1, x2, y2, score] alone (`pcavs.alignment.tracking` runs it only when lost)."""
        with self._lock:
            return self._face_boxes(as_rgb_uint8(rgb))

    def landmarks_in_boxes(self, rgb: np.ndarray, boxes: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        """FAN alone on given boxes: (68,2) landmarks and the mean heatmap peak (quality) per box."""
        if not boxes:
            return []
        with self._lock:
            result = self._fa.get_landmarks_from_image(as_rgb_uint8(rgb), detected_faces=list(boxes),
                                                        return_landmark_score=True)
        landmarks, scores = (result[0] or []), (result[1] or [])
        return [(np.asarray(p, dtype=np.float32)[:, :2], float(np.mean(sc))) for p, sc in zip(landmarks, scores)]

    def detect(self, rgb: np.ndarray) -> list[np.ndarray]:
        rgb = as_rgb_uint8(rgb)
        with self._lock:
            # Boxes first, by ourselves: get_landmarks_from_image warns on every face-less frame.
            boxes = self._face_boxes(rgb)
            if not boxes:
                return []
            result = self._fa.get_landmarks_from_image(rgb, detected_faces=boxes)
        return [np.asarray(p, dtype=np.float32)[:, :2] for p in (result or [])]


def _build_face_alignment(device: str, sfd_path: Path, fan_path: Path):
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

    kwargs = dict(device=device, face_detector="sfd", flip_input=False,
                  face_detector_kwargs={"path_to_detector": str(sfd_path)})
    if "compile" in inspect.signature(face_alignment.FaceAlignment.__init__).parameters:
        kwargs["compile"] = False
    return _LocalFaceAlignment(face_alignment.LandmarksType.TWO_D, **kwargs)
