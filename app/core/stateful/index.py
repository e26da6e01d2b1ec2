"""The store's index keys: the buckets a query is filed under and looked up in, and the count of
candidates that share enough of them with the query to be compared with it.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from app.core.stateful.hashes import U64, distinct_of_sorted

# A store's index files each query under buckets of its window hashes. Two queries whose
# sketches share the match threshold's 25 bits share about that many window hashes (chance bit
# collisions add ~2.4 of ~50), so they share at least MIN_SHARED_KEYS buckets with near
# certainty (missing one needs 16 chance collisions: ~5e-9), while unrelated photos share
# almost none: a lookup compares the query with the few entries filed in at least that many of
# its buckets instead of scanning every entry. Measured on the recorded Square, HopSkipJump and
# Boundary runs (40 images each, first 60 queries): all 227,606 matching pairs shared 20
# buckets or more. At 3, photos with large uniform areas (shared windows) made ~16 candidates
# per query at 4,000 stored; at 10, 0.03.
# 524,288 buckets: ~4 entries each with 20,000 queries of ~114 keys (window hashes and close-copy
# keys) stored. At 2^17, ~17: the Redis script that reads a query's buckets took 677 us a query
# on a full store of 20,000, 434 at 2^19 (502 at 2^18, 438 at 2^20), for 2,273 -> 3,248 bytes
# of Redis a stored query; in process the table keeps its memory (fewer slots a bucket) and
# its time (ad hoc, 2026-12-01; docs/service.md)
BUCKET_BITS = 19
BUCKET_SHIFT = 20  # the top hashes' high bits are all ones (they are the largest): skip them
MIN_SHARED_KEYS = 10


def bucket_bits() -> int:
    """``BUCKET_BITS``, read when a store is made: setting it here (as the tests and side-by-side
    measurements do) sets every store's, in process and in Redis (its key layout)."""
    return BUCKET_BITS


def bucket_count() -> int:
    """The number of buckets, 2^``bucket_bits()``."""
    return 1 << bucket_bits()


def index_buckets(keys: U64) -> npt.NDArray[np.int64]:
    """The index buckets of a query's window hashes (0: padding, none), distinct, ascending."""
    return index_buckets_many(keys[None])[1]


def index_buckets_many(keys: U64) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64]]:
    """(n, k) queries' window hashes (0: padding) -> (query of each, bucket): every query's
    ``index_buckets``, the queries in order, in a few calls for a whole batch."""
    mask = np.uint64(bucket_count() - 1)
    buckets = ((keys >> np.uint64(BUCKET_SHIFT)) & mask).astype(np.int64)
    buckets[keys == 0] = -1  # padding: sorted first, then dropped
    buckets.sort(axis=1)
    keep = buckets >= 0
    keep[:, 1:] &= buckets[:, 1:] != buckets[:, :-1]
    query_of: npt.NDArray[np.intp] = keep.nonzero()[0]
    distinct: npt.NDArray[np.int64] = buckets[keep]
    return query_of, distinct


# candidates a lookup compares at most, the newest, in both stores (the Redis store's fetch, the
# in-process store's comparison, so that the two decide alike): a bound on one lookup's fetch
# and its cost, above what an attack produces before it is flagged (the rule needs 5 distinct
# near-duplicates; chance sharers are a few). A photo resent thousands of times fills it with
# its copies: the newest are kept, so an attack's recent probes still reach the rule. It was
# 2,000, the oldest kept: 2,000 resends hid every later near-copy from everyone's scope, and
# each lookup of that photo fetched 2,000 records from Redis (~360 KB; a batch of 64 took 1.5 s,
# past the 0.2 s timeout, so the detector failed open). Until 2026-12-05 the in-process store
# had no bound: after an attack's 256th stored near-duplicate the two could see different
# earliest matches (the anchor whose answer ``consistent`` serves; found by policy_check's
# comparison of a HopSkipJump run over HTTP with Redis and in process).
MAX_CANDIDATES = 256


def newest_candidates(found: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The newest ``MAX_CANDIDATES`` of a lookup's candidate entry numbers (ascending); the
    bound is read at each call, so a test may set it on this module."""
    newest: npt.NDArray[np.int64] = found[-MAX_CANDIDATES:]
    return newest


BINCOUNT_RANGE_PER_NUMBER = 2  # count over the range up to this many values per number


def repeated_at_least(
    numbers: npt.NDArray[np.int64], times: int, low: int, high: int
) -> npt.NDArray[np.int64]:
    """The distinct values of ``numbers`` (each in ``[low, high]``) that occur at least
    ``times`` times, ascending. Found by one sort of the numbers' offsets from ``low``, where an
    entry filed ``times`` times is a run whose first number equals the one ``times - 1`` places
    on; counted in one ``bincount`` over the range only when it is dense (up to two values a
    number). The offsets are sorted in the narrowest type the range allows: 16 bits, which
    numpy sorts by radix (``kind="stable"``) in linear time, for ranges up to 65,536 (the
    service's default ring of 50,000 is one); else 32 bits; else 64.
    Measured (ad hoc, 2026-12-07, numpy 2.4, an AMD EPYC without AVX-512; random numbers in a
    range of 50,000): 2,500 / 6,500 / 12,000 numbers sorted in 7 / 16 / 34 us as 16-bit radix,
    25 / 84 / 178 us as 32-bit quicksort, counted in 22 / 22 / 35 us. On a full default ring a
    lookup of the in-process index finds ~6,500 numbers (p90 12,000), and the 32-bit sort was a
    quarter of the in-process screening's time. Earlier (2026-12-05, a Xeon with AVX-512, whose
    32-bit sort is faster): 2,500 numbers sorted in 12-15 us, counted in 24-44 us."""
    if times < 1:
        raise ValueError("times must be positive")
    if len(numbers) < times:
        return np.zeros(0, dtype=np.int64)
    if (high - low + 1) <= BINCOUNT_RANGE_PER_NUMBER * len(numbers):
        counts = np.bincount(numbers - low, minlength=high - low + 1)
        counted: npt.NDArray[np.int64] = (counts >= times).nonzero()[0].astype(np.int64) + low
        return counted
    ordered = _sorted_offsets(numbers - low, high - low)
    gap = times - 1
    runs = ordered[gap:][ordered[gap:] == ordered[: len(ordered) - gap]]
    # the runs are in sorted order already: no second sort
    repeated: npt.NDArray[np.int64] = distinct_of_sorted(runs).astype(np.int64) + low
    return repeated


def _sorted_offsets(offsets: npt.NDArray[np.int64], top: int) -> npt.NDArray[np.integer]:
    """``offsets`` (each in ``[0, top]``) sorted, in the narrowest type that holds ``top``:
    16-bit by radix sort, else 32- or 64-bit by numpy's default sort."""
    if top < 2**16:
        return np.sort(offsets.astype(np.uint16), kind="stable")
    if top < 2**31:
        return np.sort(offsets.astype(np.int32))
    return np.sort(offsets)
