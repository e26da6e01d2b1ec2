"""The Redis tracker of per-client score statistics (``app.service.tracking``'s protocol).

It updates a client atomically with one Lua script over that client's keys only, which share a
hash tag, so it runs unchanged on a Redis Cluster (``cluster=True``); flagged ids are also kept
in an index (a sorted set) for listing. It fails open: when Redis is unreachable, updates wait
in a bounded in-memory buffer (oldest dropped when full) and are replayed, in order, once Redis
answers again; meanwhile the tracker reports itself degraded. Socket timeouts are short and
Redis is not retried for ``retry_interval_s`` after a failure, so a dead Redis costs requests
nothing.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from redis.commands.core import Script

from app.core.flagging import FlagPolicy
from app.service.redis_connection import (
    REDIS_ERRORS,
    RedisClient,
    checked_prefix,
    connect,
    hash_tag,
)
from app.service.tracking import (
    SCORE_REASON,
    ClientStats,
    Observation,
    RecordResult,
    TrackerState,
    TrackerUnavailableError,
    noop,
)

log = logging.getLogger(__name__)

# Key layout. Every script touches the keys of one client only, and those share a hash tag, the
# escaped client id in braces, so each script call stays in one slot of a Redis Cluster:
#   <prefix>:client:{<id>}  hash, the client's statistics; TTL = client TTL, refreshed on update
#   <prefix>:flag:{<id>}    hash {at: flagged at, seen: last seen}; no TTL
#   <prefix>:flagged        sorted set of flagged ids, the index for listing; no TTL
# Under maxmemory with `volatile-lru` only keys with a TTL are evicted: statistics go, least
# recently used first, and flags stay. A flag's idle expiry is therefore kept by the tracker: it
# expires `ttl` after `seen` (checked by every script that reads it, and swept from the index).
# The index is the one key outside a client's slot; it is written only when a flag is set or
# removed, by separate commands (see RedisTracker).

# KEYS: client hash, flag hash. ARGV: flag value, accepted (1/0), at, alpha, ttl seconds, writer
# (this tracker's id), seq (this tracker's sequence number of the update), the CUSUM's reference,
# the shift's allowance.
# The window update mirrors app.core.flagging.advance_arrays.
# Returns the updated fields (floats as strings: Lua numbers would be truncated to integers) and
# the live flag's time or false; an expired flag is deleted, and a live one's `seen` advanced.
# Idempotent per writer: the hash keeps the last writer and its seq ('w' = "<writer>:<seq>"), and
# an update that writer already applied (its reply was lost, so it was buffered and replayed) is
# not applied twice; the current fields are returned instead.
_RECORD_LUA = """
local key = KEYS[1]
local flag = KEYS[2]
local score = tonumber(ARGV[1])
local acc = tonumber(ARGV[2])
local at = tonumber(ARGV[3])
local alpha = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local seq = tonumber(ARGV[7])
local ref = tonumber(ARGV[8])
local allowance = tonumber(ARGV[9])
local f = function(x) return string.format('%.17g', x) end
local flagged_at = function()
  local fv = redis.call('HMGET', flag, 'at', 'seen', 'reasons')
  if not fv[1] then return false end
  local seen = tonumber(fv[2]) or 0
  if at - seen > ttl then
    redis.call('DEL', flag)
    return false
  end
  if at > seen then redis.call('HSET', flag, 'seen', f(at)) end
  return fv[1] .. ' ' .. (fv[3] or 'score')
end
local v = redis.call('HMGET', key, 'requests', 'accepted', 'rejected', 'scored', 'mean', 'ewma',
                     'first_seen', 'last_seen', 'w', 'wrej', 'cusum', 'shift')
if v[9] then
  local writer, last = string.match(v[9], '^(.*):(%d+)$')
  if writer == ARGV[6] and tonumber(last) >= seq then
    return {tonumber(v[1]), tonumber(v[2]), tonumber(v[3]), tonumber(v[4]), f(tonumber(v[5])),
            f(tonumber(v[6])), f(tonumber(v[7])), f(tonumber(v[8])), flagged_at(),
            tonumber(v[10]) or 0, f(tonumber(v[11]) or 0), f(tonumber(v[12]) or 0)}
  end
