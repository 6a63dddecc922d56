"""Landmark sidecar files: `<photo>.landmarks.json` next to a photo replaces the face detector.

A photo the detector cannot handle (or a machine without its weights) can still be used by writing its
landmarks by hand; the bundled sample photo ships one, so the demo runs offline.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pcavs.alignment.errors import AlignmentError

SIDECAR_SUFFIX = ".landmarks.json"


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
