"""Face alignment: photo or live frame → the 224×224 crop PC-AVS was trained on (spec §5, `align_68.py`).

One job per module:

* `geometry` — the align_68 rule: anchors, the similarity transform, the mouth bias, the warp;
* `images` — image files and arrays into RGB uint8;
* `sidecars` — `<photo>.landmarks.json`, hand-written landmarks that replace the detector;
* `aligners` — `FaceAligner` (the identity photo, once), `ClipAligner` (a whole pose video against its
  average, exactly as upstream aligned a clip) and `LiveAligner` (live pose frames against a running
  average, an online approximation of that);
* `detector` — `FaceAlignmentDetector`, the `face_alignment` package (SFD + 2D-FAN-4) from local weight
  files that are fetched once through `pcavs_live.common.download`;
* `errors` — `AlignmentError` and its kinds.

Landmarks come from an injectable `LandmarkDetector`, so everything but `detector` runs without weights.
"""
from pcavs.alignment.aligners import (UPSTREAM_BIAS_MEMORY, AlignedFace, ClipAligner, FaceAligner,
                                      LandmarkDetector, LiveAligner)
from pcavs.alignment.detector import (FAN_FILE, LANDMARK_MODEL_FILES, LANDMARK_WEIGHTS, SFD_FILE,
                                      FaceAlignmentDetector, default_landmark_model_dir, ensure_landmark_models)
from pcavs.alignment.errors import AlignmentError, FaceNotFoundError, LandmarkModelUnavailable
from pcavs.alignment.geometry import (MOUTH_TARGET, TEMPLATE, anchor_points, face_area, largest_face,
                                      mouth_bias, similarity_matrix, warp_to_crop)
from pcavs.alignment.images import as_rgb_uint8, read_rgb
from pcavs.alignment.sidecars import SIDECAR_SUFFIX, load_landmark_sidecar, sidecar_path

__all__ = [
    "AlignedFace", "AlignmentError", "ClipAligner", "FAN_FILE", "FaceAligner", "FaceAlignmentDetector", "FaceNotFoundError",
    "LANDMARK_MODEL_FILES", "LANDMARK_WEIGHTS", "LandmarkDetector", "LandmarkModelUnavailable", "LiveAligner", "MOUTH_TARGET",
    "SFD_FILE", "SIDECAR_SUFFIX", "TEMPLATE", "UPSTREAM_BIAS_MEMORY", "anchor_points", "as_rgb_uint8",
    "default_landmark_model_dir", "ensure_landmark_models", "face_area", "largest_face",
    "load_landmark_sidecar", "mouth_bias", "read_rgb", "sidecar_path", "similarity_matrix", "warp_to_crop",
]