end
local requests = (tonumber(v[1]) or 0) + 1
local accepted = tonumber(v[2]) or 0
local rejected = tonumber(v[3]) or 0
if acc == 1 then accepted = accepted + 1 else rejected = rejected + 1 end
local scored = (tonumber(v[4]) or 0) + 1
local mean = tonumber(v[5]) or 0
local ewma = tonumber(v[6]) or 0
local wrej = tonumber(v[10]) or 0
local cusum = tonumber(v[11]) or 0
local shift = tonumber(v[12]) or 0
if scored > 1 then shift = math.max(0, shift + (mean - allowance - score)) end
mean = mean + (score - mean) / scored
ewma = ewma + alpha / (1 - (1 - alpha) ^ scored) * (score - ewma)
if acc ~= 1 then wrej = wrej + 1 end
cusum = math.max(0, cusum + (ref - score))
local first_seen = tonumber(v[7]) or at
if at < first_seen then first_seen = at end
local last_seen = tonumber(v[8]) or at
if at > last_seen then last_seen = at end
redis.call('HSET', key, 'requests', requests, 'accepted', accepted, 'rejected', rejected,
           'scored', scored, 'mean', f(mean), 'ewma', f(ewma), 'first_seen', f(first_seen),
           'last_seen', f(last_seen), 'w', ARGV[6] .. ':' .. ARGV[7], 'wrej', wrej,
           'cusum', f(cusum), 'shift', f(shift))
redis.call('EXPIRE', key, ttl)
return {requests, accepted, rejected, scored, f(mean), f(ewma), f(first_seen), f(last_seen),
        flagged_at(), wrej, f(cusum), f(shift)}
"""

# KEYS: flag hash. ARGV: at, reason. Sets the flag unless one is there: 1 when this call set it;
# a flag already there gains the reason (`reasons`: comma-separated; absent on flags set before
# reasons existed, which were all the score's).
_FLAG_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local reasons = redis.call('HGET', KEYS[1], 'reasons') or 'score'
  if not string.find(',' .. reasons .. ',', ',' .. ARGV[2] .. ',', 1, true) then
    redis.call('HSET', KEYS[1], 'reasons', reasons .. ',' .. ARGV[2])
  end
  return 0
end
redis.call('HSET', KEYS[1], 'at', ARGV[1], 'seen', ARGV[1], 'reasons', ARGV[2])
return 1
"""

# KEYS: client hash, flag hash. ARGV: now, ttl. Removes the flag; when it was live (not expired),
# restarts the client's window and returns 1.
_CLEAR_LUA = """
local seen = redis.call('HGET', KEYS[2], 'seen')
if not seen then return 0 end
redis.call('DEL', KEYS[2])
if tonumber(ARGV[1]) - tonumber(seen) > tonumber(ARGV[2]) then return 0 end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'scored', 0, 'mean', '0', 'ewma', '0', 'wrej', 0, 'cusum', '0',
                  'shift', '0')
end
return 1
"""

# KEYS: flag hash. ARGV: now, ttl. Deletes an expired flag; returns a live flag's `seen`.
_EXPIRE_FLAG_LUA = """
local seen = redis.call('HGET', KEYS[1], 'seen')
if not seen then return false end
if tonumber(ARGV[1]) - tonumber(seen) > tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[1])
  return false
end
return seen
"""

# KEYS: the index. ARGV: member, score as read. Removes the member only if its score is still the
# one read: a flag set again meanwhile (which rewrites the score) keeps its index entry. Compared
# as numbers: the score's text depends on the protocol the client speaks (RESP3, redis-py's
# default since 8.2, replied 1.7963576455901356e+9 where the script's ZSCORE read
# 1796357645.5901356), and both texts are exact: each reads back as the one stored double.
_UNINDEX_LUA = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""

