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
        self._lock = threading.Lock()  # SFD and whole-photo detection; FAN stages run without it

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
        """SFD boxes [x1, y1, x2, y2, score] alone (`pcavs.alignment.tracking` runs it only when lost).
        Under the model's lock: detections are rare (a lost track) and each is ~50 GFLOP at 320²."""
        with self._lock:
            return self._face_boxes(as_rgb_uint8(rgb))

    def landmarks_in_boxes(self, rgb: np.ndarray, boxes: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        """FAN alone on given boxes: (68,2) landmarks and the mean heatmap peak (quality) per box. Not
        under the model's lock: FAN in eval mode keeps no state, so sessions' calls may overlap (the
        studio batches them instead, `pcavs.alignment.fan_batch`)."""
        if not boxes:
            return []
        inputs, frames = self.fan_inputs(rgb, boxes)
        return self.landmarks_from_heatmaps(self.fan_heatmaps(inputs), frames)

    # The FAN stage in three steps, so that the network can run over several sessions' crops at once
    # (`pcavs.alignment.fan_batch.FanBatcher`); together they are face_alignment's
    # get_landmarks_from_image(detected_faces=boxes) with flip_input=False.
    def fan_inputs(self, rgb: np.ndarray, boxes: list[np.ndarray]) -> tuple[np.ndarray, list[tuple[np.ndarray, float]]]:
        """(k,3,256,256) float32 crops in [0,1] around the boxes, and each crop's (centre, scale)."""
        from face_alignment.api import CENTER_Y_OFFSET
        from face_alignment.utils import crop

        rgb = as_rgb_uint8(rgb)
        reference = self._fa.face_detector.reference_scale
        crops, frames = [], []
        for d in boxes:
            center = np.array([d[2] - (d[2] - d[0]) / 2.0, d[3] - (d[3] - d[1]) / 2.0])
            center[1] = center[1] - (d[3] - d[1]) * CENTER_Y_OFFSET
            scale = (d[2] - d[0] + d[3] - d[1]) / reference
            crops.append(crop(rgb, center, scale).transpose((2, 0, 1)).astype(np.float32) / 255.0)
            frames.append((center, scale))
        return np.stack(crops), frames

    def fan_heatmaps(self, inputs: np.ndarray) -> np.ndarray:
        """FAN over (n,3,256,256) crops, one forward, on the caller's current stream → (n,68,64,64)
        float32 heatmaps on the host."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(inputs)).to(self._fa.device, dtype=self._fa.dtype)
            out = self._fa.face_alignment_net(x)
            if isinstance(out, (list, tuple)):
                out = out[-1]
            return out.to(device="cpu", dtype=torch.float32).numpy()

    @staticmethod
    def landmarks_from_heatmaps(heatmaps: np.ndarray, frames: list[tuple[np.ndarray, float]],
                                ) -> list[tuple[np.ndarray, float]]:
        """Heatmaps → (68,2) image-pixel landmarks and the mean heatmap peak, per crop."""
        from face_alignment.utils import get_preds_fromhm

        out = []
        for i, (center, scale) in enumerate(frames):
            _, pts_img, scores = get_preds_fromhm(np.ascontiguousarray(heatmaps[i:i + 1]), center, scale)
            out.append((np.asarray(pts_img, dtype=np.float32).reshape(68, 2), float(np.mean(scores))))
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
