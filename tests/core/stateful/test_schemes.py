"""The fingerprint schemes on real CIFAR-10 photos: attack probes match their photo, unrelated
photos and honest edits do not, and a scheme's rows, keys and close test agree with the pure
functions they are made of."""

from __future__ import annotations

import numpy as np
import pytest

from app.core.images import encode_image
from app.core.models import PRESETS
from app.core.stateful.close_copies import (
    BLOCK_WORDS,
    SAMPLE_WORDS,
    block_means,
    close_copies,
    close_keys,
    pixel_samples,
    saturated,
)
from app.core.stateful.defaults import default_scheme
from app.core.stateful.hashes import SKETCH_WORDS, pixel_digests, window_hashes, window_sketch
from app.core.stateful.schemes import EmbeddingScheme, fingerprint_images
from evaluation.honest_traffic import as_served, edit, train_photos
from tests.conftest import CIFAR_TAR
from tests.core.stateful.probes import SECRET, noise_step, square_step


@pytest.mark.parametrize(("step", "share"), [(square_step, 1.0), (noise_step, 0.9)])
def test_near_duplicate_matches_unrelated_does_not(photos: np.ndarray, step, share: float) -> None:  # type: ignore[no-untyped-def]
    scheme = default_scheme(SECRET)
    rng = np.random.default_rng(1)
    prints = scheme.fingerprints(photos)
    near = scheme.fingerprints(np.stack([step(p, rng) for p in photos]))
    matched = [
        scheme.similarity(near[i], prints[i : i + 1])[0] >= scheme.threshold for i in range(40)
    ]
    assert np.mean(matched) >= share
    for i in range(len(photos)):
        others = np.delete(prints, i, axis=0)
        assert np.all(scheme.similarity(prints[i], others) < scheme.threshold)
        assert np.all(scheme.similarity(near[i], others) < scheme.threshold)


def test_honest_edits_are_not_near_exact(photos: np.ndarray) -> None:
    """Crops, resizes, flips and brightness changes move most pixels by more than an attack's
    step: the window hashes keep few windows in common (JPEG re-encodings may match)."""
    scheme = default_scheme(SECRET)
    rng = np.random.default_rng(2)
    preset = PRESETS["cifar"]
    for kind in ("crop", "resize", "flip", "brightness"):
        edited = np.stack(
            [as_served(encode_image(edit(p, kind, rng), None), preset) for p in photos[:20]]
        )
        similar = [
            scheme.similarity(a, b[None])[0]
            for a, b in zip(
                scheme.fingerprints(photos[:20]), scheme.fingerprints(edited), strict=True
            )
        ]
        assert np.mean(np.array(similar) >= scheme.threshold) <= 0.15, kind


def test_embedding_scheme_needs_features() -> None:
    scheme = EmbeddingScheme("layer1.2")
    features = {"layer1.2": np.array([[3.0, 4.0], [0.0, 2.0]], dtype=np.float32)}
    prints = scheme.fingerprints(np.zeros((2, 3, 32, 32), np.uint8), features)
    assert np.allclose(np.linalg.norm(prints, axis=1), 1.0)
    assert scheme.similarity(prints[0], prints) == pytest.approx([1.0, 0.8])
    with pytest.raises(ValueError):
        scheme.fingerprints(np.zeros((1, 3, 32, 32), np.uint8))


def test_fingerprints_and_keys_agree_with_fingerprints(photos: np.ndarray) -> None:
    """Rows: the window-hash sketch, then the block means, then the sampled values; keys: the
    window hashes, then the close-copy keys. Without a close radius, the sketch and the window
    hashes alone."""
    scheme = default_scheme(SECRET)
    rows, keys = scheme.fingerprints_and_keys(photos[:4])
    assert np.array_equal(rows, scheme.fingerprints(photos[:4]))
    hashes = window_hashes(photos[:4], SECRET, scheme.step, scheme.window, 50)
    means = block_means(photos[:4])
    assert rows.shape == (4, scheme.words) == (4, SKETCH_WORDS + BLOCK_WORDS + SAMPLE_WORDS)
    assert np.array_equal(rows[:, :SKETCH_WORDS], window_sketch(hashes))
    assert np.array_equal(rows[:, SKETCH_WORDS : SKETCH_WORDS + BLOCK_WORDS].view(np.uint8), means)
    samples = rows[:, SKETCH_WORDS + BLOCK_WORDS :].copy().view(np.uint8)
    assert np.array_equal(samples, pixel_samples(photos[:4], SECRET))
    flat = photos[:4].reshape(4, -1)
    assert all(set(samples[i].tolist()) <= set(flat[i].tolist()) for i in range(4))
    assert np.array_equal(keys, np.concatenate([hashes, close_keys(means, SECRET)], axis=1))
    bare = default_scheme(SECRET, close_radius=None)
    rows, keys = bare.fingerprints_and_keys(photos[:4])
    assert np.array_equal(rows, window_sketch(hashes)) and np.array_equal(keys, hashes)
    assert not bare.close(rows[0], rows).any()


