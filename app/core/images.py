"""Decoding image bytes, the same way for the builder and the service.

First frame of animated files, EXIF orientation applied, a pixel limit against decompression
bombs and an aspect-ratio limit against images that preprocessing would blow up. Mode conversion
to RGB happens later, in ``features.image_to_pixels``.

Callers that know their preprocessing's resize target pass it as ``min_size``: a JPEG is then
decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, Pillow's draft mode) whenever its
shorter side stays at least ``min_size``. Preprocessing resizes the shorter side to that target
anyway, so a 1080p upload no longer pays for decoding and then discarding ~16x the pixels.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from app.core.errors import AdvguardError

# Pillow's own bomb check only warns below 2x its limit; we make any excess an error.
DEFAULT_MAX_PIXELS = 40_000_000
# Preprocessing resizes the shorter side to the preset's size and keeps a centred square, so a
# 1 x N image grows to 32 x 32N pixels (256 x 256N for ImageNet) before the crop: an 862-byte PNG
# of 1 x 200,000 pixels cost 2.4 s, one of 1 x 1,000,000 6 GB and 14 s. Beyond this ratio of the
# longer to the shorter side an image is refused; panoramas stay well within it.
MAX_ASPECT_RATIO = 20
# Formats whose EXIF block, when present, Pillow exposes as ``info["exif"]``: without it there is
# no orientation to apply, and skipping ``exif_transpose`` (which parses EXIF, ~60 us) halves the
# decode cost of small images such as CIFAR's.
_EXIF_IN_INFO_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP"})
# Formats decoded by libjpeg, whose draft mode scales during decoding (MPO: multi-picture JPEG
# from phone cameras, whose first frame is a plain JPEG).
_DRAFT_FORMATS = frozenset({"JPEG", "MPO"})


class ImageDecodeError(AdvguardError):
    """The bytes are not a decodable image (or exceed the pixel limit)."""


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, min_size: int | None = None
) -> Image.Image:
    """Bytes -> loaded PIL image (first frame, EXIF-upright). Raises ``ImageDecodeError``.

    ``min_size``: the shorter side the caller will resize to (the preset's ``resize``); JPEGs
    may then come back downscaled by a power of two, never with a shorter side below it. The
    pixel limit always applies to the size the file declares, before any downscaling.
    """
    if not data:
        raise ImageDecodeError("empty file")
    if min_size is not None and min_size < 1:
        raise ValueError(f"min_size must be positive, got {min_size}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels"
                )
            if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                raise ImageDecodeError(
                    f"image of {width}x{height} pixels: one side is over {MAX_ASPECT_RATIO} "
                    "times the other (the model sees only a centred square of an image)"
                )
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)
            if min_size is not None:
                _draft_shorter_side(image, min_size)
            image.load()
            if image.format in _EXIF_IN_INFO_FORMATS and "exif" not in image.info:
                return image
            upright = ImageOps.exif_transpose(image)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image exceeds the pixel limit: {exc}") from exc
    except UnidentifiedImageError as exc:  # its message names an in-memory buffer, not a file
        raise ImageDecodeError("cannot decode image: not an image format Pillow reads") from exc
    except Exception as exc:  # Pillow raises many types for bad data: all mean "not an image"
        raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    return upright if upright is not None else image


def _draft_shorter_side(image: Image.Image, min_size: int) -> None:
    """Before ``load``: let libjpeg decode at the strongest 1/2, 1/4 or 1/8 reduction that fits.

    Pillow's draft picks the largest scale whose result is at least the requested size in both
    dimensions; asking for a min_size square therefore keeps the *shorter* side >= min_size, so
    the later resize to min_size only ever shrinks. EXIF rotation happens after this and swaps
    the sides, which leaves the shorter side unchanged. Other formats have no such decoder option.
    Images too small to halve (CIFAR's 32x32) are left untouched, so they decode bit-identically.
    """
    if image.format in _DRAFT_FORMATS and min(image.size) >= 2 * min_size:
        image.draft("RGB", (min_size, min_size))
