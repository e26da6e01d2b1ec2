"""The bucket index against a plain dict of lists: the same live numbers for every lookup, rows
full or not, as the ring moves on."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from app.core.stateful.bucket_index import BucketIndex, table_width


@pytest.mark.parametrize("together", [False, True])
@pytest.mark.parametrize("width", [1, 3, 8])
def test_lookups_are_the_reference_index_as_the_ring_moves_on(width: int, together: bool) -> None:
    """Skewed buckets (a few popular ones, as flat image areas make) fill rows and spill; a ring
    of 40 entries moves on. Every lookup gives the live numbers filed, once per bucket, whether
    each query is filed after its lookup or by it (``filed_then_file``, the store's call); a
    number spills only when every slot of its bucket's row holds a live one."""
    rng = np.random.default_rng(3)
    buckets, ring = 64, 40
    index = BucketIndex(buckets, width)
    reference: defaultdict[int, list[int]] = defaultdict(list)
    weights = 1.0 / np.arange(1, buckets + 1)
    for number in range(1, 400):
        lowest = max(number - ring, 1)  # before filing ``number``: the ring holds the last 40
        query = np.sort(
            rng.choice(
                buckets, size=int(rng.integers(1, 12)), replace=False, p=weights / weights.sum()
            )
        ).astype(np.int64)
        want = sorted(n for b in query.tolist() for n in reference[b] if n >= lowest)
        filed_lowest = max(number - ring + 1, 1)  # once ``number`` is in, the oldest left
        if together:
            assert sorted(index.filed_then_file(query, lowest, number, filed_lowest)) == want
        else:
            assert sorted(index.filed(query, lowest).tolist()) == want
            index.file(query, number, filed_lowest)
        for b in query.tolist():
            reference[b].append(number)
            if number in index._spill.get(b, ()):  # spilled only from a row of live numbers
                assert index._slots[b].min() >= filed_lowest
    if width < 8:
        assert index.spilled_buckets > 0  # the spill lists were exercised
    # every spill list is trimmed when read: a lookup of all buckets leaves only live numbers
    lowest = 400 - ring
    everything = index.filed(np.arange(buckets, dtype=np.int64), lowest)
    assert everything.min() >= lowest
    assert all(numbers[0] >= lowest for numbers in index._spill.values())


def test_free_slots_are_reused_and_empty_spills_dropped() -> None:
    index = BucketIndex(4, 2)
    one = np.array([1], dtype=np.int64)
    for number in (1, 2, 3):  # a row of 2: the third spills
        index.file(one, number, 1)
    assert index.spilled_buckets == 1
    assert sorted(index.filed(one, 1).tolist()) == [1, 2, 3]
    assert index.filed(one, 4).size == 0  # all three left the ring
    assert index.spilled_buckets == 0  # the empty spill list is gone
    index.file(one, 4, 4)  # a slot of a number that left is free again: no spill
    assert index.spilled_buckets == 0
    assert index.filed(one, 4).tolist() == [4]
    assert index.filed(np.array([0, 2, 3], dtype=np.int64), 1).size == 0


def test_table_width() -> None:
    assert table_width(50_000, 50, 1 << 17) == 32  # the store's default cap
    assert table_width(20_000, 50, 1 << 17) == 16
    assert table_width(60, 50, 1 << 17) == 8
    with pytest.raises(ValueError):
        BucketIndex(0, 8)
