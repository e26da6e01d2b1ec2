"""The blend test's memory in Redis: each client's last distinct queries (sketch, pixel digest,
served answer) in one list, ``{prefix}:blends:{<client>}``, so that every replica of the
service sees the same client's queries and a Redis Cluster keeps each list in its client's
slot (a script or command touches one client's list, or on one Redis several).

``recall`` reads the clients' lists; ``keep`` appends a batch's new entries, trims each list to
the rule's window and renews its time to live. On one Redis each is one script call a batch,
whatever the number of clients, instead of three commands per client (append, trim, expire)
and one to read, each packed and parsed by redis-py on the screening thread (the service's
screened throughput did not move with it: ``bench.stateful_cost``, 82.4% of unscreened with
Redis against 81.2% before; what held it down was the sketches' pooling in torch on that
thread, ``app.core.stateful.blends.sketches``: 87-90% since; issue 13). On a cluster,
whose scripts must keep to one slot, each is one pipeline of plain commands (no transaction:
it spans slots, and an interleaved append only reorders). Two replicas screening the same
client at once may each miss the other's latest query: the test then sees it one query
later. Per client the list holds at most ``window`` entries of 35 bytes plus the sketch (1,536
bytes at 3 x 16 x 16): ~12.5 KB at the default window of 8, for a client active within the
time to live.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from app.core.stateful.blends import BlendEntry, BlendRule, RecentSketches
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
    ``ttl_s`` after its client's last kept query."""

    def __init__(
        self,
        url: str,
        rule: BlendRule,
        *,
        prefix: str = "advguard",
        ttl_s: float = 3600.0,
        timeout_s: float = 0.2,
        cluster: bool = False,
    ) -> None:
        checked_prefix(prefix)
        if ttl_s <= 0:
            raise ValueError("the blend memory's time to live must be positive")
        self.blocks = True
        self.rule = rule
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._url = url
        self._cluster = cluster
        self._timeout_s = timeout_s
        self._client: RedisClient | None = None
        self._scripts: dict[str, Any] = {}

    def key(self, client_id: str) -> str:
        return f"{self.prefix}:blends:{{{hash_tag(client_id)}}}"

    @property
    def redis(self) -> RedisClient:
        """Connected on first use (a cluster client connects when made)."""
        if self._client is None:
            client = connect(self._url, cluster=self._cluster, timeout_s=self._timeout_s)
            if not self._cluster:
                self._scripts = {
                    "recall": client.register_script(_RECALL),
                    "keep": client.register_script(_KEEP),
                }
            self._client = client
        return self._client

    def recall(self, client_ids: Iterable[str]) -> dict[str, RecentSketches]:
        clients = list(dict.fromkeys(client_ids))
        if not clients:
            return {}
        keys = [self.key(client) for client in clients]
        window = self.rule.window
        if self._cluster:
            pipe: Any = self.redis.pipeline(transaction=False)
            for key in keys:
                pipe.lrange(key, -window, -1)
            lists = pipe.execute()
        else:
            lists = self._script("recall", keys, [window])
        return {
            client: RecentSketches(self.rule, [entry_of(raw) for raw in raw_list])
            for client, raw_list in zip(clients, lists, strict=True)
        }

    def keep(self, added: Mapping[str, Sequence[BlendEntry]], at: float) -> None:
        window = self.rule.window
        # only a list's last ``window`` entries survive its trim
        kept = {
            self.key(client): [entry_bytes(entry) for entry in entries[-window:]]
            for client, entries in added.items()
            if entries
        }
        if not kept:
            return
        ttl_ms = max(1, round(self.ttl_s * 1000))
        if self._cluster:
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
        self._script("keep", list(kept), args)

    def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Call one of the scripts (one Redis only), connecting and registering them first."""
        self.redis  # noqa: B018 (connects and registers the scripts)
        return self._scripts[name](keys=keys, args=args)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
