"""The in-process fingerprint store's bucket index: the entries filed under a query's buckets.

Each stored query is filed, by its entry number, under the buckets of its window hashes
(``index.index_buckets``); a lookup returns the live numbers filed under a query's buckets,
repeats included, so that the store keeps the entries filed under enough of them.
Entry numbers grow by one per stored query and the store's ring keeps the last ones: numbers
below ``lowest`` have left it.

Why a table: the store used to keep a dict from bucket to an array of numbers. A lookup was
then ~50 dict lookups, each a chain of dependent cache misses in a dict of 131,072 keys
(measured: ~430 ns each, warm; ~50 us a query, half the store's time). Here each bucket is a row
of ``width`` slots in one array, so a lookup is one gather of the query's rows, whose loads do
not wait on each other, and filing is one scatter into free slots (a slot is free when its
number left the ring: no trimming). A bucket with more live entries than slots (flat image
areas make a few popular buckets) keeps the rest in a spill list, trimmed when read, so the
index stays exact.
"""

from __future__ import annotations

import array
import bisect

import numpy as np
import numpy.typing as npt

Buckets = npt.NDArray[np.int64]  # one query's buckets: distinct values in [0, buckets)
Numbers = npt.NDArray[np.int64]


def table_width(entries: int, keys_per_entry: int, buckets: int) -> int:
    """Slots per bucket for ``entries`` live entries of ``keys_per_entry`` buckets each: a power
    of two at least 1.5 times the mean filings per bucket (at least 8), so that only the few
    popular buckets spill (the store's default, 50,000 entries in 2^19 buckets: 32 slots,
    128 MiB, with close copies, ~114 buckets an entry; 8 slots, 32 MiB, without, ~50)."""
    mean = entries * keys_per_entry / buckets
    return max(8, 1 << max(0, int(np.ceil(1.5 * mean)) - 1).bit_length())


class BucketIndex:
    """Entry numbers (>= 1) filed by bucket; the caller gives each call the lowest live number,
    which never decreases."""

    def __init__(self, buckets: int, width: int) -> None:
        if buckets < 1 or width < 1:
            raise ValueError("an index needs at least one bucket of one slot")
        self.width = width
        self._slots = np.zeros((buckets, width), dtype=np.int64)  # 0: never filed
        self._spilled = np.zeros(buckets, dtype=bool)  # the bucket has a spill list
        self._spill: dict[int, array.array[int]] = {}  # ascending: filed when the row was full
        self._spill_first = np.zeros(buckets, dtype=np.int64)  # each spill list's first number

    def filed(self, buckets: Buckets, lowest: int) -> Numbers:
        """The live numbers (>= ``lowest``) filed under ``buckets``, once per bucket each."""
        return self._filed(buckets, self._slots[buckets], lowest)

    def filed_then_file(
        self, buckets: Buckets, lowest: int, number: int, filed_lowest: int
    ) -> Numbers:
        """``filed(buckets, lowest)``, then ``file(buckets, number, filed_lowest)``: a store's
        lookup and filing of one query, with the buckets' rows gathered once for both (a
        gather of ~114 rows is ~40% of a lookup's time)."""
        rows = self._slots[buckets]
        found = self._filed(buckets, rows, lowest)
        self._file(buckets, rows, number, filed_lowest)
        return found

    def _filed(self, buckets: Buckets, rows: Numbers, lowest: int) -> Numbers:
        """``filed``, given the buckets' rows of the table."""
        found: Numbers = rows[rows >= lowest]
        spilled = buckets[self._spilled[buckets]]
        if len(spilled) == 0:
            return found
        # a query reads ~40 spill lists: only those holding numbers that left are trimmed one by
        # one, the rest are joined as they are (their buffers, without a copy each)
        stale = spilled[self._spill_first[spilled] < lowest]
        if len(stale):
            for bucket in stale.tolist():
                self._trim(bucket, lowest)
            spilled = spilled[self._spilled[spilled]]
        spill = self._spill
        joined = b"".join([found.data, *[spill[bucket] for bucket in spilled.tolist()]])
        return np.frombuffer(joined, dtype=np.int64)

    def _trim(self, bucket: int, lowest: int) -> None:
        """Drop a spill list's numbers below ``lowest``, and the list once it is empty."""
        numbers = self._spill[bucket]
        del numbers[: bisect.bisect_left(numbers, lowest)]
        if numbers:
            self._spill_first[bucket] = numbers[0]
        else:
            del self._spill[bucket]
            self._spilled[bucket] = False

    def file(self, buckets: Buckets, number: int, lowest: int) -> None:
        """File ``number`` (above every number filed so far) under each of ``buckets``: in a free
        slot of the bucket's row (one that holds a number below ``lowest``, or none), else at the
        end of its spill list."""
        self._file(buckets, self._slots[buckets], number, lowest)

    def _file(self, buckets: Buckets, rows: Numbers, number: int, lowest: int) -> None:
        """``file``, given the buckets' rows of the table as they are now."""
        free = rows < lowest
        column = free.argmax(axis=1)
        has_free = free.any(axis=1)
        self._slots[buckets[has_free], column[has_free]] = number
        for bucket in buckets[~has_free].tolist():
            numbers = self._spill.get(bucket)
            if numbers is None:
                numbers = self._spill[bucket] = array.array("q")
                self._spilled[bucket] = True
                self._spill_first[bucket] = number
            numbers.append(number)

    @property
    def spilled_buckets(self) -> int:
        return len(self._spill)
