"""Close copies: a stored query whose block means all lie within a radius of the query's and
whose difference from it is saturated, as an L-inf attack's step is. They widen the consistent
count only and never flag anyone (why: the comment under the imports).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache

import numpy as np
import numpy.typing as npt

from app.core.stateful.hashes import U64, mix64

# Square's first probe (ART's L-inf initialisation) adds +-eps to whole pixel columns: every
# value moves by eps = 8/255, 8 grey levels of the window hash's 25-level steps, so no window
# hash survives it, and it can succeed before anything matches. Its block means move by at most
# eps too, and nearly every value moves by exactly eps: an L-inf attack spends its budget on
# every pixel with one magnitude (sign steps, Square's stripes and squares), where an honest
# edit spreads its changes over many. A *close copy* is a stored query whose block means are all
# within CLOSE_RADIUS of the query's *and* whose difference from it is saturated (``saturated``,
# on a secret sample of the pixels). It only widens the consistent count
# (``DetectionRule.keeps_anchor``) and never flags anyone (evaluation/README.md): without the
# saturation test, honest re-encodings were close copies too, and 4.3% of the honest burst
# answers of the judged traffic were replaced (evaluation.consistency_cost).
BLOCK_GRID = 8  # block means per side and channel: 3 x 8 x 8 = 192 values, 24 64-bit words
BLOCK_VALUES = 3 * BLOCK_GRID * BLOCK_GRID
BLOCK_WORDS = BLOCK_VALUES // 8
CLOSE_RADIUS = 9  # grey levels: an L-inf change of 8/255 plus one level of the means' rounding
# The index's close-copy keys: grid hashes of a few block means each. Chosen on 2,000 training
# photos (``python -m evaluation.close_keys --grid``): ~0.2 unrelated photos of 2,000 stored
# share 10 keys with a query, and a close copy that moved every mean by 9 (the worst case)
# shares fewer than 10 in 0.05-0.20% (evaluation/results/query-attacks/close_keys.md).
CLOSE_TABLES = 64  # keys a query
CLOSE_COORDS = 8  # block means a key reads
CLOSE_CELL = 64  # grey levels a key's grid cell spans (offsets from the secret)


def block_means(images: npt.NDArray[np.uint8], grid: int = BLOCK_GRID) -> npt.NDArray[np.uint8]:
    """(n, 3, H, W) uint8 -> (n, 3 * grid * grid) uint8: each channel's mean over a grid x grid
    partition of the image (block edges at ``i * H // grid``; any size at least grid x grid),
    rounded, channel-major. A change of at most e grey levels per pixel moves each mean by at
    most e before rounding."""
    n, channels, height, width = images.shape
    if height < grid or width < grid:
        raise ValueError(f"images of {height}x{width} are smaller than the {grid}x{grid} grid")
    # Each block's sum as two matrix products with 0/1 pooling matrices: exact, since every
    # partial sum is an integer below 2^24 (float32; float64 for blocks of over 65,793 pixels),
    # in half the time of two ``np.add.reduceat`` (5 against 10 us a CIFAR-10 image in batches
    # of 20, ad hoc, 2026-12-02): the service computes it for every query.
    rows, cols = block_sizes(height, grid), block_sizes(width, grid)
    dtype = np.float32 if int(rows.max()) * int(cols.max()) * 255 < 1 << 24 else np.float64
    pixels: npt.NDArray[np.floating] = images.astype(dtype)
    sums = _block_pooling(height, grid, dtype).T @ (pixels @ _block_pooling(width, grid, dtype))
    means = np.rint(sums.astype(np.float64) / (rows[:, None] * cols[None, :]))
    out: npt.NDArray[np.uint8] = means.astype(np.uint8).reshape(n, channels * grid * grid)
    return out


def block_sizes(size: int, grid: int) -> npt.NDArray[np.int64]:
    """The lengths of ``grid`` blocks over ``size`` values, block edges at ``i * size // grid``."""
    edges = (np.arange(grid + 1) * size) // grid
    return np.diff(edges)


@cache
def _block_pooling(size: int, grid: int, dtype: type[np.floating]) -> npt.NDArray[np.floating]:
    """(size, grid): column j is 1 on block j's values (``block_sizes``), 0 elsewhere."""
    block = np.repeat(np.arange(grid), block_sizes(size, grid))
    pooling: npt.NDArray[np.floating] = (block[:, None] == np.arange(grid)[None, :]).astype(dtype)
    pooling.flags.writeable = False  # cached and shared
    return pooling


@dataclass(frozen=True)
class CloseKeyShape:
    """How the close-copy keys are made: ``tables`` keys, each over ``coords`` block means in
    grid cells of ``cell`` grey levels."""

    tables: int = CLOSE_TABLES
    coords: int = CLOSE_COORDS
    cell: int = CLOSE_CELL


@cache
def _close_key_tables(
    secret: bytes, values: int, shape: CloseKeyShape
) -> tuple[npt.NDArray[np.intp], U64, U64, U64]:
    """The close-copy keys' salt, from ``secret``: per table, the block means it reads, their
    cell offsets, odd multipliers, and an offset for the hash. (coords, offsets, mult, salt)."""
    seed = int.from_bytes(hashlib.shake_256(b"advguard/close-keys/" + secret).digest(32), "little")
    rng = np.random.default_rng(seed)
    tables, coords_per = shape.tables, shape.coords
    coords = np.stack(
        [rng.choice(values, coords_per, replace=False) for _ in range(tables)]
    ).astype(np.intp)
    offsets = rng.integers(0, shape.cell, (tables, coords_per)).astype(np.uint64)
    top = np.iinfo(np.uint64).max
    multipliers = rng.integers(0, top, (tables, coords_per), dtype=np.uint64, endpoint=True)
    multipliers |= np.uint64(1)  # odd: every cell's value stays in the hash
    salts = rng.integers(0, top, tables, dtype=np.uint64, endpoint=True)
    for array in (coords, offsets, multipliers, salts):
        array.flags.writeable = False  # cached and shared
    return coords, offsets, multipliers, salts


def close_keys(
    means: npt.NDArray[np.uint8], secret: bytes, shape: CloseKeyShape = CloseKeyShape()
) -> U64:
    """(n, values) block means -> (n, shape.tables) nonzero keys for a store's bucket index:
    each the keyed hash of the grid cells (``shape.cell`` levels, secret offsets) of
    ``shape.coords`` secret-chosen means. Two close copies differ by at most ``CLOSE_RADIUS``
    per mean, so with the default shape a key survives with probability at least
    (1 - 9/64)^8 = 0.30: 19 of 64 on average at the worst case (every mean 9 apart), fewer
    than ``MIN_SHARED_KEYS`` (10) in 0.05-0.20% of such pairs; Square's first probe keeps a
    median of 44. Unrelated photos rarely share a key."""
    coords, offsets, multipliers, salts = _close_key_tables(secret, means.shape[1], shape)
    cells = (means[:, coords].astype(np.uint64) + offsets) // np.uint64(shape.cell)
    summed = salts + (cells * multipliers).sum(axis=2, dtype=np.uint64)
    keys: U64 = mix64(summed) | np.uint64(1)
    return keys


SAMPLED_VALUES = 256  # values of the 8-bit image a row keeps, at secret positions: 32 words
SAMPLE_WORDS = SAMPLED_VALUES // 8
SATURATED_SHARE = 0.5  # of the sampled values that must differ by the largest difference


@cache
def _sample_positions(secret: bytes, values: int) -> npt.NDArray[np.intp]:
    """``SAMPLED_VALUES`` distinct positions among an image's ``values`` (C, H, W order), from
    ``secret``, ascending (all of them, repeated to the count, for a smaller image)."""
    seed = int.from_bytes(hashlib.shake_256(b"advguard/samples/" + secret).digest(32), "little")
    rng = np.random.default_rng(seed)
    if values >= SAMPLED_VALUES:
        chosen = np.sort(rng.choice(values, SAMPLED_VALUES, replace=False))
    else:
        chosen = np.resize(np.arange(values), SAMPLED_VALUES)
    positions: npt.NDArray[np.intp] = chosen.astype(np.intp)
    positions.flags.writeable = False  # cached and shared
    return positions


def pixel_samples(images: npt.NDArray[np.uint8], secret: bytes) -> npt.NDArray[np.uint8]:
    """(n, C, H, W) uint8 -> (n, SAMPLED_VALUES) uint8: the values at the secret positions."""
    flat = images.reshape(len(images), -1)
    samples: npt.NDArray[np.uint8] = flat[:, _sample_positions(secret, flat.shape[1])]
    return samples


def saturated(
    query: npt.NDArray[np.uint8],
    stored: npt.NDArray[np.uint8],
    radius: int = CLOSE_RADIUS,
    share: float = SATURATED_SHARE,
) -> npt.NDArray[np.bool_]:
    """Which rows of ``stored`` (m, samples) differ from ``query`` (samples,) the way an L-inf
    attack does: the largest absolute difference m is between 2 and ``radius`` grey levels and
    at least ``share`` of the sampled values differ by exactly m (pure)."""
    difference = np.abs(stored.astype(np.int16) - query.astype(np.int16))
    largest = difference.max(axis=1, initial=0)
    at_largest = (difference == largest[:, None]).mean(axis=1)
    result: npt.NDArray[np.bool_] = (largest >= 2) & (largest <= radius) & (at_largest >= share)
    return result


CLOSE_PREFILTER = 16  # means compared first: a scan of many rows reads the rest of a few only


def close_copies(
    query: npt.NDArray[np.uint8], stored: npt.NDArray[np.uint8], radius: int = CLOSE_RADIUS
) -> npt.NDArray[np.bool_]:
    """Which rows of ``stored`` (m, values) have every block mean within ``radius`` of the
    query's (values,): the close-copy rule, pure."""
    head = np.abs(stored[:, :CLOSE_PREFILTER].astype(np.int16) - query[:CLOSE_PREFILTER])
    close: npt.NDArray[np.bool_] = head.max(axis=1, initial=0) <= radius
    rows = close.nonzero()[0]
    if len(rows):
        rest = np.abs(stored[rows, CLOSE_PREFILTER:].astype(np.int16) - query[CLOSE_PREFILTER:])
        close[rows] = rest.max(axis=1, initial=0) <= radius
    return close
