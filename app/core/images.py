"""Decoding image bytes, the same way for the builder and the service.

First frame of animated files, EXIF orientation applied, a pixel limit against decompression
bombs and an aspect-ratio limit against images that preprocessing would blow up. Mode conversion
to RGB (``to_rgb``) happens later, in ``features.image_to_pixels``.

Callers that know their preprocessing's resize target pass it as ``min_size``: a JPEG is then
decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, Pillow's draft mode) whenever its
shorter side stays at least ``min_size``. Preprocessing resizes the shorter side to that target
anyway, so a 1080p upload no longer pays for decoding and then discarding ~16x the pixels.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
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


# Integer and float grayscale modes that Pillow's RGB conversion would clip instead of scale
_WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode Pillow decodes -> 8-bit RGB, as a person viewing the file would see it. Raises
    ``ImageDecodeError`` for what has no such picture.

    - 16- and 32-bit integer grayscale: scaled from 0-65535 when a value exceeds 255, else read
      as 8-bit values (Pillow's own conversion clips, so a 16-bit PNG came out nearly white);
    - 32-bit float grayscale: values all within [0, 1] are that range's fractions (the float
      convention), otherwise 8-bit values, clipped; NaN or infinite values are refused (Pillow
      turned them into black);
    - transparency is composited onto white rather than letting the conversion reveal whatever
      colour the transparent pixels hold.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_GRAY_MODES:
        image = _eight_bit_gray(image)
    has_palette_alpha = image.mode == "P" and "transparency" in image.info
    try:
        if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or has_palette_alpha:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        return image.convert("RGB")
    except ValueError as exc:  # a mode without a conversion to RGB
        raise ImageDecodeError(f"cannot convert an image of mode {image.mode} to RGB") from exc


def _eight_bit_gray(image: Image.Image) -> Image.Image:
    """One float32 copy scaled in place: an upload may hold up to ``DEFAULT_MAX_PIXELS`` values,
    and each further temporary would cost 4 bytes a value on a decoding thread."""
    values = np.array(image, dtype=np.float32)
    if not np.isfinite(values).all():
        raise ImageDecodeError("image holds NaN or infinite values")
    if image.mode == "F":
        peak = 1.0 if values.size and values.min() >= 0 and values.max() <= 1 else 255.0
    else:
        peak = 65535.0 if values.max(initial=0) > 255 else 255.0
    values *= np.float32(255.0 / peak)
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return Image.fromarray(values.astype(np.uint8))


def encode_image(image: Image.Image, quality: int | None) -> bytes:
    """An image as the file a client uploads: PNG when ``quality`` is None (lossless), else a
    JPEG at that quality with Pillow's (libjpeg's) defaults, 4:2:0 colour subsampling."""
    buffer = io.BytesIO()
    if quality is None:
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def jpeg_round_trip(image: Image.Image, quality: int) -> Image.Image:
    """The image after a round trip through a JPEG file at ``quality`` (``encode_image``),
    decoded to RGB: a client's re-encoding, or the JPEG squeezer's (``features.jpeg_squeeze``)."""
    return Image.open(io.BytesIO(encode_image(image, quality))).convert("RGB")
