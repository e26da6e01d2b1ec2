"""Fingerprint schemes: a fingerprint of a batch of images and its similarity, for the window
hash (the default, with its close copies), the perceptual hash and the embedding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from app.core.stateful.close_copies import (
    BLOCK_WORDS,
    SAMPLE_WORDS,
    block_means,
    close_copies,
    close_keys,
    pixel_samples,
    saturated,
)
from app.core.stateful.hashes import (
    F32,
    SKETCH_WORDS,
    U64,
    FingerprintKind,
    eight_bit,
    embeddings,
    hamming,
    perceptual_hashes,
    pixel_digests,
    shared_bits,
    window_hashes,
    window_sketch,
)


class Scheme(Protocol):
    """A fingerprint and its similarity: ``similarity >= threshold`` is a match."""

    @property
    def kind(self) -> FingerprintKind: ...

    @property
    def threshold(self) -> float: ...

    def fingerprints(
        self,
        images: npt.NDArray[np.uint8],
        features: Mapping[str, npt.NDArray[np.float32]] | None = None,
    ) -> npt.NDArray[np.generic]:
        """(n, width) rows, one per image."""
        ...

    def similarity(
        self, query: npt.NDArray[np.generic], stored: npt.NDArray[np.generic]
    ) -> npt.NDArray[np.float64]:
        """``query`` (width,) against ``stored`` (m, width) -> (m,), higher is closer."""
        ...

    def close(
        self, query: npt.NDArray[np.generic], stored: npt.NDArray[np.generic]
    ) -> npt.NDArray[np.bool_]:
        """Which rows of ``stored`` are close copies of ``query`` (``close_copies``): matches
        for the consistent count only. All False for a scheme without them."""
        ...


def no_close_copies(stored: npt.NDArray[np.generic]) -> npt.NDArray[np.bool_]:
    """``Scheme.close`` of a scheme without close copies."""
    return np.zeros(len(stored), dtype=bool)


@dataclass(frozen=True)
class WindowHashScheme:
    """Blacklight-style window hashes, kept as their 1024-bit sketch; similarity = shared bits
    (about the hashes in common). Defaults: measured on CIFAR-10 (stateful_eval).

    With ``close_radius``, a row also carries the image's block means (``block_means``, 24 more
    words after the sketch's 16) and a secret sample of its values (``pixel_samples``, 32 more),
    and the keys the close-copy keys (``close_keys``, after the window hashes): ``close`` then
    finds close copies (block means within the radius, a saturated difference)."""

    secret: bytes
    step: int = 50
    window: int = 20
    top: int = 50
    threshold: float = 25.0
    kind: FingerprintKind = "window_hash"
    close_radius: int | None = None

    @property
    def words(self) -> int:
        """64-bit words in a fingerprint row."""
        return SKETCH_WORDS + (0 if self.close_radius is None else BLOCK_WORDS + SAMPLE_WORDS)

    def fingerprints(
        self,
        images: npt.NDArray[np.uint8],
        features: Mapping[str, npt.NDArray[np.float32]] | None = None,
    ) -> U64:
        return self.fingerprints_and_keys(images)[0]

    def fingerprints_and_keys(
        self,
        images: npt.NDArray[np.uint8],
        hashes: U64 | None = None,
        means: npt.NDArray[np.uint8] | None = None,
    ) -> tuple[U64, U64]:
        """(sketches, window hashes) from one hashing pass: the sketch is what the match rule
        compares; the hashes themselves (0: padding) are the keys of a store's index, since two
        queries whose sketches share ``threshold`` bits share almost as many hashes (chance
        bit collisions: ~2.4 of ~50). ``hashes``: the images' window hashes when they were
        computed elsewhere (on a GPU: ``device_hashes``), the same values; ``means`` likewise
        the images' block means."""
        if hashes is None:
            hashes = window_hashes(images, self.secret, self.step, self.window, self.top)
        sketches = window_sketch(hashes)
        if self.close_radius is None:
            return sketches, hashes
        if means is None:
            means = block_means(images)
        samples = pixel_samples(images, self.secret)
        rows: U64 = np.concatenate([sketches, _as_words(means), _as_words(samples)], axis=1)
        keys: U64 = np.concatenate([hashes, close_keys(means, self.secret)], axis=1)
        return rows, keys

    def similarity(
        self, query: npt.NDArray[np.generic], stored: npt.NDArray[np.generic]
    ) -> npt.NDArray[np.float64]:
        return shared_bits(
            query[:SKETCH_WORDS].astype(np.uint64, copy=False),
            stored[:, :SKETCH_WORDS].astype(np.uint64, copy=False),
        ).astype(np.float64)

    def close(
        self, query: npt.NDArray[np.generic], stored: npt.NDArray[np.generic]
    ) -> npt.NDArray[np.bool_]:
        if self.close_radius is None:
            return no_close_copies(stored)
        close = close_copies(_means_of(query[None])[0], _means_of(stored), self.close_radius)
        rows = close.nonzero()[0]
        if len(rows):
            # rows with the query's very samples differ by 0, never saturated: a resent photo's
            # copies, most of a busy store's close rows, are dropped in one word comparison
            first = SKETCH_WORDS + BLOCK_WORDS
            words = slice(first, first + SAMPLE_WORDS)
            same = (stored[rows, words] == query[words]).all(axis=1)
            close[rows[same]] = False
            rows = rows[~same]
        if len(rows):
            query_samples = _samples_of(query[None])[0]
            close[rows] = saturated(query_samples, _samples_of(stored[rows]), self.close_radius)
        return close


