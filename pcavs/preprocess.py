"""Aligned 224×224 face crop → the tensor the PC-AVS encoders were trained on (spec §5).

The upstream loader (`VOXTestDataset.load_img`) does not feed the aligned crop as is: it keeps rows
0:192 and columns 16:208 (a top-centred 192×192 window) and scales that back up to 224 with bilinear
interpolation. Skipping this step shifts and rescales the face relative to what every network saw in
training, so identity, pose and the parity tests all go through this one function.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from pcavs.constants import CROP_SIZE

_MARGIN = 16  # upstream hard-codes crop_size 224 → [:224-2·16, 16:224-16]


def to_network_input(aligned_rgb: np.ndarray) -> torch.Tensor:
    """(224,224,3) RGB uint8 aligned crop → (3,224,224) float32 in [-1, 1], bit-exact with upstream.

    Upstream reads BGR and swaps to RGB after the resize; the resize works per channel, so resizing
    RGB directly gives identical numbers (checked against the parity case in the tests). The scaling
    is done in float64 and only then cast, like upstream's `x / 255.` on a uint8 array.
    """
    img = np.asarray(aligned_rgb)
    if img.shape != (CROP_SIZE, CROP_SIZE, 3) or img.dtype != np.uint8:
        raise ValueError(f"to_network_input expects an aligned {CROP_SIZE}x{CROP_SIZE}x3 uint8 RGB crop, "
                         f"got shape {img.shape} dtype {img.dtype}; run it through pcavs.alignment first")
    cropped = img[: CROP_SIZE - 2 * _MARGIN, _MARGIN: CROP_SIZE - _MARGIN]
    resized = cv2.resize(cropped, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_LINEAR)
    scaled = (resized.astype(np.float64) / 255.0).astype(np.float32) * 2.0 - 1.0
    return torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1)))
