"""The blend test's memory in Redis: each client's last distinct queries (sketch, pixel digest,
served answer) in one list, ``{prefix}:blends:{<client>}``, so that every replica of the
service sees the same client's queries and a Redis Cluster keeps each list in its client's
slot (a script or command touches one client's list, or on one Redis several).

``recall`` reads the clients' lists in one pipeline of ``LRANGE``s (one round trip a batch;
on a cluster one a node), each list's entries then read as rows of one record array;
``keep`` appends a batch's new entries, trims each list to the rule's window and renews its
time to live: on one Redis one script call a batch, whatever the number of clients, on a
cluster, whose scripts must keep to one slot, one pipeline of plain commands (no
transaction: it spans slots, and an interleaved append only reorders). Reading through a
script had cost more: its replies pass through Lua (~0.7 ms of Redis a batch of 32 clients)
and redis-py parsed each entry on the screening thread; with ``hiredis`` parsing, the
pipeline's recall takes a third of that script's time (issue 13, ``bench.stateful_cost``).
Two replicas screening the same
client at once may each miss the other's latest query: the test then sees it one query
later. Per client the list holds at most ``window`` entries of 35 bytes plus the sketch (1,536
bytes at 3 x 16 x 16): ~12.5 KB at the default window of 8, for a client active within the
time to live.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from app.core.stateful.blends import BlendEntry, BlendRule, RecentSketches
from app.service.fingerprints import answers_of, put_answer
from app.service.redis_connection import RedisClient, checked_prefix, connect, hash_tag

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
    """One entry as its list element: one ``_record_dtype`` record (the head, then the float16
    sketch)."""
    record = np.zeros(1, dtype=_record_dtype(entry.sketch.size))
    record["digest"] = np.void(entry.digest.ljust(16, b"\0")[:16])
    if entry.answer is not None:
        put_answer(record[0], entry.answer)
    record["sketch"] = entry.sketch
    return record.tobytes()


def recent_of(rule: BlendRule, joined: bytes, count: int) -> RecentSketches:
    """A client's recent queries from its ``count`` entries of one size joined into one string
    (``entry_bytes`` each, oldest first), read in one pass as rows of one record array."""
    if count == 0:
        return RecentSketches(rule)
    head = _record_dtype(0).itemsize
    dims, odd = divmod(len(joined) // count - head, 2)
    if odd or len(joined) != count * (head + 2 * dims):
        raise ValueError(f"{count} blend entries cannot fill {len(joined)} bytes")
    records = np.frombuffer(joined, dtype=_record_dtype(dims))
    sketches = records["sketch"].astype(np.float16)
    return RecentSketches.of_rows(rule, sketches, records["digest"].tolist(), answers_of(records))


@functools.cache
def _record_dtype(dims: int) -> np.dtype[np.void]:
    """An entry of a ``dims``-long sketch as a packed little-endian record, the one definition of
    a list element's layout: the head (pixel digest, decision code (0: no answer), class,
    probability, score; 35 bytes), then the sketch."""
    return np.dtype(
        [
            ("digest", "V16"),
            ("decision", "u1"),
            ("class_index", "<i2"),
            ("probability", "<f8"),
            ("score", "<f8"),
            ("sketch", "<f2", (dims,)),
        ]
    )


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
                self._scripts = {"keep": client.register_script(_KEEP)}
            self._client = client
        return self._client

    def recall(self, client_ids: Iterable[str]) -> dict[str, RecentSketches]:
        clients = list(dict.fromkeys(client_ids))
        if not clients:
            return {}
        window = self.rule.window
        # plain commands, not a script: a script's replies pass through Lua, which cost Redis
        # ~0.7 ms a batch of 32 clients, and ~0.6 ms more on the screening thread
        pipe: Any = self.redis.pipeline(transaction=False)
        for client in clients:
            pipe.lrange(self.key(client), -window, -1)
        recents = {}
        for client, entries in zip(clients, pipe.execute(), strict=True):
            # entries of another size than the newest (a service with another input size
            # shared the list) are left out: their sketches are not comparable
            same = [entry for entry in entries if len(entry) == len(entries[-1])]
            recents[client] = recent_of(self.rule, b"".join(same), len(same))
        return recents

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
