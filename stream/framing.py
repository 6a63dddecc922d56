"""Call-sized pictures: the 224×224 face crop turned into the 640×480 / 1280×720 frame call apps expect.

Two framings, chosen by `output.framing`:

* `fit` — the crop scaled into the frame, centred, black bars on the sides (letterbox).
* `paste` — the generated crop pasted back into the user's own photo at the place it was cut from, and
  that photo letterboxed into the frame. The call then shows the person's photo, hair, shoulders and
  background, with a moving face, instead of a tight crop. This is LivePortrait's paste-back shape:
  the alignment's similarity transform (photo → crop) is inverted, a feathered mask defined on the crop
  is warped into the frame once per photo, and each frame costs one `cv2.warpAffine` of the crop and one
  per-pixel blend, both limited to the mask's bounding box. The photo's letterboxing is folded into the
  inverse transform, so a large photo is resized once, never per frame.

`FramedSink` applies a framer in front of any `FrameSink`; sinks that share one framer share its output
(each distinct input frame is framed once, and the scheduler's repeated slots reuse the last result).
"""
from __future__ import annotations

import re
from typing import Protocol

import cv2
import numpy as np

from pcavs_live.common.errors import UserError
from pcavs.constants import CROP_SIZE

Size = tuple[int, int]  # (width, height)
FRAMINGS = ("fit", "paste")
FEATHER_PX = 24.0  # width of the mask's soft border, in crop pixels
MASK_INSET_PX = 6  # the mask reaches zero this far inside the crop's edge (the crop's border may be black)
MASK_CORNER_PX = 56  # corner radius of the rounded-square mask, in crop pixels


class FramingError(UserError):
    """output.size / output.framing cannot be applied (one line naming the value)."""


def parse_size(text: str) -> Size | None:
    """"640x480" → (640, 480); "native" → None (keep the crop). Any "auto" is resolved by `size_for`."""
    value = text.strip().lower()
    if value == "native":
        return None
    match = re.fullmatch(r"([1-9]\d*)x([1-9]\d*)", value)
    if not match:
        raise FramingError(f"output.size {text!r}: expected WIDTHxHEIGHT (e.g. 640x480), 'native' or 'auto'")
    size = (int(match.group(1)), int(match.group(2)))
    return None if size == (CROP_SIZE, CROP_SIZE) else size


def size_for(setting: str, auto: Size | None) -> Size | None:
    """The picture size one output gets: `setting` (output.size), where "auto" means the output's own
    size rule `auto` (its registry entry's: a virtual camera is call-sized, the viewer and the mp4 keep
    the native crop, None)."""
    if setting.strip().lower() == "auto":
        return auto
    return parse_size(setting)


def letterbox_matrix(src_size: Size, dst_size: Size) -> np.ndarray:
    """(2,3) affine that scales a src_w×src_h picture uniformly into dst_w×dst_h, centred."""
    (sw, sh), (dw, dh) = src_size, dst_size
    scale = min(dw / sw, dh / sh)
    return np.array([[scale, 0.0, (dw - scale * sw) / 2], [0.0, scale, (dh - scale * sh) / 2]])


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """(2,3) affine of `outer ∘ inner` (apply inner first)."""
    a = np.vstack([outer, [0.0, 0.0, 1.0]]) @ np.vstack([inner, [0.0, 0.0, 1.0]])
    return a[:2]


def _letterbox(image: np.ndarray, size: Size) -> np.ndarray:
    """Resize once with the filter suited to the direction (area when shrinking), then centre."""
    h, w = image.shape[:2]
    scale = min(size[0] / w, size[1] / h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, new, interpolation=interp) if new != (w, h) else image
    out = np.zeros((size[1], size[0], 3), np.uint8)
    x0, y0 = (size[0] - new[0]) // 2, (size[1] - new[1]) // 2
    out[y0:y0 + new[1], x0:x0 + new[0]] = resized
    return out


