"""The Redis fingerprint store of the stateful detector: the in-process store's twin, shared by
replicas, with an index so that a lookup reads only candidates.

It keeps what ``app.core.stateful.store.InProcessFingerprintStore`` keeps, with the same notion
of a live entry and the same bounds on everyone's queries and each client's (but no cap on the
number of clients, which Redis's TTLs and maxmemory bound; both look up at most
``index.MAX_CANDIDATES`` candidates, the newest), and decides matches with the same pure
function (``summarise_matches``): Redis only finds candidates and stores records.

Key layout (``<p>`` = the prefix, ``<r>`` = ``r``, the record's size in bytes, ``b`` and the
index's bucket bits, and ``f4``, bucket fields named by 4 bytes: ``r629b19f4``; a script touches
the keys of one hash tag only, so every call stays in one slot of a Redis Cluster):

- everyone's queries, under the tag ``{<p>:fp}`` (one slot, so one node of a cluster):
  ``<p>:fp:{<p>:fp}:<r>:meta`` hash {seq: last entry number, lo: lowest entry not deleted};
  ``<p>:fp:{<p>:fp}:<r>:entries`` hash entry number -> record (fixed part + sender's id);
  ``<p>:fp:{<p>:fp}:<r>:buckets`` hash bucket (its number, 4 bytes big-endian) -> the entry
  numbers filed there, 4 bytes each, ascending. No TTL: they are bounded by
  ``max_fingerprints`` (a volatile-lru Redis never evicts them, and a lost ``meta`` cannot
  renumber live entries);
- each client's queries: ``<p>:fp:<r>:client:{<id>}`` string, its last ``per_client``
  fixed-size records, TTL ``client_ttl_s`` refreshed on every query (evictable like the
  statistics).

``<r>`` keeps stores of another record layout apart (another version, or close copies on and
off: 629 and 181 bytes): a replica never reads records of another size, which it would refuse
as unreadable and answer every matching query unscreened (fail open) until they aged out; nor
an index of another bucket count, whose entries it would look for in the wrong buckets.

The index (``app.core.stateful.index.index_buckets``, the in-process store's too): each window
hash of a query, and each close-copy key (``close_keys``) when the scheme has close copies,
files the query's entry number in bucket ``(key >> 20) mod 2^BUCKET_BITS`` (2^19). The script
returns the entry numbers filed in the query's buckets; the service counts, per entry, the
query's buckets it is filed in (numpy: ``repeated_at_least``, the in-process store's count) and
fetches the entries with at least ``MIN_SHARED_KEYS`` in a second pipelined round trip. Counting
in Lua was half the script's time once close copies tripled the numbers a lookup reads (a table
insert per number: 0.74 of its 1.43 ms a query on a full store of 20,000, measured ad hoc with
``INFO commandstats``; docs/service.md); reading the lists was most of the rest, hence 2^19
buckets, not 2^17 (shorter lists). Two queries whose sketches share the match threshold's 25
bits share about that many window hashes (chance bit collisions add ~2.4), so a match always
reaches that count, and a close copy keeps a median of 19 of its 64 keys even at the worst case;
the match rules then run on the fetched records.
A bucket drops the numbers below ``lo`` (deleted entries) whenever a query touches it, and the
sweep deletes a few of the oldest entries per query (over the cap or past the TTL), so memory
follows the live entries. The sweep lags the live bounds by ``SWEEP_LAG`` entries and
``SWEEP_LAG_S`` seconds: a candidate live for a query is still stored a round trip later, when
its record is fetched, whatever ran in between (the rest of the batch, other replicas).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import redis

from app.core.stateful.index import (
    MIN_SHARED_KEYS,
    bucket_bits,
    index_buckets,
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
from app.core.stateful.schemes import WindowHashScheme
from app.core.stateful.store import Decide, Stored, StoreQuery, check_and_store_each
from app.service.redis_connection import RedisClient, checked_prefix, connect, hash_tag

SWEEP_BATCH = 8  # entries deleted per query at most: more than the one a query adds
# how far the sweep lags the live bounds (entries past the cap, seconds past the TTL): more
# than a batch of 64 queries from each of a few replicas between a query's script and the fetch
# of its candidates' records; it keeps ~0.5% more entries at the default cap of 50,000
SWEEP_LAG = 256
SWEEP_LAG_S = 60.0
# answers this store decided for queries it looked up before they were classified
# (``look_up_many``), kept to fill in their records wherever a later query fetched them still
# pending: more than the queries in flight in one process (a few batches of at most 64)
ANSWERS_REMEMBERED = 4096


def _records(raw: bytes, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """Stored records read back; bytes that are no whole records (another layout, or foreign
    data under the prefix) are the store failing, a Redis error: the query is answered as
    usual (fail open), not with a 500."""
    try:
        return np.frombuffer(raw, dtype)
    except ValueError as exc:
        raise redis.exceptions.DataError(f"unreadable fingerprint records: {exc}") from exc


def _filed_numbers(raw: bytes) -> npt.NDArray[np.int64]:
    """The entry numbers a script read from a query's buckets (4 bytes each, big-endian), or the
    store failing as in ``_records``."""
    try:
        return np.frombuffer(raw, ">u4").astype(np.int64)
    except ValueError as exc:
        raise redis.exceptions.DataError(f"unreadable bucket lists: {exc}") from exc


def _text(raw: bytes) -> str:
    """A stored client id (UTF-8), or the store failing as in ``_records``."""
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise redis.exceptions.DataError(f"unreadable client id in a record: {exc}") from exc


DECISIONS: tuple[str, ...] = ("", "accepted", "rejected", "unguarded")  # byte code -> decision


def record_dtype(words: int) -> np.dtype[Any]:
    """The fixed-size record of one stored query: ``at`` first (the Lua sweep reads it at byte
    1), the sketch, the pixel digest, the answer served, and its entry number."""
    return np.dtype(
        [
            ("at", "<f8"),
            ("sketch", "<u8", (words,)),
            ("digest", "V16"),
            ("decision", "u1"),
            ("class_index", "<i4"),
            ("probability", "<f8"),
            ("score", "<f8"),
            ("entry", "<u8"),
        ]
    )


# KEYS: meta, entries, buckets. ARGV: sweep time, ttl, cap, record, buckets (the bucket numbers
# packed 4 bytes each, big-endian: one argument, not ~128 to encode and parse; each 4 bytes are
# also the bucket's field name, so the script only cuts them apart: turning them into decimal
# names took ~115 us of Redis's ~600 a query, measured ad hoc). Sweeps (lagging
# the live bounds, as of the sweep time), reads the query's buckets, then adds the query. Returns
# {seq before the add, the new entry's number, the entry numbers filed in the query's buckets:
# one string a bucket, 4 bytes a number, big-endian}: the service joins and counts them
# (``_filed_of``) and fetches the candidates. The lists are returned as they are, not joined in
# Lua: ``table.concat`` of a query's ~25 KB of lists was ~60 us of the script's time; on a full
# default ring the script took 0.63-0.65 ms of Redis a query joined, 0.50-0.52 unjoined
# (``bench.stateful_cost``'s store figure, two runs each, 2026-12-08; docs/service.md);
# redis-py's parser and ``bytes.join`` take a few us.
_GLOBAL_BODY = """
local sweep_at = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local meta = redis.call('HMGET', KEYS[1], 'seq', 'lo')
local seq = tonumber(meta[1]) or 0
local lo = tonumber(meta[2]) or 1
local swept = 0
while lo <= seq and swept < SWEEP_BATCH do
  local gone = lo <= seq - cap - SWEEP_LAG_ENTRIES
  if not gone then
    local rec = redis.call('HGET', KEYS[2], lo)
    gone = (not rec) or struct.unpack('<d', rec) < sweep_at - ttl - SWEEP_LAG_SECONDS
  end
  if not gone then break end
  redis.call('HDEL', KEYS[2], lo)
  lo = lo + 1
  swept = swept + 1