_SCRIPTS = {
    "record": _RECORD_LUA,
    "flag": _FLAG_LUA,
    "clear": _CLEAR_LUA,
    "expire_flag": _EXPIRE_FLAG_LUA,
    "unindex": _UNINDEX_LUA,
}

# Index entries examined per sweep (each listing and each flagged_count, i.e. each scrape).
FLAG_SWEEP_BATCH = 100


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class _Connection:
    client: RedisClient
    scripts: dict[str, Script]


class RedisTracker:
    """Atomic Lua updates in Redis or a Redis Cluster, failing open to a bounded replay buffer.

    Setting a flag takes two writes in different slots: the id is added to the index, then the
    client's flag is set by a script that reports whether this call set it. A failure between
    them leaves an index entry without a flag, which listing skips and the sweep removes; the
    reverse order could leave a flag that no listing shows."""

    def __init__(
        self,
        url: str,
        policy: FlagPolicy,
        *,
        ttl_s: int = 7 * 24 * 3600,
        prefix: str = "advguard",
        timeout_s: float = 0.2,
        retry_interval_s: float = 0.5,
        buffer_size: int = 10_000,
        on_error: Callable[[], None] = noop,
        cluster: bool = False,
        on_replayed_flag: Callable[[], None] = noop,
    ):
        checked_prefix(prefix)
        self.policy = policy
        self.blocks = True  # Redis round trips (up to timeout_s each)
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.retry_interval_s = retry_interval_s
        self.on_error = on_error
        # a buffered update that flags its client when replayed has no caller to tell: this does
        self.on_replayed_flag = on_replayed_flag
        self.flagged_key = f"{prefix}:flagged"
        self._url = url
        self._cluster = cluster
        self._timeout_s = timeout_s
        self._connection: _Connection | None = None
        # (seq, observation): an update keeps its sequence number through buffering and replay
        self._buffer: deque[tuple[int, Observation]] = (
            deque(maxlen=buffer_size) if buffer_size else deque()
        )
        self._writer = uuid.uuid4().hex[:16]
        self._seq = itertools.count(1)
        self._buffer_size = buffer_size
        self._lock = threading.RLock()
        self._down_until = 0.0
        self._down = False

    def client_key(self, client_id: str) -> str:
        return f"{self.prefix}:client:{{{hash_tag(client_id)}}}"

    def flag_key(self, client_id: str) -> str:
        return f"{self.prefix}:flag:{{{hash_tag(client_id)}}}"

    # -- the connection, made on first use

    @property
    def _redis(self) -> RedisClient:
        return self._connect().client

    def _connect(self) -> _Connection:
        if self._connection is None:
            client = connect(self._url, cluster=self._cluster, timeout_s=self._timeout_s)
            scripts = {name: client.register_script(lua) for name, lua in _SCRIPTS.items()}
            self._connection = _Connection(client, scripts)
        return self._connection

    def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return self._connect().scripts[name](keys=keys, args=args)

    def _record(self, keys: list[str], args: list[Any]) -> Any:
        return self._script("record", keys, args)

    # -- outage handling

    def _failed(self) -> None:
        self._down = True
        self._down_until = time.monotonic() + self.retry_interval_s
        self.on_error()

    def _may_try(self) -> bool:
        return not self._down or time.monotonic() >= self._down_until

    def _buffer_add(self, seq: int, observation: Observation) -> None:
        if self._buffer_size == 0:
            self.on_error()  # no buffer: the update is lost
            return
        if len(self._buffer) == self._buffer_size:
            self.on_error()  # the oldest buffered update is dropped
        self._buffer.append((seq, observation))

    def _replay(self) -> None:
        """Apply buffered updates in order; raises (leaving the rest) if Redis fails again.
        An update whose reply was lost is replayed, and the script skips it (same writer, seq).
        A client newly flagged by a replayed update is reported to ``on_replayed_flag``."""
        while self._buffer:
            seq, observation = self._buffer[0]
            if self._apply(observation, seq).newly_flagged:
                self.on_replayed_flag()
            self._buffer.popleft()

    def _record_call(self, observation: Observation, seq: int) -> tuple[list[str], list[Any]]:
        """Keys and arguments of the record script for one update."""
        return (
            [self.client_key(observation.client_id), self.flag_key(observation.client_id)],
            [
                repr(float(observation.flag_value)),
                1 if observation.accepted else 0,
                repr(float(observation.at)),
                repr(self.policy.window.ewma_alpha),
                self.ttl_s,
                self._writer,
                seq,
                repr(self.policy.window.cusum_reference),
                repr(self.policy.window.shift_allowance),
            ],
        )

    def _apply(self, observation: Observation, seq: int) -> RecordResult:
        keys, args = self._record_call(observation, seq)
        return self._result(observation, self._record(keys, args))

    def _apply_many(self, updates: Sequence[tuple[int, Observation]]) -> list[RecordResult]:
        """The record scripts of several updates pipelined (one round trip; Redis runs them in
        order), then each reply read as ``_apply`` reads it. On a cluster one at a time: a
        pipeline's scripts would span slots."""
        if self._cluster or len(updates) < 2:
            return [self._apply(observation, seq) for seq, observation in updates]
        connection = self._connect()
        pipe = connection.client.pipeline(transaction=False)
        for seq, observation in updates:
            keys, args = self._record_call(observation, seq)
            connection.scripts["record"](keys=keys, args=args, client=pipe)
        replies = pipe.execute()
        # a flag set while reading an earlier reply was not there when the later scripts ran:
        # read their replies as if it had been, as one update at a time would see it
        flagged: dict[str, ClientStats] = {}
        results = []
        for (_, observation), raw in zip(updates, replies, strict=True):
            result = self._result(observation, raw, flagged.get(observation.client_id))
            if result.stats is not None and result.stats.flagged:
                flagged[observation.client_id] = result.stats
            results.append(result)
        return results

    def _result(
        self, observation: Observation, raw: Any, earlier: ClientStats | None = None
    ) -> RecordResult:
        """One record script's reply as the client's statistics; flags the client when the
        policy says so. ``earlier``: the client's flagged statistics from an earlier reply of
        the same pipeline, whose flag the script could not see yet."""
        flag_at, _, flag_reasons = ("" if raw[8] is None else _as_str(raw[8])).partition(" ")
        flagged_at = float(flag_at) if flag_at else None
        reasons = tuple(flag_reasons.split(",")) if flagged_at is not None else ()
        if flagged_at is None and earlier is not None:
            flagged_at, reasons = earlier.flagged_at, earlier.flag_reasons
        stats = ClientStats(
            client_id=observation.client_id,
            requests=int(raw[0]),
            accepted=int(raw[1]),
            rejected=int(raw[2]),
            scored=int(raw[3]),
            mean_score=float(_as_str(raw[4])),
            ewma_score=float(_as_str(raw[5])),
            window_rejected=int(raw[9]),
            cusum=float(_as_str(raw[10])),
            shift=float(_as_str(raw[11])),
            first_seen=float(_as_str(raw[6])),
            last_seen=float(_as_str(raw[7])),
            flagged=flagged_at is not None,
            flagged_at=flagged_at,
            flag_reasons=reasons,
        )
        newly = False
        if flagged_at is None and self.policy.should_flag(stats.window):
            newly = self._set_flag(observation.client_id, observation.at, SCORE_REASON)
            stats = replace(
                stats, flagged=True, flagged_at=observation.at, flag_reasons=(SCORE_REASON,)
            )
        return RecordResult(stats, newly)

    def _set_flag(self, client_id: str, at: float, reason: str) -> bool:
        """Index first, then the flag (see the class docstring); True when this call set it."""
        self._redis.zadd(self.flagged_key, {client_id: at})
        return bool(self._script("flag", [self.flag_key(client_id)], [repr(float(at)), reason]))

    def flag(self, client_id: str, reason: str, at: float) -> bool:
        """Flag a client for ``reason`` (a query attack); True when this call set the flag.
        Fails open: with Redis unreachable nothing is flagged and the error is counted."""
        with self._lock:
            if not self._may_try():
                self.on_error()
                return False
            try:
                newly = self._set_flag(client_id, at, reason)
            except REDIS_ERRORS:
                self._failed()
                return False
            self._down = False
            return newly

    # -- the protocol

    def record(self, observation: Observation) -> RecordResult:
        with self._lock:
            seq = next(self._seq)
            if self._may_try():
                try:
                    self._replay()
                    result = self._apply(observation, seq)
                    self._down = False
                    return result
                except REDIS_ERRORS:
                    self._failed()
            self._buffer_add(seq, observation)
            return RecordResult(None, False)

    def record_many(self, observations: Sequence[Observation]) -> list[RecordResult]:
        """``record`` of each in one round trip. Redis down: all are buffered, as ``record``
        buffers one (an update that ran before the failure is skipped when replayed)."""
        with self._lock:
            updates = [(next(self._seq), observation) for observation in observations]
            if self._may_try():
                try:
                    self._replay()
                    results = self._apply_many(updates)
                    self._down = False
                    return results
                except REDIS_ERRORS:
                    self._failed()
            for seq, observation in updates:
                self._buffer_add(seq, observation)
            return [RecordResult(None, False) for _ in updates]

    def _read(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            try:
                return fn()
            except REDIS_ERRORS as exc:
                self._failed()
                raise TrackerUnavailableError(f"redis: {exc}") from exc

    def _live_flag(self, fields: list[Any], now: float) -> tuple[float, float] | None:
        """(flagged at, last seen) of a flag hash's HMGET at, seen; None when absent or expired."""
        at, seen = fields
        if at is None or seen is None or now - float(_as_str(seen)) > self.ttl_s:
            return None
        return float(_as_str(at)), float(_as_str(seen))

    def _stats(
        self,
        client_id: str,
        fields: dict[bytes, bytes],
        flag: tuple[float, float] | None,
        reasons: Any = None,
    ) -> ClientStats:
        """From the client's hash and its live flag. A flagged client whose statistics were
        evicted (maxmemory) shows zero counts, first seen when flagged, last seen per the flag."""

        values = {_as_str(name): _as_str(value) for name, value in fields.items()}
        flagged_at = None if flag is None else flag[0]
        if not values and flag is not None:
            values = {"first_seen": repr(flag[0]), "last_seen": repr(flag[1])}

        def get(name: str) -> str:
            return values.get(name, "0")

        return ClientStats(
            client_id=client_id,
            requests=int(get("requests")),
            accepted=int(get("accepted")),
            rejected=int(get("rejected")),
            scored=int(get("scored")),
            mean_score=float(get("mean")),
            ewma_score=float(get("ewma")),
            window_rejected=int(get("wrej")),
            cusum=float(get("cusum")),
            shift=float(get("shift")),
            first_seen=float(get("first_seen")),
            last_seen=float(get("last_seen")),
            flagged=flagged_at is not None,
            flagged_at=flagged_at,
            flag_reasons=(
                tuple((_as_str(reasons) if reasons else SCORE_REASON).split(","))
                if flag is not None
                else ()
            ),
        )

    def get(self, client_id: str) -> ClientStats | None:
        def read() -> ClientStats | None:
            pipe = self._redis.pipeline(transaction=False)  # one slot: one node
            pipe.hgetall(self.client_key(client_id))
            pipe.hmget(self.flag_key(client_id), ["at", "seen", "reasons"])
            fields, flag_fields = pipe.execute()
            flag = self._live_flag(flag_fields[:2], time.time())
            if not fields and flag is None:
                return None
            return self._stats(client_id, fields, flag, flag_fields[2])

        result: ClientStats | None = self._read(read)
        return result

    def _sweep_flags(self, now: float) -> None:
        """Bound the flags kept without TTL: examine up to ``FLAG_SWEEP_BATCH`` index entries
        whose score is over ``ttl`` old. An expired flag is deleted and unindexed (so is an entry
        whose flag is gone); a live one's score becomes its last seen, due again ``ttl`` later."""
        due: list[tuple[bytes, str]] = list(
            self._redis.zrangebyscore(  # type: ignore[arg-type]
                self.flagged_key,
                "-inf",
                repr(now - self.ttl_s),
                start=0,
                num=FLAG_SWEEP_BATCH,
                withscores=True,
                score_cast_func=_as_str,
            )
        )
        for member, score in due:
            client_id = _as_str(member)
            seen = self._script("expire_flag", [self.flag_key(client_id)], [repr(now), self.ttl_s])
            if seen is None:
                self._script("unindex", [self.flagged_key], [client_id, score])
            else:
                self._redis.zadd(self.flagged_key, {client_id: float(_as_str(seen))}, xx=True)

    def flagged_clients(self) -> list[ClientStats]:
        def read() -> list[ClientStats]:
            now = time.time()
            self._sweep_flags(now)
            members = [_as_str(m) for m in self._redis.zrange(self.flagged_key, 0, -1)]
            pipe = self._redis.pipeline(transaction=False)
            for client_id in members:
                pipe.hmget(self.flag_key(client_id), ["at", "seen", "reasons"])
                pipe.hgetall(self.client_key(client_id))
            replies = pipe.execute()
            found = []
            for i, client_id in enumerate(members):
                flag = self._live_flag(replies[2 * i][:2], now)
                if flag is not None:  # else: being set, or expired and not swept yet
                    reasons = replies[2 * i][2]
                    found.append(self._stats(client_id, replies[2 * i + 1], flag, reasons))
            return sorted(found, key=lambda s: (s.flagged_at or 0.0, s.client_id))

        result: list[ClientStats] = self._read(read)
        return result

    def flagged_count(self) -> int:
        """The index's size after a sweep: exact but for flags expired beyond one sweep batch
        and flags whose setting failed half-way (both removed by later sweeps)."""

        def read() -> int:
            self._sweep_flags(time.time())
            return int(self._redis.zcard(self.flagged_key))

        result: int = self._read(read)
        return result

    def is_flagged(self, client_id: str) -> bool:
        """Fails open: an unreachable Redis flags nobody."""
        with self._lock:
            if not self._may_try():
                return False
            try:
                fields = self._redis.hmget(self.flag_key(client_id), ["at", "seen"])
            except REDIS_ERRORS:
                self._failed()
                return False
            return self._live_flag(list(fields), time.time()) is not None

    def clear_flag(self, client_id: str) -> bool:
        def clear() -> bool:
            keys = [self.client_key(client_id), self.flag_key(client_id)]
            cleared = bool(self._script("clear", keys, [repr(time.time()), self.ttl_s]))
            self._redis.zrem(self.flagged_key, client_id)
            return cleared

        result: bool = self._read(clear)
        return result

    def state(self) -> TrackerState:
        """Ping Redis and replay the buffer; degraded while either fails."""
        with self._lock:
            if not self._may_try():
                return "degraded"
            try:
                self._redis.ping()
                self._replay()
            except REDIS_ERRORS:
                self._failed()
                return "degraded"
            self._down = False
            return "ok"

    def buffered(self) -> int:
        return len(self._buffer)

    def close(self) -> None:
        """Replay what Redis missed while it was down, if it is back (one try: a shutdown must
        not wait out an outage), then disconnect. Updates still buffered are lost, and logged."""
        with self._lock:
            if self._buffer:
                try:
                    self._replay()
                except REDIS_ERRORS:
                    self._failed()
                if self._buffer:
                    log.warning("closing with %d client updates Redis never got", len(self._buffer))
            if self._connection is not None:
                self._connection.client.close()
                self._connection = None
