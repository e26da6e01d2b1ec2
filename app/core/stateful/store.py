"""The fingerprint store: the protocol the in-process store and the Redis store
(``app.service.fingerprints``) share, and the bounded in-process store itself.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from app.core.stateful.bucket_index import BucketIndex, table_width
from app.core.stateful.hashes import U64
from app.core.stateful.index import (
    MIN_SHARED_KEYS,
    bucket_count,
    index_buckets,
    index_buckets_many,
    newest_candidates,
    repeated_at_least,
)
from app.core.stateful.match_rule import (
    NO_MATCH,
    Answer,
    MatchEvidence,
    ScopeMatch,
    evidence_of,
    near_duplicates,
    summarise_matches,
)
from app.core.stateful.schemes import Scheme


@dataclass(frozen=True)
class Stored:
    """Where a store put a query: what ``relabel`` needs to change the answer kept with it."""

    client_id: str
    entry: int  # the store's sequence number of the query (1, 2, ...)


@dataclass(frozen=True)
class StoreQuery:
    """One query for a store: who sent it, its fingerprint, index keys and pixel digest, when,
    and the answer it was given."""

    client_id: str
    fingerprint: npt.NDArray[np.generic]
    digest: bytes
    at: float
    answer: Answer | None = None
    keys: U64 | None = None


# Called once per query, in order, with what the query matched: the answer to keep with it
# instead of the one it was given (the silent policy's anchor), or None to keep that.
Decide = Callable[[StoreQuery, MatchEvidence], "Answer | None"]


class FingerprintStore(Protocol):
    """Recent queries' fingerprints: each new query is matched against its client's recent
    queries and against all clients', then stored with the answer it was given."""

    blocks: bool  # a call may wait on the network: the service screens on a thread of its own

    def check_and_store(
        self,
        client_id: str,
        fingerprint: npt.NDArray[np.generic],
        digest: bytes,
        at: float,
        answer: Answer | None = None,
        keys: U64 | None = None,
    ) -> tuple[MatchEvidence, Stored]: ...

    def check_and_store_many(self, queries: Sequence[StoreQuery], decide: Decide) -> None:
        """``check_and_store`` each query in order, ``decide`` on each before the next is
        matched, and keep the answer it returns (``relabel``): what a loop over the queries
        would do, which a store may do in fewer round trips."""
        ...

    def relabel(self, stored: Stored, answer: Answer) -> None: ...

    def __len__(self) -> int: ...


def check_and_store_each(
    store: FingerprintStore, queries: Sequence[StoreQuery], decide: Decide
) -> None:
    """``FingerprintStore.check_and_store_many`` one query at a time."""
    for query in queries:
        evidence, stored = store.check_and_store(
            query.client_id, query.fingerprint, query.digest, query.at, query.answer, query.keys
        )
        kept = decide(query, evidence)
        if kept is not None:
            store.relabel(stored, kept)


@dataclass
class _ClientBuffer:
    """A client's last queries, oldest first: sketches and times in arrays (one allocation,
    compared without stacking rows), grown as needed up to the per-client bound."""

    rows: npt.NDArray[np.generic]  # (capacity, width); the first ``size`` rows are used
    at: npt.NDArray[np.float64]  # (capacity,)
    digests: list[bytes]
    answers: list[Answer | None]
    entries: list[int]

    @property
    def size(self) -> int:
        return len(self.digests)

    def append(
        self,
        fingerprint: npt.NDArray[np.generic],
        digest: bytes,
        at: float,
        answer: Answer | None,
        entry: int,
        limit: int,
    ) -> None:
        size = self.size
        if size == limit:  # drop the oldest
            self.rows[:-1] = self.rows[1:]
            self.at[:-1] = self.at[1:]
            del self.digests[0], self.answers[0], self.entries[0]
            size -= 1
        elif size == len(self.rows):  # grow (doubling, up to the limit)
            capacity = min(limit, max(4, 2 * size))
            rows = np.zeros((capacity, *self.rows.shape[1:]), self.rows.dtype)
            rows[:size] = self.rows[:size]
            times = np.full(capacity, -np.inf)
            times[:size] = self.at[:size]
            self.rows, self.at = rows, times
        self.rows[size] = fingerprint
        self.at[size] = at
        self.digests.append(digest)
        self.answers.append(answer)
        self.entries.append(entry)


@dataclass(frozen=True)
class _ClientView:
    """A client's live queries as a store compares them: rows, digests, answers and times,
    oldest first."""

    rows: npt.NDArray[np.generic]
    digests: Sequence[bytes]
    answers: Sequence[Answer | None]
    at: npt.NDArray[np.float64]


NO_CLIENT_ROWS = _ClientView(np.zeros((0, 0), dtype=np.uint64), (), (), np.zeros(0))  # no rows