end
local fields = {}
local packed = ARGV[BUCKET_ARG]
for k = 1, #packed / 4 do fields[k] = string.sub(packed, 4 * k - 3, 4 * k) end
local lists = {}
if #fields > 0 then lists = redis.call('HMGET', KEYS[3], unpack(fields)) end
local kept = {}
for k = 1, #fields do
  local ids = lists[k] or ''
  if #ids % 4 ~= 0 then ids = '' end  -- no list of ours (foreign data): dropped, rewritten
  if #ids > 0 and struct.unpack('>I4', ids) < lo then  -- numbers of deleted entries: dropped
    local n = #ids / 4
    local first = 2
    while first <= n and struct.unpack('>I4', ids, 4 * first - 3) < lo do first = first + 1 end
    ids = string.sub(ids, 4 * first - 3)
  end
  kept[k] = ids
end
local id = seq + 1
local out = {seq, id, kept}
redis.call('HSET', KEYS[1], 'seq', id, 'lo', lo)
redis.call('HSET', KEYS[2], id, ARGV[4])
if #fields > 0 then
  local writes = {}
  local filed = struct.pack('>I4', id)
  for k = 1, #fields do
    writes[2 * k - 1] = fields[k]
    writes[2 * k] = kept[k] .. filed
  end
  redis.call('HSET', KEYS[3], unpack(writes))