def test_close_is_the_rule_over_every_row(photos: np.ndarray) -> None:
    """``WindowHashScheme.close`` on a store's rows (read as views, the resent photo's copies
    skipped by their samples) against the two pure tests applied to every row as a copy: exact
    copies, saturated +-8 copies (one on part of the image only), a +-1 copy (not saturated),
    unrelated photos; the rows as they are, as a slice of wider rows (read as views) and in
    column-major order (copied)."""
    scheme = default_scheme(SECRET)
    query = photos[0]
    signs = np.random.default_rng(5).choice([-8, 8], size=query.shape)
    saturated_copy = np.clip(query.astype(int) + signs, 0, 255).astype(np.uint8)
    faint_copy = np.clip(query.astype(int) + signs // 8, 0, 255).astype(np.uint8)
    part_copy = query.copy()  # +8 on the first 60% of values: some sampled words unchanged
    flat, cut = part_copy.reshape(-1), part_copy.size * 6 // 10
    flat[:cut] = np.clip(flat[:cut].astype(int) + 8, 0, 255)
    images = np.stack(
        [query, saturated_copy, query, faint_copy, *photos[1:6], saturated_copy, part_copy]
    )
    rows = scheme.fingerprints(images)
    wide = np.zeros((len(rows), rows.shape[1] + 3), rows.dtype)
    wide[:, 2 : 2 + rows.shape[1]] = rows
    means = rows[:, SKETCH_WORDS : SKETCH_WORDS + BLOCK_WORDS].copy().view(np.uint8)
    samples = rows[:, SKETCH_WORDS + BLOCK_WORDS :].copy().view(np.uint8)
    radius = scheme.close_radius
    assert radius is not None
    expected = close_copies(means[0], means, radius) & saturated(samples[0], samples, radius)
    assert expected.tolist() == [False, True, False, False] + [False] * 5 + [True, True]
    for stored in (rows, wide[:, 2 : 2 + rows.shape[1]], np.asfortranarray(rows)):
        assert scheme.close(rows[0], stored).tolist() == expected.tolist()
    assert scheme.close(rows[0], rows[:0]).shape == (0,)


def test_a_batchs_prints_are_its_parts_prints_in_order(photos: np.ndarray) -> None:
    """The service hashes large uploads in parts on worker processes (``app.service.hashing``):
    the parts' rows, concatenated, must be the whole batch's, whatever the split."""
    large = np.repeat(np.repeat(photos[:5], 7, axis=2), 7, axis=3)  # 5 x 3 x 224 x 224
    large[2] = 255 - large[2]
    scheme = default_scheme(SECRET)
    whole = fingerprint_images(scheme, large)
    sketches, keys = scheme.fingerprints_and_keys(large)
    assert np.array_equal(whole.sketches, sketches) and np.array_equal(whole.keys, keys)
    assert whole.digests == pixel_digests(large)
    for split in ([2, 3], [1, 4], [4]):
        parts = [fingerprint_images(scheme, part) for part in np.split(large, split)]
        assert np.array_equal(np.concatenate([p.sketches for p in parts]), whole.sketches)
        assert np.array_equal(np.concatenate([p.keys for p in parts]), whole.keys)
        assert [d for p in parts for d in p.digests] == whole.digests


def test_square_attacks_first_probe_shares_no_window_hash_match_with_its_photo() -> None:
    """The threat model's Square floor, measured: Square's first probe adds ±8/255 to each
    column of each channel (ART's initialisation), which moves nearly every pixel across a
    quantisation step of 25 somewhere in each window, so the probe is no near-duplicate of the
    photo it was made from (evaluation/README.md: 0 of 200 training photos match, a median of 3
    shared sketch bits of the 25 a match needs; chance collisions alone give ~2.4)."""
    scheme = default_scheme(b"advguard-evaluation-secret")
    originals = train_photos(CIFAR_TAR, 200)
    signs = np.random.default_rng(0).choice([-8, 8], size=(len(originals), 3, 1, 32))
    probes = np.clip(originals.astype(int) + signs, 0, 255).astype(np.uint8)
    a, b = scheme.fingerprints(originals), scheme.fingerprints(probes)
    shared = np.array([scheme.similarity(a[i], b[i : i + 1])[0] for i in range(len(a))])
    assert int((shared >= scheme.threshold).sum()) == 0
    assert float(np.median(shared)) == 3.0
    # the same photos edited by one grey level in one pixel still match: the scheme works
    edited = originals.copy()
    edited[:, 0, 0, 0] ^= 1
    c = scheme.fingerprints(edited)
    assert all(scheme.similarity(a[i], c[i : i + 1])[0] >= scheme.threshold for i in range(50))
