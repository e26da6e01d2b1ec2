"""The store's index keys: the queries' buckets, and counting the candidates filed under enough
of a query's buckets."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from app.core.stateful.index import (
    BUCKET_SHIFT,
    bucket_count,
    index_buckets,
    index_buckets_many,
    repeated_at_least,
)


@pytest.mark.parametrize("size", [5, 40, 3_000])  # short and long ranges: both ways of counting
@pytest.mark.parametrize("times", [1, 3, 10])
def test_repeated_at_least_against_a_counter(size: int, times: int) -> None:
    rng = np.random.default_rng(size * 100 + times)
    low = 1_000
    for _ in range(20):
        numbers = rng.integers(low, low + rng.integers(1, 50_000), size, dtype=np.int64)
        counts = collections.Counter(numbers.tolist())
        high = int(numbers.max()) + int(rng.integers(0, 5))
        expected = sorted(value for value, n in counts.items() if n >= times)
        got = repeated_at_least(numbers, times, low, high)
        assert got.dtype == np.int64
        assert got.tolist() == expected
    short_range = np.array([7, 9, 7, 7, 9], dtype=np.int64)  # bincount: range 3 for 5 numbers
    assert repeated_at_least(short_range, 2, 7, 9).tolist() == [7, 9]
    long_range = np.array([7, 10**9, 7], dtype=np.int64)  # sort (32-bit offsets)
    assert repeated_at_least(long_range, 2, 7, 10**9).tolist() == [7]
    past_32_bits = np.array([2**40, 7, 2**40 + 5, 2**40], dtype=np.int64)  # sort (64-bit)
    assert repeated_at_least(past_32_bits, 2, 7, 2**40 + 5).tolist() == [2**40]
    assert repeated_at_least(np.zeros(0, dtype=np.int64), 1, 0, 10).tolist() == []
    with pytest.raises(ValueError):
        repeated_at_least(short_range, 0, 7, 9)


@pytest.mark.parametrize("top", [2**16 - 1, 2**16, 2**31 - 1, 2**31])  # each sort's edges
def test_repeated_at_least_at_the_sorts_widths(top: int) -> None:
    """Offsets sorted as 16-, 32- or 64-bit values by the range's width give the same values:
    the widest offset kept whole (a value at ``top`` counted, not wrapped onto a small one)."""
    low = 5
    rng = np.random.default_rng(top % 1_000)
    body = rng.integers(0, 50, 300, dtype=np.int64)  # many repeats near the low end
    numbers = np.concatenate([body, [top, top, top, 0]]) + low
    rng.shuffle(numbers)
    counts = collections.Counter(numbers.tolist())
    for times in (1, 3, 8):
        expected = sorted(value for value, n in counts.items() if n >= times)
        got = repeated_at_least(numbers, times, low, low + top)
        assert got.dtype == np.int64
        assert got.tolist() == expected


def test_a_batchs_buckets_against_sets() -> None:
    """``index_buckets_many`` gives each row's ``index_buckets``: the set of its nonzero hashes'
    buckets, ascending; rows with padding, one hash repeated, and padding only."""
    rng = np.random.default_rng(5)
    keys = rng.integers(1, 2**64, size=(12, 40), dtype=np.uint64)
    keys[rng.random(keys.shape) < 0.2] = 0
    keys[5, :] = np.uint64(0xFEDCBA9876543210)  # one hash, repeated
    keys[9, :] = 0
    mask = np.uint64(bucket_count() - 1)
    sets = [{int((k >> np.uint64(BUCKET_SHIFT)) & mask) for k in row if k} for row in keys]
    query_of, buckets = index_buckets_many(keys)
    for i, row in enumerate(keys):
        assert buckets[query_of == i].tolist() == sorted(sets[i])
        assert index_buckets(row).tolist() == sorted(sets[i])
    assert len(sets[5]) == 1 and not sets[9]