def feathered_mask(crop_size: int = CROP_SIZE, feather: float = FEATHER_PX, inset: int = MASK_INSET_PX,
                   corner: int = MASK_CORNER_PX) -> np.ndarray:
    """float32 (crop, crop) in [0, 1]: 1 over the face, falling smoothly (smoothstep of the distance to
    a rounded square) to exactly 0 `inset` px inside the crop's edge, so the crop's own border, which is
    black where the photo ended, never shows."""
    region = np.zeros((crop_size, crop_size), np.uint8)
    lo, hi = inset, crop_size - 1 - inset
    r = min(corner, (hi - lo) // 2)
    cv2.rectangle(region, (lo + r, lo), (hi - r, hi), 1, -1)
    cv2.rectangle(region, (lo, lo + r), (hi, hi - r), 1, -1)
    for cx in (lo + r, hi - r):
        for cy in (lo + r, hi - r):
            cv2.circle(region, (cx, cy), r, 1, -1)
    inside = cv2.distanceTransform(region, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    t = np.clip(inside / feather, 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


class Framer(Protocol):
    size: Size

    def __call__(self, frame: np.ndarray) -> np.ndarray: ...


class FitFramer:
    """The crop scaled into `size`, centred, with black bars."""

    def __init__(self, size: Size) -> None:
        self.size = size

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        return _letterbox(np.asarray(frame, np.uint8), self.size)


class PasteFramer:
    """The generated crop pasted back into `photo` (full resolution, RGB uint8), letterboxed to `size`.

    `crop_matrix` is the (2,3) similarity the identity alignment used (photo pixels → crop pixels,
    `AlignedFace.matrix`). Outside the mask the output is exactly the letterboxed photo; where the mask
    is 1 it is exactly the crop warped back; in between a smooth blend.
    """

    def __init__(self, photo: np.ndarray, crop_matrix: np.ndarray, size: Size, crop_size: int = CROP_SIZE,
                 feather: float = FEATHER_PX) -> None:
        photo = np.asarray(photo)
        if photo.ndim != 3 or photo.shape[2] != 3 or photo.dtype != np.uint8:
            raise ValueError(f"PasteFramer needs an RGB uint8 photo, got {photo.shape} {photo.dtype}")
        self.size, self.crop_size = size, crop_size
        photo_to_frame = letterbox_matrix((photo.shape[1], photo.shape[0]), size)
        self.canvas = _letterbox(photo, size)  # the background every frame starts from
        self.crop_to_frame = compose(photo_to_frame, cv2.invertAffineTransform(np.asarray(crop_matrix, np.float64)))
        mask = cv2.warpAffine(feathered_mask(crop_size, feather), self.crop_to_frame, size, flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        ys, xs = np.nonzero(mask > 0)
        if len(xs) == 0:  # the face lies outside the frame: nothing to paste (a broken alignment)
            raise FramingError("output.framing = 'paste': the aligned face does not overlap the photo",
                               hint="use output.framing = 'fit'")
        self.box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)  # x0, y0, x1, y1
        x0, y0, x1, y1 = self.box
        self.mask = mask  # full-frame mask, kept for tests and diagnostics
        self._weight = np.ascontiguousarray(mask[y0:y1, x0:x1])
        self._inverse_weight = np.ascontiguousarray(1.0 - self._weight)
        self._warp = self.crop_to_frame.copy()
        self._warp[:, 2] -= (x0, y0)  # warp straight into the box, not the whole frame

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        crop = np.asarray(frame, np.uint8)
        if crop.shape != (self.crop_size, self.crop_size, 3):
            raise ValueError(f"PasteFramer expects {self.crop_size}x{self.crop_size} RGB crops, got {crop.shape}")
        x0, y0, x1, y1 = self.box
        face = cv2.warpAffine(crop, self._warp, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE)
        out = self.canvas.copy()
        out[y0:y1, x0:x1] = cv2.blendLinear(face, out[y0:y1, x0:x1], self._weight, self._inverse_weight)
        return out


def make_framer(framing: str, size: Size, photo: np.ndarray | None = None,
                crop_matrix: np.ndarray | None = None) -> Framer:
    """`fit` needs nothing else; `paste` needs the identity photo and its alignment matrix."""
    if framing == "fit":
        return FitFramer(size)
    if framing == "paste":
        if photo is None or crop_matrix is None:
            raise ValueError("paste framing needs the photo and the alignment matrix")
        return PasteFramer(photo, crop_matrix, size)
    raise FramingError(f"output.framing {framing!r}: expected one of {', '.join(FRAMINGS)}")


class SharedFramer:
    """Frames each distinct input once for every sink holding it: the scheduler passes the same array
    object for a repeated slot, and several outputs of one size get the same frame. Relies on frames
    not being modified after they are handed to the sinks (the scheduler and every sink treat them as
    read-only)."""

    def __init__(self, framer: Framer) -> None:
        self.framer = framer
        self.size = framer.size
        self._last_in: np.ndarray | None = None
        self._last_out: np.ndarray | None = None
        self.framed = 0  # frames actually framed (the rest were cache hits)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if frame is not self._last_in:
            self._last_out = self.framer(frame)
            self._last_in = frame  # holding it keeps its id from being reused
            self.framed += 1
        return self._last_out  # type: ignore[return-value]


class FramedSink:
    """A FrameSink in front of another: opens it at the framer's size and frames every picture."""

    def __init__(self, sink, framer: Framer) -> None:
        self.sink, self.framer = sink, framer

    def open(self, width: int, height: int, fps: int, sample_rate: int) -> None:
        self.sink.open(self.framer.size[0], self.framer.size[1], fps, sample_rate)

    def write(self, frame: np.ndarray, audio: np.ndarray, frame_index: int) -> None:
        self.sink.write(self.framer(frame), audio, frame_index)

    def close(self) -> None:
        self.sink.close()
