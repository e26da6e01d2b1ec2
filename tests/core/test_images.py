"""decode_image's JPEG draft mode: smaller decodes, same shorter-side guarantee, same pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from app.core.features import eight_bit_to_pixels, image_to_pixels
from app.core.images import ImageDecodeError, decode_image, to_rgb
from app.core.models import PRESETS

WIDTH, HEIGHT = 1920, 1080
EXIF_ORIENTATION = 0x0112


def photo_like(width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> np.ndarray:
    """Smooth colour waves plus sensor-like noise: structure at every scale, like a photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(x / 97 + y / 211),
            128 + 90 * np.cos(y / 53),
            128 + 80 * np.sin((x + y) / 150),
        ],
        axis=-1,
    )
    noise = np.random.default_rng(seed).normal(0, 12, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str = "JPEG", **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def jpeg_1080p() -> bytes:
    return encode(photo_like(), quality=90)


def test_draft_keeps_the_shorter_side_at_least_min_size(jpeg_1080p: bytes) -> None:
    drafted = decode_image(jpeg_1080p, min_size=256)
    assert 256 <= min(drafted.size) < HEIGHT
    assert drafted.size == (480, 270)  # 1/4 scale: 1/8 would give a shorter side of 135
    assert drafted.mode == "RGB"


def test_without_min_size_the_full_image_is_decoded(jpeg_1080p: bytes) -> None:
    assert decode_image(jpeg_1080p).size == (WIDTH, HEIGHT)


@pytest.mark.parametrize(
    ("min_size", "expected"),
    [
        (32, (240, 135)),  # CIFAR's resize: the strongest reduction, 1/8
        (135, (240, 135)),
        (136, (480, 270)),
        (540, (960, 540)),
        (541, (WIDTH, HEIGHT)),
        (4000, (WIDTH, HEIGHT)),  # larger than the image: never upscaled, never smaller
    ],
)
def test_draft_picks_the_strongest_reduction_that_fits(
    jpeg_1080p: bytes, min_size: int, expected: tuple[int, int]
) -> None:
    assert decode_image(jpeg_1080p, min_size=min_size).size == expected


def test_progressive_jpeg_is_drafted_too() -> None:
    data = encode(photo_like(), quality=90, progressive=True)
    assert decode_image(data, min_size=256).size == (480, 270)


def test_jpeg_too_small_to_halve_decodes_identically() -> None:
    data = encode(photo_like(48, 40), quality=90)  # CIFAR-like: shorter side < 2 x min_size
    full, drafted = decode_image(data), decode_image(data, min_size=32)
    assert drafted.size == (48, 40)
    assert np.array_equal(np.asarray(full), np.asarray(drafted))


def test_png_is_decoded_in_full() -> None:
    pixels = photo_like(640, 360)
    data = encode(pixels, "PNG")
    image = decode_image(data, min_size=32)
    assert image.size == (640, 360)
    assert np.array_equal(np.asarray(image), pixels)


def test_first_frame_of_an_mpo_is_drafted() -> None:
    buffer = io.BytesIO()
    first, second = Image.fromarray(photo_like()), Image.fromarray(photo_like(960, 540, seed=1))
    first.save(buffer, format="MPO", save_all=True, append_images=[second], quality=90)
    assert decode_image(buffer.getvalue(), min_size=256).size == (480, 270)


def test_exif_rotated_jpeg_is_upright_after_draft() -> None:
    # Upright portrait (1080 wide, 1920 tall): bright top-left quadrant, dark elsewhere.
    upright = np.full((WIDTH, HEIGHT, 3), 40, dtype=np.uint8)
    upright[: WIDTH // 2, : HEIGHT // 2] = 220
    # Stored turned 90 degrees counter-clockwise; orientation 6 tells viewers to turn it back.
    stored = np.ascontiguousarray(np.rot90(upright, k=1))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    data = encode(stored, quality=90, exif=exif.tobytes())

    image = decode_image(data, min_size=256)
    assert image.size == (270, 480)
    array = np.asarray(image, dtype=np.float32)
    top_left = array[:240, :135].mean()
    assert top_left > 200
    for quadrant in (array[:240, 135:], array[240:, :135], array[240:, 135:]):
        assert quadrant.mean() < 60


def test_pixel_limit_applies_to_the_declared_size(jpeg_1080p: bytes) -> None:
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode_image(jpeg_1080p, WIDTH * HEIGHT - 1, min_size=256)


@pytest.mark.parametrize("size", [(1, 200_000), (200_000, 1), (3, 61), (61, 3)])
def test_an_image_over_the_aspect_ratio_limit_is_refused_before_it_is_decoded(
    size: tuple[int, int],
) -> None:
    """Resizing the shorter side of a 1 x 200,000 image to 32 made 32 x 6.4M pixels (2.4 s; at
    1 x 1,000,000, 6 GB) from an 862-byte PNG."""
    data = encode(np.zeros((size[1], size[0], 3), dtype=np.uint8), "PNG")
    with pytest.raises(ImageDecodeError, match=r"one side is over 20 times the other"):
        decode_image(data, min_size=32)


@pytest.mark.parametrize("size", [(1, 20), (20, 1), (3, 60), (1920, 96)])
def test_an_image_at_the_aspect_ratio_limit_is_decoded(size: tuple[int, int]) -> None:
    data = encode(np.zeros((size[1], size[0], 3), dtype=np.uint8), "PNG")
    image = decode_image(data, min_size=32)
    assert image.size == size
    assert image_to_pixels(image, PRESETS["cifar"]).shape == (3, 32, 32)


def test_min_size_must_be_positive(jpeg_1080p: bytes) -> None:
    with pytest.raises(ValueError, match="min_size"):
        decode_image(jpeg_1080p, min_size=0)


def test_imagenet_pixels_barely_change_with_draft(jpeg_1080p: bytes) -> None:
    preset = PRESETS["imagenet"]
    full = image_to_pixels(decode_image(jpeg_1080p), preset)
    drafted = image_to_pixels(decode_image(jpeg_1080p, min_size=preset.resize), preset)
    assert full.shape == drafted.shape == (3, preset.crop, preset.crop)
    # In the network's normalised units ((x - mean) / std, as FeatureNetwork feeds the model).
    std = torch.tensor(preset.std).view(3, 1, 1)
    difference = ((full - drafted) / std).abs().mean().item()
    assert difference < 0.03  # measured 0.014 for this image (Pillow 13, libjpeg-turbo)


def torchvision_pixels(image: Image.Image, resize: int, crop: int) -> torch.Tensor:
    """The preprocessing as torchvision's functions chain it (what bundles were built with)."""
    image = TF.resize(image, resize, interpolation=TF.InterpolationMode.BILINEAR)
    image = TF.center_crop(image, [crop, crop])
    return TF.pil_to_tensor(image).float().div_(255.0)


def test_eight_bit_to_pixels_gives_torchvisions_values_for_every_byte() -> None:
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = np.stack([values, values.T, 255 - values], axis=-1)  # every value in every channel
    converted = eight_bit_to_pixels(image)
    expected = TF.pil_to_tensor(Image.fromarray(image)).float().div_(255.0)
    assert converted.dtype == torch.float32 and converted.shape == (3, 16, 16)
    assert converted.is_contiguous()
    assert np.array_equal(converted.numpy().view(np.uint32), expected.numpy().view(np.uint32))


@pytest.mark.parametrize("preset", ["imagenet", "cifar"])
@pytest.mark.parametrize("size", [(300, 260), (64, 48), (20, 24)])  # wide, upscaled, tall
def test_image_to_pixels_is_torchvisions_chain_bit_for_bit(
    preset: str, size: tuple[int, int]
) -> None:
    chosen = PRESETS[preset]
    image = Image.fromarray(photo_like(*size, seed=size[0]))
    pixels = image_to_pixels(image, chosen)
    expected = torchvision_pixels(image, chosen.resize, chosen.crop)
    assert pixels.shape == expected.shape == (3, chosen.crop, chosen.crop)
    assert np.array_equal(pixels.numpy().view(np.uint32), expected.numpy().view(np.uint32))
    pixels.mul_(2.0)  # the tensor is the caller's: writable, sharing nothing


def test_bytes_of_no_image_format_say_so_without_naming_a_buffer() -> None:
    """Pillow's own message names the in-memory buffer (``<_io.BytesIO object at 0x...>``),
    which the service would hand to its client."""
    with pytest.raises(ImageDecodeError) as raised:
        decode_image(b"this is a text file, not a JPEG")
    assert str(raised.value) == "cannot decode image: not an image format Pillow reads"


def _saved(image: Image.Image, fmt: str) -> Image.Image:
    """The image as a file of ``fmt`` decodes: the mode a client's upload arrives in."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return decode_image(buffer.getvalue())


GRAY = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))  # 8 x 64: every 4th level


@pytest.mark.parametrize(
    ("stored", "fmt"),
    [
        (GRAY.astype(np.uint16) * 257, "PNG"),  # a 16-bit PNG: 0-65535
        (GRAY.astype(np.uint16) * 257, "TIFF"),
        (GRAY.astype(np.float32) / 255, "TIFF"),  # float in [0, 1]
        (GRAY.astype(np.float32), "TIFF"),  # float in 0-255
        (GRAY.astype(np.int32), "TIFF"),  # 32-bit integers in 0-255
    ],
    ids=["png-16", "tiff-16", "float-fractions", "float-levels", "int32-levels"],
)
def test_wide_grayscale_files_read_as_the_8_bit_picture_they_store(
    stored: np.ndarray, fmt: str
) -> None:
    """Pillow's RGB conversion clips these modes: a 16-bit PNG came out nearly white and a float
    image in [0, 1] black."""
    image = _saved(Image.fromarray(stored), fmt)
    assert image.mode != "L"  # the wide mode reached the conversion
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (*GRAY.shape, 3)
    for channel in range(3):
        assert np.array_equal(rgb[..., channel], GRAY)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_float_image_with_values_of_no_colour_is_refused(bad: float) -> None:
    values = GRAY.astype(np.float32) / 255
    values[3, 5] = bad
    image = _saved(Image.fromarray(values), "TIFF")
    with pytest.raises(ImageDecodeError, match="NaN or infinite"):
        image_to_pixels(image, PRESETS["cifar"])


def test_a_mode_without_an_rgb_conversion_is_a_decode_error() -> None:
    with pytest.raises(ImageDecodeError, match="mode La"):
        to_rgb(Image.new("La", (4, 4)))


def test_transparent_pixels_are_white_whatever_colour_they_hold() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent but one pixel
    rgba[0, 0, 3] = 255
    rgb = np.asarray(to_rgb(_saved(Image.fromarray(rgba), "PNG")))
    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert (rgb.reshape(-1, 3)[1:] == 255).all()
