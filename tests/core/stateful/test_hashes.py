"""The fingerprints' pure functions on real CIFAR-10 photos: window hashes against their
definition, salts, the perceptual hash, the pixel helpers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from app.core.stateful import hashes as window_hash_module
from app.core.stateful.defaults import default_scheme
from app.core.stateful.hashes import (
    distinct_ascending,
    eight_bit,
    hamming,
    mix64,
    perceptual_hashes,
    shared_hashes,
    window_hashes,
    window_keys,
)
from app.core.stateful.schemes import PerceptualHashScheme
from tests.core.stateful.probes import SECRET, square_step


def test_window_hashes_shape_and_determinism(photos: np.ndarray) -> None:
    hashes = window_hashes(photos[:3], SECRET, step=25, window=20, top=50)
    assert hashes.shape == (3, 50) and hashes.dtype == np.uint64
    assert np.all(np.diff(hashes.astype(np.float64), axis=1) <= 0)  # sorted, descending
    assert np.array_equal(hashes, window_hashes(photos[:3], SECRET, 25, 20, 50))
    assert shared_hashes(hashes[0], hashes[:1])[0] == 50


def reference_window_hashes(
    images: np.ndarray, secret: bytes, step: int, window: int, top: int
) -> np.ndarray:
    """The definition, position by position: offset + sum_j value_j * key_j (mod 2^64), mixed,
    the ``top`` largest distinct kept, descending, 0 padding."""
    keys = [int(k) for k in window_keys(secret, window)]
    out = np.zeros((len(images), top), dtype=np.uint64)
    for i, image in enumerate(images):
        values = (image // step).transpose(1, 2, 0).reshape(-1).tolist()
        sums = [
            (keys[window] + sum(v * k for v, k in zip(values[p : p + window], keys, strict=False)))
            % (1 << 64)
            for p in range(len(values) - window + 1)
        ]
        mixed = mix64(np.array(sums, dtype=np.uint64))
        distinct = sorted(set(mixed.tolist()), reverse=True)[:top]
        out[i, : len(distinct)] = distinct
    return out


@pytest.mark.parametrize(("step", "window", "top"), [(25, 20, 50), (50, 20, 50), (7, 9, 30)])
def test_window_hashes_match_their_definition(
    photos: np.ndarray, step: int, window: int, top: int
) -> None:
    """The table-driven sums and the quantile shortcut give exactly the definition's hashes, on
    photos, on a flat image (few distinct windows: the full-sort fallback) and on noise."""
    rng = np.random.default_rng(3)
    flat = np.full((1, 3, 32, 32), 128, dtype=np.uint8)
    noise = rng.integers(0, 256, size=(1, 3, 32, 32), dtype=np.uint8)
    images = np.concatenate([photos[:2], flat, noise])
    assert np.array_equal(
        window_hashes(images, SECRET, step, window, top),
        reference_window_hashes(images, SECRET, step, window, top),
    )


def test_salts_change_hashes(photos: np.ndarray) -> None:
    """Another secret selects other windows: an attacker without it cannot tell which count."""
    a = window_hashes(photos[:5], SECRET, 25, 20, 50)
    b = window_hashes(photos[:5], b"another-secret", 25, 20, 50)
    for i in range(5):
        assert shared_hashes(a[i], b[i : i + 1])[0] == 0
    # while under each secret the near-duplicate relation is the same
    rng = np.random.default_rng(0)
    near = np.stack([square_step(p, rng) for p in photos[:5]])
    for secret in (SECRET, b"another-secret"):
        scheme = default_scheme(secret)
        original, moved = scheme.fingerprints(photos[:5]), scheme.fingerprints(near)
        for i in range(5):
            assert scheme.similarity(original[i], moved[i : i + 1])[0] >= scheme.threshold


def test_perceptual_hash(photos: np.ndarray) -> None:
    hashes = perceptual_hashes(photos)
    assert hashes.shape == (40,) and hashes.dtype == np.uint64
    brighter = np.clip(photos.astype(np.int16) + 10, 0, 255).astype(np.uint8)
    assert np.all(hamming(hashes[0], perceptual_hashes(brighter[:1])) <= 4)
    assert np.median(hamming(hashes[0], hashes[1:])) > 16
    scheme = PerceptualHashScheme()
    prints = scheme.fingerprints(photos[:2])
    assert scheme.similarity(prints[0], prints)[0] == 64


def test_distinct_ascending_is_np_unique() -> None:
    rng = np.random.default_rng(3)
    for size in (0, 1, 2, 3, 50, 120):
        for high in (2, 40, 1 << 62):
            values = rng.integers(0, high, size).astype(np.uint64)
            got = distinct_ascending(values)
            assert got.dtype == np.uint64
            assert got.tolist() == np.unique(values).tolist()


def test_eight_bit_inverts_image_to_pixels(photos: np.ndarray) -> None:
    assert np.array_equal(eight_bit(photos.astype(np.float32) / 255.0), photos)


def test_window_hashes_in_passes_are_the_one_pass_hashes(
    photos: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large images are hashed a few at a time; the rows do not depend on the grouping."""
    whole = window_hashes(photos[:7], SECRET, 25, 20, 50)
    two_images = 2 * 3 * 32 * 32  # values a pass
    monkeypatch.setattr(window_hash_module, "HASHED_VALUES_PER_PASS", two_images)
    assert np.array_equal(window_hashes(photos[:7], SECRET, 25, 20, 50), whole)
    monkeypatch.setattr(window_hash_module, "HASHED_VALUES_PER_PASS", 1)  # one a pass
    assert np.array_equal(window_hashes(photos[:7], SECRET, 25, 20, 50), whole)


def test_window_hashes_reuse_of_a_threads_arrays_changes_no_row(photos: np.ndarray) -> None:
    """Each thread hashes in arrays of its own, kept from call to call and grown as needed:
    batches of other sizes in between, and four threads at once, give every row as a fresh
    call does."""
    one = window_hashes(photos[:1], SECRET, 25, 20, 50)
    seven = window_hashes(photos[:7], SECRET, 25, 20, 50)
    flat = np.full((2, 3, 32, 32), 128, dtype=np.uint8)  # few distinct windows
    flat_hashes = window_hashes(flat, SECRET, 25, 20, 50)
    assert np.array_equal(window_hashes(photos[:1], SECRET, 25, 20, 50), one)  # after larger
    assert np.array_equal(window_hashes(photos[:7], SECRET, 25, 20, 50), seven)
    other_window = window_hashes(photos[:3], SECRET, 7, 9, 30)
    assert np.array_equal(window_hashes(flat, SECRET, 25, 20, 50), flat_hashes)

    def hash_repeatedly(first: int) -> list[np.ndarray]:
        return [window_hashes(photos[first : first + 3], SECRET, 25, 20, 50) for _ in range(20)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(hash_repeatedly, [0, 1, 2, 3]))
    for first, rows in zip([0, 1, 2, 3], results, strict=True):
        expected = window_hashes(photos[first : first + 3], SECRET, 25, 20, 50)
        assert all(np.array_equal(row, expected) for row in rows)
    assert np.array_equal(window_hashes(photos[:3], SECRET, 7, 9, 30), other_window)
