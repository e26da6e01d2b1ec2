"""The blend test's memory in Redis: each client's last distinct queries (sketch, pixel digest,
served answer) in one list, ``{prefix}:blends:{<client>}``, so that every replica of the
service sees the same client's queries and a Redis Cluster keeps each list in its client's
slot (a script or command touches one client's list, or on one Redis several).

A query makes no round trip of its own for the test on its way to its answer: the service reads
the lists while the model classifies (with the early look-up: ``fetch``) or with the fingerprint
store's first round trip (``BatchRecall`` rides it), and writes a batch's new entries (``flush``)
once the batch is answered. In between, what this replica kept lives in a local overlay (an
``InProcessBlendMemory``, bounded like the in-process memory), merged into what Redis returned
(``recall``): a client's next batch sees its last one whether or not the write has landed. Why:
with a round trip each to read and to write on the answer's path, the screened throughput with
Redis fell from 93.9% to 81.2% of the unscreened (``bench.stateful_cost``, issue 13), and one
script call for each instead of a command per client did not move it (81.8%).

``fetch`` reads the clients' lists; ``flush`` appends the queued entries, trims each list to the
rule's window and renews its time to live. On one Redis each is one script call, whatever the
number of clients (redis-py packs and parses every command on the screening thread); on a
cluster, whose scripts must keep to one slot, one pipeline of plain commands (no transaction: it
spans slots, and an interleaved append only reorders). Across replicas the order within a
window is approximate, and a replica screening the same client at once as another may see the
other's latest query one query later. Per client a list holds at most ``window`` entries of 35
bytes plus the sketch (1,536 bytes at 3 x 16 x 16): ~12.5 KB at the default window of 8, for a
client active within the time to live.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from app.core.stateful.blends import BlendEntry, BlendRule, InProcessBlendMemory, RecentSketches
from app.core.stateful.match_rule import Answer
from app.service.fingerprints import DECISIONS
from app.service.redis_connection import RedisClient, checked_prefix, connect, hash_tag

_HEAD = struct.Struct("<16sBhdd")  # digest, decision (0: none), class, probability, score

# KEYS: the clients' lists; ARGV: the window. Each list's last ``window`` entries.
_RECALL = """
local window = tonumber(ARGV[1])
local lists = {}
for i, key in ipairs(KEYS) do
  lists[i] = redis.call('LRANGE', key, -window, -1)
end
return lists
"""

# KEYS: the clients' lists; ARGV: the window, the time to live (ms), then per list its count of
# new entries and the entries (at most ``window``: only they would survive the trim).
_KEEP = """
local window = tonumber(ARGV[1])
local ttl_ms = tonumber(ARGV[2])
local at = 3
for _, key in ipairs(KEYS) do
  local count = tonumber(ARGV[at])
  redis.call('RPUSH', key, unpack(ARGV, at + 1, at + count))
  redis.call('LTRIM', key, -window, -1)
  redis.call('PEXPIRE', key, ttl_ms)
  at = at + 1 + count