@dataclass(frozen=True)
class _EveryoneView:
    """The ring slots a query is compared with, and their rows."""

    slots: npt.NDArray[np.intp] | npt.NDArray[np.int64]
    rows: npt.NDArray[np.generic]


class InProcessFingerprintStore:
    """The in-process store (the no-Redis demo), bounded twice over:

    - everyone's queries: a ring of at most ``max_fingerprints``, the oldest overwritten first,
      entries older than ``ttl_s`` ignored and swept;
    - each client's: its last ``per_client`` queries for ``client_ttl_s``, for at most
      ``max_clients`` clients (least recently seen evicted first). It keeps a slow attacker's
      history after the shared ring has moved on.

    Given a query's index keys (``fingerprints_and_keys``), everyone's queries are looked up
    through the same buckets as the Redis store's (``index_buckets``, held in a
    ``BucketIndex``): the query is compared with the entries filed in at least
    ``MIN_SHARED_KEYS`` of its buckets. Without
    keys (the evaluation's replays), it is compared with every live entry by one vectorised scan
    (fingerprints are small fixed-width rows: 128 bytes for the window-hash sketch); both find
    the same matches while a query has at most ``MAX_CANDIDATES`` index candidates (past
    that, the lookup compares the newest, as the Redis store does; the scan all). Not
    thread-safe: one thread owns it in the service (the one that screens).
    """

    def __init__(
        self,
        scheme: Scheme,
        max_fingerprints: int = 50_000,
        ttl_s: float = 3600.0,
        per_client: int = 256,
        max_clients: int = 100_000,
        client_ttl_s: float = 86_400.0,
    ) -> None:
        if min(max_fingerprints, per_client, max_clients) < 1:
            raise ValueError("store bounds must be positive")
        self.blocks = False  # numpy on this process's memory, no I/O
        self.scheme = scheme
        self.max_fingerprints = max_fingerprints
        self.ttl_s = ttl_s
        self.per_client = per_client
        self.max_clients = max_clients
        self.client_ttl_s = client_ttl_s
        self._rows: npt.NDArray[np.generic] | None = None
        self._digests: list[bytes] = [b""] * max_fingerprints
        self._clients: list[str] = [""] * max_fingerprints
        self._answers: list[Answer | None] = [None] * max_fingerprints
        self._at = np.full(max_fingerprints, -np.inf)
        self._entry = np.zeros(max_fingerprints, dtype=np.int64)  # sequence number per slot
        self._next = 0  # ring position of the next entry
        self._size = 0  # live entries
        self._written = 0  # slots ever written (the ring's used prefix)
        self._count = 0  # queries ever added (the last one's sequence number)
        self._buffers: OrderedDict[str, _ClientBuffer] = OrderedDict()
        self._index: BucketIndex | None = None  # made by the first query given keys

    def __len__(self) -> int:
        return self._size

    @property
    def clients(self) -> int:
        return len(self._buffers)

    def check_and_store(
        self,
        client_id: str,
        fingerprint: npt.NDArray[np.generic],
        digest: bytes,
        at: float,
        answer: Answer | None = None,
        keys: U64 | None = None,
    ) -> tuple[MatchEvidence, Stored]:
        """Match the query against its client's and everyone's live queries, then store it with
        ``answer``. Given ``keys`` (the query's window hashes), everyone's queries are looked up
        through the bucket index (the query filed in its buckets as they are read); without,
        scanned."""
        lookup = None if keys is None else (self._index_for(len(keys)), index_buckets(keys))
        query = StoreQuery(client_id, fingerprint, digest, at, answer, keys)
        return self._check_and_store(query, lookup)

    def check_and_store_many(self, queries: Sequence[StoreQuery], decide: Decide) -> None:
        """``check_and_store_each``, with the queries' index buckets computed for the whole
        batch at once (``index_buckets_many``: ~75 us for 32 queries against ~16 us each one
        by one, measured 2026-12-05); they depend on the keys alone, so each query is still
        looked up, filed, matched and decided before the next."""
        keyed = [query.keys for query in queries if query.keys is not None]
        if len(queries) < 2 or len(keyed) < len(queries) or len({k.shape for k in keyed}) > 1:
            check_and_store_each(self, queries, decide)
            return
        index = self._index_for(len(keyed[0]))
        query_of, buckets = index_buckets_many(np.stack(keyed))
        bounds = np.searchsorted(query_of, np.arange(len(queries) + 1)).tolist()
        for i, query in enumerate(queries):
            lookup = (index, buckets[bounds[i] : bounds[i + 1]])
            evidence, stored = self._check_and_store(query, lookup)
            kept = decide(query, evidence)
            if kept is not None:
                self.relabel(stored, kept)

    def _check_and_store(
        self, query: StoreQuery, lookup: tuple[BucketIndex, npt.NDArray[np.int64]] | None
    ) -> tuple[MatchEvidence, Stored]:
        """``check_and_store`` given the index and the query's buckets in it (None: no keys, a
        scan). The client's rows and the index's candidates are compared in one call each of
        the scheme's similarity and close test (both are row by row): half the calls."""
        client_id, fingerprint, digest, at = (
            query.client_id,
            query.fingerprint,
            query.digest,
            query.at,
        )
        mine = self._client_view(client_id, at)
        candidates = None
        if lookup is not None:  # looked up, and filed under the next entry number
            candidates = self._candidates(*lookup)
        everyone = self._everyone_view(candidates)
        split = len(mine.rows)
        if everyone is None:
            mine_compared = self._compared(fingerprint, mine.rows)
        elif candidates is not None:  # a few rows: both scopes' in one call
            rows = np.concatenate([mine.rows, everyone.rows]) if split else everyone.rows
            both = self._compared(fingerprint, rows)
            mine_compared = (both[0][:split], both[1][:split])
            everyone_compared = (both[0][split:], both[1][split:])
        else:  # a scan compares everyone's rows in place: no copy of them
            mine_compared = self._compared(fingerprint, mine.rows)
            everyone_compared = self._compared(fingerprint, everyone.rows)
        client = self._match_client(mine, client_id, digest, *mine_compared)
        matched = (
            NO_MATCH
            if everyone is None
            else self._match_everyone(everyone, client_id, digest, at, *everyone_compared)
        )
        self._count += 1
        self._add_client(client_id, fingerprint, digest, at, query.answer)
        self._add_everyone(client_id, fingerprint, digest, at, query.answer)
        return evidence_of(client, matched), Stored(client_id, self._count)

    def _lowest(self) -> int:
        """The lowest entry number still in the ring (those below were overwritten)."""
        return max(self._count - self.max_fingerprints + 1, 1)

    def _index_for(self, keys: int) -> BucketIndex:
        """The bucket index, made by the first query given keys, for ``keys`` a query."""
        if self._index is None:
            buckets_in_table = bucket_count()
            width = table_width(self.max_fingerprints, keys, buckets_in_table)
            self._index = BucketIndex(buckets_in_table, width)
        return self._index

    def _candidates(
        self, index: BucketIndex, buckets: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.int64]:
        """Ring slots of the entries filed in at least ``MIN_SHARED_KEYS`` of ``buckets`` (a
        query's), the newest ``MAX_CANDIDATES`` as the Redis store's lookup keeps; the query is
        filed under them as the next entry (``_count + 1``), whose slot it is about to take."""
        lowest = self._lowest()
        filed_lowest = max(self._count + 1 - self.max_fingerprints + 1, 1)  # once it is in
        numbers = index.filed_then_file(buckets, lowest, self._count + 1, filed_lowest)
        found = newest_candidates(repeated_at_least(numbers, MIN_SHARED_KEYS, lowest, self._count))
        slots = (found - 1) % self.max_fingerprints
        kept: npt.NDArray[np.int64] = slots[self._entry[slots] == found]
        return kept

    def relabel(self, stored: Stored, answer: Answer) -> None:
        """Keep ``answer`` with a stored query instead (the answer it was actually served)."""
        slots = np.flatnonzero(self._entry[: self._written] == stored.entry)
        for slot in slots.tolist():
            self._answers[slot] = answer
        buffer = self._buffers.get(stored.client_id)
        if buffer is not None and stored.entry in buffer.entries:
            buffer.answers[buffer.entries.index(stored.entry)] = answer

    # -- each client's recent queries

    def _compared(
        self, fingerprint: npt.NDArray[np.generic], rows: npt.NDArray[np.generic]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
        """The scheme's similarity and close test of the query against ``rows`` (none: empty)."""
        if not len(rows):
            return np.zeros(0), np.zeros(0, dtype=bool)
        return self.scheme.similarity(fingerprint, rows), self.scheme.close(fingerprint, rows)

    def _client_view(self, client_id: str, at: float) -> _ClientView:
        """The client's live queries, oldest first (none: no rows)."""
        buffer = self._buffers.get(client_id)
        if buffer is None or buffer.size == 0:
            return NO_CLIENT_ROWS
        size = buffer.size
        # times only grow within a client's buffer in practice, but test each one: exact
        fresh = (buffer.at[:size] >= at - self.client_ttl_s).nonzero()[0]
        if len(fresh) == size:
            return _ClientView(buffer.rows[:size], buffer.digests, buffer.answers, buffer.at[:size])
        return _ClientView(
            buffer.rows[fresh],
            [buffer.digests[i] for i in fresh.tolist()],
            [buffer.answers[i] for i in fresh.tolist()],
            buffer.at[fresh],
        )

    def _match_client(
        self,
        view: _ClientView,
        client_id: str,
        digest: bytes,
        similarities: npt.NDArray[np.float64],
        close: npt.NDArray[np.bool_],
    ) -> ScopeMatch:
        """The client scope's summary, from the query's similarities to the view's rows and
        which of them are close copies."""
        if not len(view.rows):
            return NO_MATCH
        if not (near_duplicates(similarities, self.scheme.threshold) | close).any():
            return NO_MATCH  # what summarise_matches gives no matches, without its work
        return summarise_matches(
            similarities,
            view.digests,
            [client_id] * len(view.rows),
            view.answers,
            digest,
            client_id,
            self.scheme.threshold,
            view.at,
            close,
        )

    def _add_client(
        self,
        client_id: str,
        fingerprint: npt.NDArray[np.generic],
        digest: bytes,
        at: float,
        answer: Answer | None,
    ) -> None:
        buffer = self._buffers.pop(client_id, None)
        if buffer is None:
            empty = np.zeros((0, *fingerprint.shape), fingerprint.dtype)
            buffer = _ClientBuffer(empty, np.zeros(0), [], [], [])
        buffer.append(fingerprint, digest, at, answer, self._count, self.per_client)
        self._buffers[client_id] = buffer  # most recently seen last
        while len(self._buffers) > self.max_clients:
            self._buffers.popitem(last=False)
        # sweep one expired client per update: expiry outpaces the one client an update adds
        oldest_id, oldest = next(iter(self._buffers.items()))
        if oldest.at[oldest.size - 1] < at - self.client_ttl_s:
            del self._buffers[oldest_id]

    # -- everyone's recent queries

    def _everyone_view(self, indexed: npt.NDArray[np.int64] | None) -> _EveryoneView | None:
        """The ring slots to compare with and their rows: ``indexed``, the index's candidates
        (their rows gathered), or None, every slot ever written (its rows in place, no copy).
        None when the ring is empty."""
        if self._rows is None or self._size == 0:
            return None
        if indexed is None:
            return _EveryoneView(np.arange(self._written), self._rows[: self._written])
        return _EveryoneView(indexed, self._rows[indexed])

    def _match_everyone(
        self,
        view: _EveryoneView,
        client_id: str,
        digest: bytes,
        at: float,
        similarities: npt.NDArray[np.float64],
        close: npt.NDArray[np.bool_],
    ) -> ScopeMatch:
        """Everyone's scope summary, from the query's similarities to the view's rows and which
        of them are close copies."""
        candidates = view.slots
        # the live matches, oldest first (slot order is not arrival order once the ring wraps)
        live = self._at[candidates] >= at - self.ttl_s
        near = near_duplicates(similarities, self.scheme.threshold)
        found = (live & (near | close)).nonzero()[0]
        if len(found) == 0:  # what summarise_matches gives no matches, without its work
            return NO_MATCH
        found = found[self._entry[candidates[found]].argsort(kind="stable")]
        slots = candidates[found].tolist()
        return summarise_matches(
            similarities[found],
            [self._digests[s] for s in slots],
            [self._clients[s] for s in slots],
            [self._answers[s] for s in slots],
            digest,
            client_id,
            self.scheme.threshold,
            self._at[slots],
            close[found],
        )

    def _add_everyone(
        self,
        client_id: str,
        fingerprint: npt.NDArray[np.generic],
        digest: bytes,
        at: float,
        answer: Answer | None,
    ) -> None:
        if self._rows is None:
            self._rows = np.zeros((self.max_fingerprints, *fingerprint.shape), fingerprint.dtype)
        slot = self._next
        if self._at[slot] == -np.inf:
            self._size += 1
        self._rows[slot] = fingerprint
        self._digests[slot] = digest
        self._clients[slot] = client_id
        self._answers[slot] = answer
        self._at[slot] = at
        self._entry[slot] = self._count
        self._written = max(self._written, slot + 1)
        self._next = (slot + 1) % self.max_fingerprints
        self._sweep(at)

    def _sweep(self, at: float) -> None:
        """Drop up to a few expired entries, oldest first (the slots right after the newest)."""
        for _ in range(4):
            oldest = (
                self._next
                if self._size == self.max_fingerprints
                else (self._next - self._size) % self.max_fingerprints
            )
            if self._size == 0 or self._at[oldest] >= at - self.ttl_s:
                return
            self._at[oldest] = -np.inf
            self._digests[oldest] = b""
            self._clients[oldest] = ""
            self._answers[oldest] = None
            self._entry[oldest] = 0
            self._size -= 1