def _as_words(values: npt.NDArray[np.uint8]) -> U64:
    """(n, 8k) bytes as (n, k) little-endian 64-bit words: how a row carries them."""
    words: U64 = np.ascontiguousarray(values).view("<u8").astype(np.uint64)
    return words


def _bytes_of(rows: npt.NDArray[np.generic], first: int, words: int) -> npt.NDArray[np.uint8]:
    """``words`` words of each row from word ``first``, as bytes (``_as_words`` undone): a view
    of little-endian 64-bit rows (the stores' own, read per query), else a copy."""
    part = rows[:, first : first + words]
    if part.dtype != np.dtype("<u8") or part.strides[-1] != 8:
        part = np.ascontiguousarray(part, dtype="<u8")
    values: npt.NDArray[np.uint8] = part.view(np.uint8)
    return values


def _means_of(rows: npt.NDArray[np.generic]) -> npt.NDArray[np.uint8]:
    """The block means a window-hash scheme's rows carry after the sketch."""
    return _bytes_of(rows, SKETCH_WORDS, BLOCK_WORDS)


def _samples_of(rows: npt.NDArray[np.generic]) -> npt.NDArray[np.uint8]:
    """The sampled values a window-hash scheme's rows carry after the block means."""
    return _bytes_of(rows, SKETCH_WORDS + BLOCK_WORDS, SAMPLE_WORDS)


@dataclass(frozen=True)
class ImagePrints:
    """What a store keeps of a batch of 8-bit images, row i for image i: the sketches the match
    rule compares, the window hashes that key the index, and the exact-pixel digests."""

    sketches: U64
    keys: U64
    digests: list[bytes]


def fingerprint_images(
    scheme: WindowHashScheme,
    images: npt.NDArray[np.uint8],
    hashes: U64 | None = None,
    means: npt.NDArray[np.uint8] | None = None,
) -> ImagePrints:
    """The one computation of a batch's prints: the parts' rows of a batch cut in parts,
    concatenated, are the batch's (the service's worker processes hash parts of a batch).
    ``hashes``, ``means``: the window hashes and block means, when a GPU computed them
    (``fingerprints_and_keys``)."""
    sketches, keys = scheme.fingerprints_and_keys(images, hashes, means)
    return ImagePrints(sketches, keys, pixel_digests(images))


def fingerprint_pixels(scheme: WindowHashScheme, pixels: npt.NDArray[np.floating]) -> ImagePrints:
    """The prints of a batch of preprocessed float pixels in [0, 1] (N, C, H, W), the model's
    input, which the service screens: converted to the 8-bit image (``eight_bit``), then
    ``fingerprint_images``. Module-level, as the worker processes run it on their parts."""
    return fingerprint_images(scheme, eight_bit(pixels))


@dataclass(frozen=True)
class PerceptualHashScheme:
    """64-bit DCT pHash; similarity = 64 - Hamming distance."""

    threshold: float = 60.0
    kind: FingerprintKind = "phash"

    def fingerprints(
        self,
        images: npt.NDArray[np.uint8],
        features: Mapping[str, npt.NDArray[np.float32]] | None = None,
    ) -> U64:
        return perceptual_hashes(images)[:, None]

    def similarity(
        self, query: npt.NDArray[np.generic], stored: npt.NDArray[np.generic]
    ) -> npt.NDArray[np.float64]:
        distance = hamming(np.uint64(query[0]), stored[:, 0].astype(np.uint64))
        return (64 - distance).astype(np.float64)

    def close(
        self, query: npt.NDArray[np.generic], stored: npt.NDArray[np.generic]
    ) -> npt.NDArray[np.bool_]:
        return no_close_copies(stored)


@dataclass(frozen=True)
class EmbeddingScheme:
    """A pooled feature of the guard's forward pass; similarity = cosine."""

    layer: str
    threshold: float = 0.999
    kind: FingerprintKind = "embedding"

    def fingerprints(
        self,
        images: npt.NDArray[np.uint8],
        features: Mapping[str, npt.NDArray[np.float32]] | None = None,
    ) -> F32:
        if features is None:
            raise ValueError("the embedding fingerprint needs the forward pass's features")
        return embeddings(features, self.layer)

    def similarity(
        self, query: npt.NDArray[np.generic], stored: npt.NDArray[np.generic]
    ) -> npt.NDArray[np.float64]:
        cosine: npt.NDArray[np.float64] = (
            stored.astype(np.float64) @ query.astype(np.float64)
        ).reshape(-1)
        return cosine

    def close(
        self, query: npt.NDArray[np.generic], stored: npt.NDArray[np.generic]
    ) -> npt.NDArray[np.bool_]:
        return no_close_copies(stored)
