"""Images into the alignment code: RGB uint8 HxWx3, the project's boundary format (OpenCV's BGR stays here)."""
from __future__ import annotations

import os

import cv2
import numpy as np

from pcavs.alignment.errors import AlignmentError


def as_rgb_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Grey → RGB, RGBA → RGB; anything else that is not uint8 HxWx3 is refused naming `name`."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4) or img.dtype != np.uint8:
        raise AlignmentError(f"{name}: expected an RGB uint8 HxWx3 image, got shape {img.shape} dtype {img.dtype}")
    return np.ascontiguousarray(img[:, :, :3])


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Image file → RGB uint8, decoded by OpenCV like upstream's `cv2.imread`.

    Pillow checks the file first: OpenCV's PNG/JPEG decoders print their own lines (`libpng error: ...`)
    straight to the process's stderr for a damaged file, where the user is promised one `error:` line.
    Pillow raises instead, so a truncated or corrupt image is refused before OpenCV ever sees it."""
    _check_decodable(path)
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise AlignmentError(f"cannot read image file {path} (missing or not an image)")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def _check_decodable(path: str | os.PathLike) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()  # decodes every pixel: a truncated file fails here
    except FileNotFoundError:
        raise AlignmentError(f"cannot read image file {path}: not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise AlignmentError(f"cannot read image file {path}: {reason}",
                             hint="use an undamaged JPEG or PNG photo") from None
