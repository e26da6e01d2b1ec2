"""The torch window hash gives numpy's words bit for bit (here on the CPU; the GPU pack compares
them on cuda), whatever the image size, and with rows that have fewer distinct windows than
``top``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.core.stateful import close_copies, device_hashes, hashes

SECRET = b"device-hash-test-secret"


def _numpy_and_torch(images: np.ndarray, top: int = 50) -> tuple[np.ndarray, np.ndarray]:
    expected = hashes.window_hashes(images, SECRET, 50, 20, top)
    got = device_hashes.as_words(
        device_hashes.window_hashes(torch.from_numpy(images), SECRET, 50, 20, top)
    )
    return expected, got


@pytest.mark.parametrize("shape", [(3, 3, 32, 32), (2, 3, 224, 224), (2, 3, 48, 70)])
def test_window_hashes_match_numpys(shape: tuple[int, ...]) -> None:
    images = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    expected, got = _numpy_and_torch(images)
    assert got.dtype == np.uint64 and got.shape == (shape[0], 50)
    assert np.array_equal(expected, got)
    assert (expected[:, 0] >= np.uint64(1 << 63)).all()  # the largest words: sign bit set in int64


def test_rows_with_few_distinct_windows_are_padded_alike() -> None:
    flat = np.full((2, 3, 32, 32), 7, dtype=np.uint8)
    flat[1, :, :16] = 200  # two quantised levels: a handful of distinct windows
    expected, got = _numpy_and_torch(flat)
    assert np.array_equal(expected, got)
    assert (got[0, 1:] == 0).all() and 1 < np.count_nonzero(got[1]) < 50


def test_mix64_matches_numpys_on_words_with_the_high_bit() -> None:
    words = np.random.default_rng(5).integers(0, 2**64, 1000, dtype=np.uint64)
    words[:3] = [0, 2**63, 2**64 - 1]
    mixed = device_hashes.mix64(torch.from_numpy(words.view(np.int64)))
    assert np.array_equal(device_hashes.as_words(mixed), hashes.mix64(words))


def test_eight_bit_rounds_half_to_even_as_numpy() -> None:
    pixels = torch.rand(4, 3, 16, 16)
    pixels[0, 0, 0, :6] = torch.tensor([0.5, 1.5, 2.5, 254.5, 256.0, -3.0]) / 255.0
    assert np.array_equal(device_hashes.eight_bit(pixels).numpy(), hashes.eight_bit(pixels.numpy()))


def test_an_image_shorter_than_a_window_is_refused() -> None:
    with pytest.raises(ValueError, match="shorter than a window"):
        device_hashes.window_hashes(torch.zeros(1, 3, 1, 2, dtype=torch.uint8), SECRET, 50, 20, 5)


@pytest.mark.parametrize("shape", [(3, 3, 32, 32), (2, 3, 224, 224), (4, 3, 37, 29), (1, 1, 8, 8)])
def test_block_means_match_numpys(shape: tuple[int, ...]) -> None:
    """Uneven blocks (37 x 29), exact halves (the rounding), CIFAR's and ImageNet's sizes."""
    images = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    images[0, 0, :4, :4] = [[0, 1, 0, 1]] * 4  # a block of mean 0.5 on the 8x8 image
    got = device_hashes.block_means(torch.from_numpy(images)).numpy()
    assert got.dtype == np.uint8
    assert np.array_equal(got, close_copies.block_means(images))


def test_block_means_refuse_an_image_smaller_than_the_grid() -> None:
    with pytest.raises(ValueError, match="smaller than the 8x8 grid"):
        device_hashes.block_means(torch.zeros(1, 3, 7, 9, dtype=torch.uint8))