end
CLIENT_PART
return out
"""
for _name, _value in (
    ("SWEEP_BATCH", SWEEP_BATCH),
    ("SWEEP_LAG_ENTRIES", SWEEP_LAG),
    ("SWEEP_LAG_SECONDS", SWEEP_LAG_S),
):
    _GLOBAL_BODY = _GLOBAL_BODY.replace(_name, repr(_value))
_GLOBAL_LUA = _GLOBAL_BODY.replace("BUCKET_ARG", "5").replace("CLIENT_PART", "")


def _client_read(key: str, size: str, keep: str) -> str:
    """Lua: the client's string ``key`` read as ``old`` (its last ``keep`` records of ``size``
    bytes) and ``kept`` (the last ``keep - 1``: what stays beside the new record)."""
    return f"""
local size = tonumber({size})
local keep = tonumber({keep})
local old = redis.call('GET', {key}) or ''
if #old > keep * size then old = string.sub(old, #old - keep * size + 1) end
local kept = old
if #kept > (keep - 1) * size then kept = string.sub(kept, #kept - (keep - 1) * size + 1) end
"""


# One Redis (not a cluster): everyone's part and the client's in one script, one round trip.
# KEYS: meta, entries, buckets, the client's string. ARGV: sweep time, ttl, cap, record, the
# client's record, per client, client ttl, record size, entry offset, buckets. The client's
# record gets the new entry's number. Returns the global script's reply with the client's
# previous records inserted third.
_BOTH_LUA = _GLOBAL_BODY.replace("BUCKET_ARG", "10").replace(
    "CLIENT_PART",
    _client_read("KEYS[4]", "ARGV[8]", "ARGV[6]")
    + """
local off = tonumber(ARGV[9])
local own = string.sub(ARGV[5], 1, off) .. struct.pack('<I4', id) ..
            string.rep(string.char(0), 4) .. string.sub(ARGV[5], off + 9)
redis.call('SET', KEYS[4], kept .. own, 'EX', ARGV[7])
table.insert(out, 3, old)
""",
)

# KEYS: the client's string. ARGV: record, per client, client ttl, record size. Returns the
# client's last `per client` records before this one, then keeps the last `per client` with it.
_CLIENT_LUA = (
    _client_read("KEYS[1]", "ARGV[4]", "ARGV[2]")
    + """