end
return #KEYS
"""


def merged(shared: Sequence[BlendEntry], local: Sequence[BlendEntry]) -> list[BlendEntry]:
    """Redis's entries, then the local ones it lacks (by digest), in order: on one replica the
    local ones it lacks are the newest (not yet flushed)."""
    held = {entry.digest for entry in shared}
    return [*shared, *(entry for entry in local if entry.digest not in held)]


def entry_bytes(entry: BlendEntry) -> bytes:
    """One entry as its list element: the head, then the float16 sketch."""
    answer = entry.answer
    head = (
        _HEAD.pack(entry.digest.ljust(16, b"\0")[:16], 0, 0, 0.0, 0.0)
        if answer is None
        else _HEAD.pack(
            entry.digest.ljust(16, b"\0")[:16],
            DECISIONS.index(answer.decision),
            answer.class_index,
            answer.probability,
            answer.score,
        )
    )
    return head + entry.sketch.astype("<f2").tobytes()


def entry_of(raw: bytes) -> BlendEntry:
    """``entry_bytes`` read back."""
    digest, decision, class_index, probability, score = _HEAD.unpack_from(raw)
    answer = None if decision == 0 else Answer(DECISIONS[decision], class_index, probability, score)
    sketch = np.frombuffer(raw[_HEAD.size :], dtype="<f2").astype(np.float16)
    return BlendEntry(sketch, digest, answer)


class RedisBlendMemory:
    """``BlendMemory`` in Redis (or a Redis Cluster): lists bounded by the window, each expiring
    ``ttl_s`` after its client's last kept query; this replica's own keeps also in a local
    overlay of at most ``local_clients`` clients until they are old news (``recall``)."""

    def __init__(
        self,
        url: str,
        rule: BlendRule,
        *,
        prefix: str = "advguard",
        ttl_s: float = 3600.0,
        timeout_s: float = 0.2,
        cluster: bool = False,
        local_clients: int = 4096,
    ) -> None:
        checked_prefix(prefix)
        if ttl_s <= 0:
            raise ValueError("the blend memory's time to live must be positive")
        self.local = InProcessBlendMemory(rule, max_clients=local_clients, ttl_s=ttl_s)
        self._unwritten: list[tuple[str, Sequence[BlendEntry]]] = []  # kept, not yet flushed
        self.blocks = True
        self.rule = rule
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._url = url
        self.cluster = cluster
        self._timeout_s = timeout_s
        self._client: RedisClient | None = None
        self._scripts: dict[str, Any] = {}

    def key(self, client_id: str) -> str:
        return f"{self.prefix}:blends:{{{hash_tag(client_id)}}}"

    @property
    def redis(self) -> RedisClient:
        """Connected on first use (a cluster client connects when made)."""
        if self._client is None:
            client = connect(self._url, cluster=self.cluster, timeout_s=self._timeout_s)
            if not self.cluster:
                self._scripts = {
                    "recall": client.register_script(_RECALL),
                    "keep": client.register_script(_KEEP),
                }
            self._client = client
        return self._client

    def fetch(self, client_ids: Iterable[str]) -> dict[str, list[BlendEntry]]:
        """What Redis holds of each client's recent queries: one script call on one Redis, one
        pipeline on a cluster."""
        clients = list(dict.fromkeys(client_ids))
        if not clients:
            return {}
        if self.cluster:
            pipe: Any = self.redis.pipeline(transaction=False)
            for client in clients:
                pipe.lrange(self.key(client), -self.rule.window, -1)
            return self.entries_of(clients, pipe.execute())
        pipe = self.redis.pipeline(transaction=False)
        self.queue_fetch(pipe, clients)
        return self.entries_of(clients, pipe.execute()[0])

    def queue_fetch(self, pipe: Any, clients: Sequence[str]) -> None:
        """Queue the clients' lists' read on ``pipe``, one Redis's pipeline (not a cluster's):
        one reply, for ``entries_of``."""
        self.redis  # noqa: B018 (connects and registers the scripts)
        keys = [self.key(client) for client in clients]
        self._scripts["recall"](keys=keys, args=[self.rule.window], client=pipe)

    @staticmethod
    def entries_of(clients: Sequence[str], lists: list[list[bytes]]) -> dict[str, list[BlendEntry]]:
        return {
            client: [entry_of(raw) for raw in raw_list]
            for client, raw_list in zip(clients, lists, strict=True)
        }

    def recall(
        self,
        client_ids: Iterable[str],
        fetched: Mapping[str, Sequence[BlendEntry]] | None = None,
    ) -> dict[str, RecentSketches]:
        """Each client's recent queries: what Redis held (``fetched`` by an earlier ``fetch``,
        else fetched now), then what this replica kept that it lacks (newer, or not flushed)."""
        clients = list(dict.fromkeys(client_ids))
        shared = {client: fetched[client] for client in clients if fetched and client in fetched}
        missing = [client for client in clients if client not in shared]
        if missing:
            shared |= self.fetch(missing)
        local = self.local.recall(clients)
        return {
            client: RecentSketches(self.rule, merged(shared[client], local[client].entries))
            for client in clients
        }

    def keep(self, added: Mapping[str, Sequence[BlendEntry]], at: float) -> None:
        """Kept in the local overlay now, and queued for Redis (``flush``)."""
        self.local.keep(added, at)
        self._unwritten += [(client, entries) for client, entries in added.items() if entries]

    def flush(self) -> None:
        """Write the queued entries: each list appended, trimmed to the window and its time to
        live renewed. A failure drops them from Redis (this replica's overlay still has them)."""
        queued, self._unwritten = self._unwritten, []
        window = self.rule.window
        by_client: dict[str, list[BlendEntry]] = {}
        for client, entries in queued:
            by_client.setdefault(client, []).extend(entries)
        # only a list's last ``window`` entries survive its trim
        kept = {
            self.key(client): [entry_bytes(entry) for entry in entries[-window:]]
            for client, entries in by_client.items()
        }
        if not kept:
            return
        ttl_ms = max(1, round(self.ttl_s * 1000))
        if self.cluster:
            pipe: Any = self.redis.pipeline(transaction=False)
            for key, raw in kept.items():
                pipe.rpush(key, *raw)
                pipe.ltrim(key, -window, -1)
                pipe.pexpire(key, ttl_ms)
            pipe.execute()
            return
        args: list[Any] = [window, ttl_ms]
        for raw in kept.values():
            args += [len(raw), *raw]
        self.redis  # noqa: B018 (connects and registers the scripts)
        self._scripts["keep"](keys=list(kept), args=args)

    def batch_recall(
        self, client_ids: Iterable[str], fetched: Mapping[str, Sequence[BlendEntry]]
    ) -> BatchRecall:
        """A screened batch's ``recall``, made when first needed (``BatchRecall``)."""
        return BatchRecall(self, client_ids, fetched)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class BatchRecall:
    """A screened batch's clients' recent queries, read when the first query is decided: from
    what the early look-up read (``fetched``), and for the others from what rode the store's
    round trip (a ``Rider`` of ``RedisFingerprintStore.check_and_store_many``, on one Redis)
    or, when nothing rode, from a fetch of its own. Riding saves the read a round trip of its
    own on the answer's path."""

    def __init__(
        self,
        memory: RedisBlendMemory,
        client_ids: Iterable[str],
        fetched: Mapping[str, Sequence[BlendEntry]],
    ) -> None:
        self.memory = memory
        self.clients = list(dict.fromkeys(client_ids))
        self.fetched = dict(fetched)
        self.missing = [client for client in self.clients if client not in self.fetched]
        self._recents: dict[str, RecentSketches] | None = None

    def queue(self, pipe: Any) -> int:
        if not self.missing or self.memory.cluster:
            return 0
        self.memory.queue_fetch(pipe, self.missing)
        return 1

    def took(self, replies: list[Any]) -> None:
        if replies:
            self.fetched |= self.memory.entries_of(self.missing, replies[0])
            self.missing = []

    def recent(self, client_id: str) -> RecentSketches:
        """The client's recent queries (the batch's first call reads what is still missing)."""
        if self._recents is None:
            self._recents = self.memory.recall(self.clients, self.fetched)
        return self._recents[client_id]
