"""An uploaded photo, checked before anything else sees it: size, a real decoder, dimensions.

Nothing a client sends becomes a file path: the bytes are decoded in memory with Pillow (`verify`,
then a fresh `load`, since `verify` leaves the image unusable), limited in size before decoding and in
dimensions before the pixels are allocated, and handed on as an RGB uint8 array. Every refusal is an
`UploadError` with an HTTP status and one line the page shows as is.
"""
from __future__ import annotations

import io
import warnings

import numpy as np

from pcavs_live.common.errors import UserError

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_PHOTO_SIDE = 4096


class UploadError(UserError):
    """A photo the studio cannot use; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def decode_photo(data: bytes, max_bytes: int = MAX_UPLOAD_BYTES, max_side: int = MAX_PHOTO_SIDE) -> np.ndarray:
    """JPEG/PNG/WebP/... bytes → (H, W, 3) RGB uint8, EXIF orientation applied."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(data) > max_bytes:
        raise UploadError(f"the photo is {len(data) / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB", 413)
    if not data:
        raise UploadError("no photo received (empty upload); choose an image file or use the sample")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
                kind = probe.format or "image"
                if width > max_side or height > max_side:
                    raise UploadError(f"the photo is {width}x{height} pixels; the limit is {max_side}x{max_side}")
                probe.verify()
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                rgb = ImageOps.exif_transpose(img).convert("RGB")
    except UploadError:
        raise
    except UnidentifiedImageError:
        raise UploadError("the upload is not an image Pillow can read; use a JPEG or PNG photo") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(f"the photo is too large to decode; the limit is {max_side}x{max_side}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UploadError(f"the {kind} photo is damaged ({reason}); try another file") from None
    if min(rgb.size) < 32:
        raise UploadError(f"the photo is {rgb.size[0]}x{rgb.size[1]} pixels; a face needs at least 32x32")
    return np.asarray(rgb, dtype=np.uint8).copy()