redis.call('SET', KEYS[1], kept .. ARGV[1], 'EX', ARGV[3])
return old
"""
)

# Lua functions that rewrite a stored query's answer: in everyone's entries (the record under
# its entry number) and in its client's string (the record with that entry number; TTL kept).
# Each returns 1 if it found the record.
_RELABEL_FUNCTIONS = """
local function relabel_entry(entries, entry, off, answer)
  local rec = redis.call('HGET', entries, entry)
  if not rec then return 0 end
  redis.call('HSET', entries, entry,
             string.sub(rec, 1, off) .. answer .. string.sub(rec, off + #answer + 1))
  return 1
end
local function relabel_own(key, entry_bytes, entry_off, off, answer, size)
  local s = redis.call('GET', key)
  if not s then return 0 end
  for start = #s - size, 0, -size do
    if string.sub(s, start + entry_off + 1, start + entry_off + 8) == entry_bytes then
      redis.call('SETRANGE', key, start + off, answer)
      return 1
    end
  end
  return 0
end
"""

# KEYS: entries. ARGV: entry number, answer offset, answer bytes.
_RELABEL_GLOBAL_LUA = (
    _RELABEL_FUNCTIONS + "return relabel_entry(KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3])\n"
)

# KEYS: the client's string. ARGV: entry bytes, entry offset, answer offset, answer bytes, record
# size.
_RELABEL_CLIENT_LUA = (
    _RELABEL_FUNCTIONS
    + "return relabel_own(KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], "
    "tonumber(ARGV[5]))\n"
)

# One Redis (not a cluster): many answers in one call. KEYS: entries, then each query's
# client's string. ARGV: entry offset, answer offset, record size, then each query's entry
# number, entry bytes and answer bytes.
_RELABEL_MANY_LUA = (
    _RELABEL_FUNCTIONS
    + """
local entry_off, off, size = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for k = 2, #KEYS do
  local at = 3 * k - 2
  relabel_entry(KEYS[1], ARGV[at], off, ARGV[at + 2])
  relabel_own(KEYS[k], ARGV[at + 1], entry_off, off, ARGV[at + 2], size)
end
return #KEYS - 1
"""
)

_SCRIPTS = {
    "both": _BOTH_LUA,
    "global": _GLOBAL_LUA,
    "client": _CLIENT_LUA,
    "relabel_global": _RELABEL_GLOBAL_LUA,
    "relabel_client": _RELABEL_CLIENT_LUA,
    "relabel_many": _RELABEL_MANY_LUA,
}


def put_answer(record: Any, answer: Answer) -> None:
    """Write ``answer`` into one record: a row of any record dtype with the answer's fields
    (``decision`` as its ``DECISIONS`` code, ``class_index``, ``probability``, ``score``), the
    store's and the blend memory's."""
    record["decision"] = DECISIONS.index(answer.decision)
    record["class_index"] = answer.class_index
    record["probability"] = answer.probability
    record["score"] = answer.score


def answers_of(records: npt.NDArray[Any]) -> list[Answer | None]:
    """The answers written by ``put_answer`` into each record (None: decision code 0, none)."""
    return [
        None if decision == 0 else Answer(DECISIONS[decision], class_index, probability, score)
        for decision, class_index, probability, score in zip(
            records["decision"].tolist(),
            records["class_index"].tolist(),
            records["probability"].tolist(),
            records["score"].tolist(),
            strict=True,
        )
    ]


def _entry_bytes(entry: int) -> bytes:
    """An entry number as stored in a record (``<u8``)."""
    return entry.to_bytes(8, "little")


def _buckets(query: StoreQuery) -> bytes:
    """The index buckets a query is filed under, packed as the scripts' last argument (each
    4 bytes are a bucket's field name)."""
    if query.keys is None:
        raise ValueError("the Redis store needs the query's index keys (its window hashes)")
    return np.asarray(index_buckets(query.keys), dtype=">u4").tobytes()


@dataclass(frozen=True)
class Lookup:
    """What a query's scripts returned: the last entry number before it (``seq``), its own
    (``entry``), the entry numbers filed in its buckets, and its client's previous records."""

    seq: int
    entry: int
    filed: bytes
    previous: bytes


@dataclass(frozen=True)
class Found:
    """A query's look-up: what its script returned, its candidates (entry numbers, ascending)
    and their records as fetched (None where swept since)."""

    looked: Lookup
    numbers: list[int]
    records: Sequence[Any]


def _filed_of(lists: list[bytes]) -> bytes:
    """The entry numbers a script read from a query's buckets, one bucket's list after another
    (the script returns them a bucket at a time: see ``_GLOBAL_BODY``)."""
    return b"".join(lists)


def _lookup_of_both(raw: list[Any]) -> Lookup:
    """The one-Redis script's reply: seq, entry, the client's previous records, the filed
    numbers."""
    return Lookup(int(raw[0]), int(raw[1]), _filed_of(raw[3]), raw[2] or b"")


class RedisFingerprintStore:
    """Everyone's recent queries (indexed) and each client's, in Redis or a Redis Cluster.

    A query is one atomic script on one Redis; on a cluster, two: everyone's (sweep, read the
    query's buckets, add) and then its client's (read, append, trim), each in its own slot.
    Then the candidates counted here from the buckets are fetched (one HMGET), and matching
    runs here, with the in-process store's pure function. Errors propagate
    (``REDIS_ERRORS``): the caller fails open.

    The service looks its queries up while the model classifies them (``look_up_many``: stored
    without their answers, candidates fetched), and decides once they are answered
    (``check_and_store_many`` with what was found); the answers are written after they are
    served (``write_answers``), or with the next look-up: the round trips are off the answer's
    path."""

    def __init__(
        self,
        url: str,
        scheme: WindowHashScheme,
        *,
        prefix: str = "advguard",
        max_fingerprints: int = 50_000,
        ttl_s: float = 3600.0,
        per_client: int = 256,
        client_ttl_s: float = 86_400.0,
        timeout_s: float = 0.2,
        cluster: bool = False,
    ) -> None:
        checked_prefix(prefix)
        if min(max_fingerprints, per_client) < 1:
            raise ValueError("store bounds must be positive")
        self.blocks = True  # a round trip to Redis (up to timeout_s)
        self.scheme = scheme
        self.prefix = prefix
        self.max_fingerprints = max_fingerprints
        self.ttl_s = ttl_s
        self.per_client = per_client
        self.client_ttl_s = client_ttl_s
        self.dtype = record_dtype(scheme.words)
        self._answer_offset = self.dtype.fields["decision"][1]  # type: ignore[index]
        self._entry_offset = self.dtype.fields["entry"][1]  # type: ignore[index]
        tag = f"{{{prefix}:fp}}"
        # records of another size, or an index of another bucket count or field naming (decimal
        # before 2026-12-07: ``r629b19``), keep apart
        self.layout = f"r{self.dtype.itemsize}b{bucket_bits()}f4"
        self.meta_key = f"{prefix}:fp:{tag}:{self.layout}:meta"
        self.entries_key = f"{prefix}:fp:{tag}:{self.layout}:entries"
        self.buckets_key = f"{prefix}:fp:{tag}:{self.layout}:buckets"
        self._url = url
        self._cluster = cluster
        self._timeout_s = timeout_s
        self._client: RedisClient | None = None
        self._scripts: dict[str, Any] = {}
        self._answered: dict[int, Answer] = {}  # entry -> answer decided (``look_up_many``)
        self._unwritten: list[tuple[Stored, Answer]] = []  # decided, not yet in Redis

    def client_key(self, client_id: str) -> str:
        return f"{self.prefix}:fp:{self.layout}:client:{{{hash_tag(client_id)}}}"

    @property
    def redis(self) -> RedisClient:
        """Connected on first use (a cluster client connects when made)."""
        if self._client is None:
            client = connect(self._url, cluster=self._cluster, timeout_s=self._timeout_s)
            self._scripts = {name: client.register_script(lua) for name, lua in _SCRIPTS.items()}
            self._client = client
        return self._client

    def _run(self, name: str, keys: list[str], args: list[Any], pipe: Any = None) -> Any:
        """Run a script now, or queue it on ``pipe`` (a pipeline of this store's client)."""
        self.redis  # noqa: B018 (connects and registers the scripts)
        return self._scripts[name](keys=keys, args=args, client=pipe)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __len__(self) -> int:
        """Entries held (live or not yet swept)."""
        return int(self.redis.hlen(self.entries_key))

    # -- records

    def _record(
        self,
        fingerprint: npt.NDArray[np.generic],
        digest: bytes,
        at: float,
        answer: Answer | None,
        entry: int = 0,
    ) -> npt.NDArray[Any]:
        record = np.zeros(1, dtype=self.dtype)
        record["at"] = at
        record["sketch"] = fingerprint.astype(np.uint64)
        record["digest"] = np.void(digest.ljust(16, b"\0")[:16])
        record["entry"] = entry
        if answer is not None:
            put_answer(record[0], answer)
        return record

    def _answer_bytes(self, answer: Answer) -> bytes:
        record = self._record(np.zeros(self.dtype["sketch"].shape, np.uint64), b"", 0.0, answer)
        start = self._answer_offset
        return record.tobytes()[start : self._entry_offset]

    def _scope(
        self,
        records: npt.NDArray[Any],
        senders: list[str],
        fingerprint: npt.NDArray[np.generic],
        digest: bytes,
        client_id: str,
    ) -> ScopeMatch:
        if len(records) == 0:
            return NO_MATCH
        rows = records["sketch"]
        similarities = self.scheme.similarity(fingerprint, rows)
        close = self.scheme.close(fingerprint, rows)
        # only the matches' records are decoded: a client's string holds up to ``per_client``
        # of them, and decoding all was most of a query's CPU (one busy client)
        hits = np.flatnonzero(near_duplicates(similarities, self.scheme.threshold) | close)
        if len(hits) == 0:
            return NO_MATCH
        matched = records[hits]
        return summarise_matches(
            similarities[hits],
            [bytes(d) for d in matched["digest"]],
            [senders[i] for i in hits.tolist()],
            answers_of(matched),
            digest,
            client_id,
            self.scheme.threshold,
            matched["at"].astype(np.float64),
            close[hits],
        )

    # -- the store

    def check_and_store(
        self,
        client_id: str,
        fingerprint: npt.NDArray[np.generic],
        digest: bytes,
        at: float,
        answer: Answer | None = None,
        keys: npt.NDArray[np.uint64] | None = None,
    ) -> tuple[MatchEvidence, Stored]:
        """Match the query against everyone's live queries (candidates from the index) and its
        client's, then store it; live means what it means in process: among the last
        ``max_fingerprints`` queries and within ``ttl_s`` (everyone's), among the client's last
        ``per_client`` and within ``client_ttl_s`` (the client's)."""
        query = StoreQuery(client_id, fingerprint, digest, at, answer, keys)
        if not self._cluster:
            return self._evidence(query, self._look_up([query])[0], {})
        # two slots: two scripts, then the candidates (in everyone's slot)
        record = self._record(fingerprint, digest, at, answer)
        raw = self._run(
            "global", self._global_keys, [*self._global_args(query, record, at), _buckets(query)]
        )
        record["entry"] = entry = int(raw[1])
        previous = self._run(
            "client",
            [self.client_key(client_id)],
            [record.tobytes(), self.per_client, self._client_ttl, self.dtype.itemsize],
        )
        looked = Lookup(int(raw[0]), entry, _filed_of(raw[2]), previous or b"")
        numbers = self._candidates(looked)
        records = self.redis.hmget(self.entries_key, numbers) if numbers else []
        return self._evidence(query, Found(looked, numbers, records), {})

    def look_up_many(self, queries: Sequence[StoreQuery]) -> list[Found] | None:
        """The part of ``check_and_store_many`` that needs no answer, done before the queries
        are classified: each query stored (its answer still unknown) and its candidates fetched,
        in two round trips a batch, in order; None on a cluster (there a query's two scripts
        need its answer: it is looked up when decided). The answers are written when decided
        (``check_and_store_many(queries, decide, found)``, then ``write_answers``); until then
        the records are pending (no answer), as another replica's query in flight is to the
        match rules."""
        if self._cluster:
            return None
        found: list[Found] = []
        for start in range(0, len(queries), SWEEP_LAG):  # no chunk outruns the sweep's lag
            found += self._look_up(queries[start : start + SWEEP_LAG])
        return found

    def check_and_store_many(
        self,
        queries: Sequence[StoreQuery],
        decide: Decide,
        found: Sequence[Found] | None = None,
    ) -> None:
        """With ``found`` (``look_up_many``'s, for the same queries, now with their answers):
        each query matched on what was found and decided in order; its answer (or the kept one)
        is written to its records by ``write_answers`` or, before anything else, by the store's
        next round trip. A found record still pending gets the answer this store decided for
        it, if it did: its own earlier queries, in this batch or another, read as they will be
        stored.

        Without: on one Redis, the whole batch in two round trips: every query's script pipelined
        (Redis runs them in order, so each sees the ones before), then every query's candidates'
        records, then each query matched and decided in order. A kept answer (``decide``) is
        written to the replies of the later queries here, as if written before they ran, and to
        Redis after; the same outcome as one query at a time. On a cluster (two scripts a
        query, the second needing the first's entry number): one query at a time."""
        if found is not None:
            self._decide_found(queries, found, decide)
            return
        if self._cluster or len(queries) < 2:
            check_and_store_each(self, queries, decide)
            return
        kept: dict[int, Answer] = {}
        for start in range(0, len(queries), SWEEP_LAG):  # no chunk outruns the sweep's lag
            chunk = queries[start : start + SWEEP_LAG]
            for query, one in zip(chunk, self._look_up(chunk), strict=True):
                evidence, stored = self._evidence(query, one, kept)
                answer = decide(query, evidence)
                if answer is not None:
                    kept[stored.entry] = answer
                    self._unwritten.append((stored, answer))
        self.write_answers()

    def _decide_found(
        self, queries: Sequence[StoreQuery], found: Sequence[Found], decide: Decide
    ) -> None:
        """``check_and_store_many``'s second half for queries looked up before."""
        for query, one in zip(queries, found, strict=True):
            evidence, stored = self._evidence(query, one, self._answered, pending_only=True)
            kept = decide(query, evidence)
            answer = kept if kept is not None else query.answer
            if answer is not None:
                self._remember(stored.entry, answer)
                self._unwritten.append((stored, answer))

    def write_answers(self) -> None:
        """Write the answers decided since the last write, in one round trip."""
        if self._unwritten:
            pipe = self.redis.pipeline(transaction=False)
            self._queue_answers(pipe)
            pipe.execute()

    def _queue_answers(self, pipe: Any) -> int:
        """Queue the unwritten answers' writes on ``pipe``, one script call for them all
        (dropped if it fails: the records stay pending, as when Redis fails before a look-up's
        answer is known): the number of replies they add."""
        writes, self._unwritten = self._unwritten, []
        if not writes:
            return 0
        keys = [self.entries_key]
        args: list[Any] = [self._entry_offset, self._answer_offset, self.dtype.itemsize]
        for stored, answer in writes:
            keys.append(self.client_key(stored.client_id))
            args += [stored.entry, _entry_bytes(stored.entry), self._answer_bytes(answer)]
        self._run("relabel_many", keys, args, pipe)
        return 1

    def _remember(self, entry: int, answer: Answer) -> None:
        """Keep the answer decided for a looked-up entry (the newest ``ANSWERS_REMEMBERED``)."""
        self._answered[entry] = answer
        if len(self._answered) > ANSWERS_REMEMBERED:
            del self._answered[next(iter(self._answered))]

    def _look_up(self, queries: Sequence[StoreQuery]) -> list[Found]:
        """Every query's script pipelined, then every query's candidates' records: (what its
        script returned, its candidates, their records). Each script sweeps as of the earliest
        query's time, so no query's candidates are swept before they are fetched."""
        sweep_at = min(query.at for query in queries)
        pipe = self.redis.pipeline(transaction=False)
        writes = self._queue_answers(pipe)  # first: the queries see them
        for query in queries:
            keys_, args = self._both_call(query, sweep_at)
            self._run("both", keys_, args, pipe)
        looked = [_lookup_of_both(raw) for raw in pipe.execute()[writes:]]
        numbers = [self._candidates(one) for one in looked]
        pipe = self.redis.pipeline(transaction=False)
        for wanted in numbers:
            if wanted:
                pipe.hmget(self.entries_key, wanted)
        fetched = iter(pipe.execute())
        return [
            Found(one, wanted, next(fetched) if wanted else [])
            for one, wanted in zip(looked, numbers, strict=True)
        ]

    @property
    def _global_keys(self) -> list[str]:
        return [self.meta_key, self.entries_key, self.buckets_key]

    @property
    def _client_ttl(self) -> int:
        return max(1, int(np.ceil(self.client_ttl_s)))

    def _global_args(
        self, query: StoreQuery, record: npt.NDArray[Any], sweep_at: float
    ) -> list[Any]:
        """Everyone's part's arguments before the buckets (both scripts start with them)."""
        return [
            repr(float(sweep_at)),
            repr(float(self.ttl_s)),
            self.max_fingerprints,
            record.tobytes() + query.client_id.encode(),
        ]

    def _both_call(self, query: StoreQuery, sweep_at: float) -> tuple[list[str], list[Any]]:
        """Keys and arguments of the one-Redis script (everyone's part and the client's)."""
        record = self._record(query.fingerprint, query.digest, query.at, query.answer)
        return (
            [*self._global_keys, self.client_key(query.client_id)],
            [
                *self._global_args(query, record, sweep_at),
                record.tobytes(),
                self.per_client,
                self._client_ttl,
                self.dtype.itemsize,
                self._entry_offset,
                _buckets(query),
            ],
        )

    def _candidates(self, looked: Lookup) -> list[int]:
        """The entries to fetch for a query: live by the cap (the sweep lags it), filed in at
        least ``MIN_SHARED_KEYS`` of the query's buckets, the newest ``MAX_CANDIDATES``,
        ascending (oldest first)."""
        filed = _filed_numbers(looked.filed)
        low = max(looked.seq - self.max_fingerprints + 1, 1)
        found = repeated_at_least(filed[filed >= low], MIN_SHARED_KEYS, low, looked.seq)
        newest: list[int] = newest_candidates(found).tolist()
        return newest

    def _evidence(
        self,
        query: StoreQuery,
        found: Found,
        kept: Mapping[int, Answer],
        *,
        pending_only: bool = False,
    ) -> tuple[MatchEvidence, Stored]:
        """Match a query against its candidates and its client's previous records; ``kept``:
        answers to read instead for some entries (with ``pending_only``, only for records
        still without one)."""
        size = self.dtype.itemsize
        looked = found.looked
        live_numbers, live_blobs = [], []
        for number, blob in zip(found.numbers, found.records, strict=True):
            if blob is not None:
                live_numbers.append(number)
                live_blobs.append(blob)
        everyone_records = _records(b"".join(b[:size] for b in live_blobs), self.dtype)
        if kept:
            everyone_records = self._with_kept(everyone_records, live_numbers, kept, pending_only)
        fresh = everyone_records["at"] >= query.at - self.ttl_s
        everyone = self._scope(
            everyone_records[fresh],
            [_text(b[size:]) for b, keep in zip(live_blobs, fresh, strict=True) if keep],
            query.fingerprint,
            query.digest,
            query.client_id,
        )
        try:
            own = _records(looked.previous, self.dtype)
        except redis.exceptions.DataError:  # start this client afresh: the next query works
            self.redis.delete(self.client_key(query.client_id))
            raise
        if kept:
            own = self._with_kept(own, own["entry"].tolist(), kept, pending_only)
        own = own[own["at"] >= query.at - self.client_ttl_s]
        client = self._scope(
            own, [query.client_id] * len(own), query.fingerprint, query.digest, query.client_id
        )
        return evidence_of(client, everyone), Stored(query.client_id, looked.entry)

    def _with_kept(
        self,
        records: npt.NDArray[Any],
        entries: list[int],
        kept: Mapping[int, Answer],
        pending_only: bool = False,
    ) -> npt.NDArray[Any]:
        """A copy of ``records`` with the kept answers of those entries in place (only where
        a record has none yet, with ``pending_only``)."""
        rows = np.flatnonzero(records["decision"] == 0) if pending_only else range(len(entries))
        if len(rows) == 0:
            return records
        out = records.copy()
        for i in rows:
            answer = kept.get(int(entries[i]))
            if answer is not None:
                put_answer(out[i], answer)
        return out

    def relabel(self, stored: Stored, answer: Answer) -> None:
        """Keep ``answer`` with a stored query instead (the answer it was actually served)."""
        self._relabel(stored, answer, None)

    def _relabel(self, stored: Stored, answer: Answer, pipe: Any) -> None:
        """Both relabel scripts, run now or queued on ``pipe``."""
        data = self._answer_bytes(answer)
        self._run(
            "relabel_global", [self.entries_key], [stored.entry, self._answer_offset, data], pipe
        )
        self._run(
            "relabel_client",
            [self.client_key(stored.client_id)],
            [
                _entry_bytes(stored.entry),
                self._entry_offset,
                self._answer_offset,
                data,
                self.dtype.itemsize,
            ],
            pipe,
        )
