"""Decoding image bytes, the same way for the builder and the service.

First frame of animated files, EXIF orientation applied, a pixel limit against decompression
bombs. Mode conversion to RGB happens later, in ``features.image_to_pixels``.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

from app.core.errors import AdvguardError

# Pillow's own bomb check only warns below 2x its limit; we make any excess an error.
DEFAULT_MAX_PIXELS = 40_000_000
# Formats whose EXIF block, when present, Pillow exposes as ``info["exif"]``: without it there is
# no orientation to apply, and skipping ``exif_transpose`` (which parses EXIF, ~60 us) halves the
# decode cost of small images such as CIFAR's.
_EXIF_IN_INFO_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP"})


class ImageDecodeError(AdvguardError):
    """The bytes are not a decodable image (or exceed the pixel limit)."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> loaded PIL image (first frame, EXIF-upright). Raises ``ImageDecodeError``."""
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels"
                )
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)
            image.load()
            if image.format in _EXIF_IN_INFO_FORMATS and "exif" not in image.info:
                return image
            upright = ImageOps.exif_transpose(image)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image exceeds the pixel limit: {exc}") from exc
    except Exception as exc:  # Pillow raises many types for bad data: all mean "not an image"
        raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    return upright if upright is not None else image
