"""Per-client score statistics: a ``ClientTracker`` protocol, an in-process and a Redis tracker.

Both keep, per client: lifetime requests, accepted and rejected counts, first and last seen, and
the client's score window (``app.core.flagging.ScoreWindow``: scored requests, running mean,
bias-corrected EWMA, rejections and CUSUM, advanced by ``advance_window``). Both decide flags with
the one pure rule, ``FlagPolicy.should_flag``. Clearing a flag restarts the client's window,
keeping lifetime counts.

The Redis tracker updates a client atomically with one Lua script and keeps flagged clients in a
sorted set (score: when flagged). It fails open: when Redis is unreachable, updates wait in a
bounded in-memory buffer (oldest dropped when full) and are replayed, in order, once Redis answers
again; meanwhile the tracker reports itself degraded. Socket timeouts are short and Redis is not
retried for ``retry_interval_s`` after a failure, so a dead Redis costs requests nothing.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.core.flagging import FlagPolicy, ScoreWindow, advance_window

TrackerState = Literal["ok", "degraded"]


@dataclass(frozen=True)
class Observation:
    client_id: str
    score: float
    accepted: bool
    at: float  # unix seconds


@dataclass(frozen=True)
class ClientStats:
    client_id: str
    requests: int
    accepted: int
    rejected: int
    scored: int  # requests in the current score window (restarted when a flag is cleared)
    mean_score: float
    ewma_score: float
    window_rejected: int  # rejections in the current score window
    cusum: float  # the window's CUSUM statistic (see app.core.flagging)
    first_seen: float
    last_seen: float
    flagged: bool
    flagged_at: float | None

    @property
    def window(self) -> ScoreWindow:
        return ScoreWindow(
            self.scored, self.mean_score, self.ewma_score, self.window_rejected, self.cusum
        )


@dataclass(frozen=True)
class RecordResult:
    stats: ClientStats | None  # None when the update was buffered (Redis unreachable)
    newly_flagged: bool


class TrackerUnavailableError(Exception):
    """The tracker's store cannot be reached (admin reads fail; classification does not)."""


class ClientTracker(Protocol):
    policy: FlagPolicy

    def record(self, observation: Observation) -> RecordResult: ...
    def get(self, client_id: str) -> ClientStats | None: ...
    def flagged_clients(self) -> list[ClientStats]: ...
    def flagged_count(self) -> int: ...
    def is_flagged(self, client_id: str) -> bool: ...
    def clear_flag(self, client_id: str) -> bool: ...
    def state(self) -> TrackerState: ...
    def buffered(self) -> int: ...
    def close(self) -> None: ...


def _noop() -> None:
    return None


# --------------------------------------------------------------------------- in-process


@dataclass
class _Entry:
    requests: int = 0
    accepted: int = 0
    rejected: int = 0
    window: ScoreWindow = field(default_factory=ScoreWindow)
    first_seen: float = 0.0
    last_seen: float = 0.0
    flagged_at: float | None = None

    def stats(self, client_id: str) -> ClientStats:
        return ClientStats(
            client_id=client_id,
            requests=self.requests,
            accepted=self.accepted,
            rejected=self.rejected,
            scored=self.window.scored,
            mean_score=self.window.mean,
            ewma_score=self.window.ewma,
            window_rejected=self.window.rejected,
            cusum=self.window.cusum,
            first_seen=self.first_seen,
            last_seen=self.last_seen,
            flagged=self.flagged_at is not None,
            flagged_at=self.flagged_at,
        )


class InMemoryTracker:
    """One process, one lock; entries expire ``ttl_s`` after their last request."""

    def __init__(self, policy: FlagPolicy, ttl_s: float = 7 * 24 * 3600):
        self.policy = policy
        self.ttl_s = ttl_s
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def _live(self, client_id: str, now: float) -> _Entry | None:
        entry = self._entries.get(client_id)
        if entry is not None and now - entry.last_seen > self.ttl_s:
            del self._entries[client_id]
            return None
        return entry

    def record(self, observation: Observation) -> RecordResult:
        with self._lock:
            entry = self._live(observation.client_id, observation.at)
            if entry is None:
                entry = self._entries[observation.client_id] = _Entry(first_seen=observation.at)
            entry.requests += 1
            if observation.accepted:
                entry.accepted += 1
            else:
                entry.rejected += 1
            entry.window = advance_window(
                entry.window, observation.score, observation.accepted, self.policy.window
            )
            entry.first_seen = min(entry.first_seen, observation.at)
            entry.last_seen = max(entry.last_seen, observation.at)
            newly = entry.flagged_at is None and self.policy.should_flag(entry.window)
            if newly:
                entry.flagged_at = observation.at
            return RecordResult(entry.stats(observation.client_id), newly)

    def get(self, client_id: str) -> ClientStats | None:
        with self._lock:
            entry = self._live(client_id, time.time())
            return None if entry is None else entry.stats(client_id)

    def flagged_clients(self) -> list[ClientStats]:
        now = time.time()
        with self._lock:
            found = [(cid, self._live(cid, now)) for cid in list(self._entries)]
            flagged = [e.stats(cid) for cid, e in found if e is not None and e.flagged_at]
        return sorted(flagged, key=lambda s: (s.flagged_at or 0.0, s.client_id))

    def flagged_count(self) -> int:
        return len(self.flagged_clients())

    def is_flagged(self, client_id: str) -> bool:
        stats = self.get(client_id)
        return stats is not None and stats.flagged

    def clear_flag(self, client_id: str) -> bool:
        with self._lock:
            entry = self._live(client_id, time.time())
            if entry is None or entry.flagged_at is None:
                return False
            entry.flagged_at = None
            entry.window = ScoreWindow()
            return True

    def state(self) -> TrackerState:
        return "ok"

    def buffered(self) -> int:
        return 0

    def close(self) -> None:
        return None


# --------------------------------------------------------------------------- Redis

# KEYS: client hash, flagged sorted set. ARGV: score, accepted (1/0), at, alpha, ttl seconds,
# client id, writer (this tracker's id), seq (this tracker's sequence number of the update), the
# CUSUM's reference value. The window update mirrors app.core.flagging.advance_arrays.
# Returns the updated fields (floats as strings: Lua numbers would be truncated to integers).
# Idempotent per writer: the hash keeps the last writer and its seq ('w' = "<writer>:<seq>"), and
# an update that writer already applied (its reply was lost, so it was buffered and replayed) is
# not applied twice; the current fields are returned instead.
_RECORD_LUA = """
local key = KEYS[1]
local score = tonumber(ARGV[1])
local acc = tonumber(ARGV[2])
local at = tonumber(ARGV[3])
local alpha = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local seq = tonumber(ARGV[8])
local ref = tonumber(ARGV[9])
local f = function(x) return string.format('%.17g', x) end
local v = redis.call('HMGET', key, 'requests', 'accepted', 'rejected', 'scored', 'mean', 'ewma',
                     'first_seen', 'last_seen', 'w', 'wrej', 'cusum')
if v[9] then
  local writer, last = string.match(v[9], '^(.*):(%d+)$')
  if writer == ARGV[7] and tonumber(last) >= seq then
    local flagged = redis.call('ZSCORE', KEYS[2], ARGV[6])
    return {tonumber(v[1]), tonumber(v[2]), tonumber(v[3]), tonumber(v[4]), f(tonumber(v[5])),
            f(tonumber(v[6])), f(tonumber(v[7])), f(tonumber(v[8])), flagged or false,
            tonumber(v[10]) or 0, f(tonumber(v[11]) or 0)}
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
           'last_seen', f(last_seen), 'w', ARGV[7] .. ':' .. ARGV[8], 'wrej', wrej,
           'cusum', f(cusum))
redis.call('EXPIRE', key, ttl)
local flagged_at = redis.call('ZSCORE', KEYS[2], ARGV[6])
return {requests, accepted, rejected, scored, f(mean), f(ewma), f(first_seen), f(last_seen),
        flagged_at or false, wrej, f(cusum)}
"""

_CLEAR_LUA = """
local removed = redis.call('ZREM', KEYS[2], ARGV[1])
if removed == 1 and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'scored', 0, 'mean', '0', 'ewma', '0', 'wrej', 0, 'cusum', '0')
end
return removed
"""


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisTracker:
    """Atomic Lua updates in Redis, failing open to a bounded replay buffer."""

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
        on_error: Callable[[], None] = _noop,
    ):
        self.policy = policy
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.retry_interval_s = retry_interval_s
        self.on_error = on_error
        self.flagged_key = f"{prefix}:flagged"
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._record = self._redis.register_script(_RECORD_LUA)
        self._clear = self._redis.register_script(_CLEAR_LUA)
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
        return f"{self.prefix}:client:{client_id}"

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
        An update whose reply was lost is replayed, and the script skips it (same writer, seq)."""
        while self._buffer:
            seq, observation = self._buffer[0]
            self._apply(observation, seq)
            self._buffer.popleft()

    def _apply(self, observation: Observation, seq: int) -> RecordResult:
        raw = self._record(
            keys=[self.client_key(observation.client_id), self.flagged_key],
            args=[
                repr(float(observation.score)),
                1 if observation.accepted else 0,
                repr(float(observation.at)),
                repr(self.policy.window.ewma_alpha),
                self.ttl_s,
                observation.client_id,
                self._writer,
                seq,
                repr(self.policy.window.cusum_reference),
            ],
        )
        flagged_at = None if raw[8] is None else float(_as_str(raw[8]))
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
            first_seen=float(_as_str(raw[6])),
            last_seen=float(_as_str(raw[7])),
            flagged=flagged_at is not None,
            flagged_at=flagged_at,
        )
        newly = False
        if flagged_at is None and self.policy.should_flag(stats.window):
            newly = bool(
                self._redis.zadd(self.flagged_key, {stats.client_id: observation.at}, nx=True)
            )
            stats = ClientStats(**{**stats.__dict__, "flagged": True, "flagged_at": observation.at})
        return RecordResult(stats, newly)

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
                except redis.RedisError:
                    self._failed()
            self._buffer_add(seq, observation)
            return RecordResult(None, False)

    def _read(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            try:
                return fn()
            except redis.RedisError as exc:
                self._failed()
                raise TrackerUnavailableError(f"redis: {exc}") from exc

    def _stats_from_hash(
        self, client_id: str, fields: dict[bytes, bytes], flagged_at: float | None
    ) -> ClientStats:
        def get(name: str, default: str = "0") -> str:
            return _as_str(fields.get(name.encode(), default.encode()))

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
            first_seen=float(get("first_seen")),
            last_seen=float(get("last_seen")),
            flagged=flagged_at is not None,
            flagged_at=flagged_at,
        )

    def get(self, client_id: str) -> ClientStats | None:
        def read() -> ClientStats | None:
            pipe = self._redis.pipeline(transaction=True)
            pipe.hgetall(self.client_key(client_id))
            pipe.zscore(self.flagged_key, client_id)
            fields, flagged_at = pipe.execute()
            if not fields:
                return None
            return self._stats_from_hash(client_id, fields, flagged_at)

        result: ClientStats | None = self._read(read)
        return result

    def flagged_clients(self) -> list[ClientStats]:
        def read() -> list[ClientStats]:
            members: list[tuple[bytes, float]] = list(
                self._redis.zrange(self.flagged_key, 0, -1, withscores=True)  # type: ignore[arg-type]
            )
            pipe = self._redis.pipeline(transaction=False)
            for member, _ in members:
                pipe.hgetall(self.client_key(_as_str(member)))
            hashes = pipe.execute()
            found, expired = [], []
            for (member, flagged_at), fields in zip(members, hashes, strict=True):
                client_id = _as_str(member)
                if fields:
                    found.append(self._stats_from_hash(client_id, fields, float(flagged_at)))
                else:
                    expired.append(client_id)
            if expired:  # the client's statistics expired: so does its flag
                self._redis.zrem(self.flagged_key, *expired)
            return found

        result: list[ClientStats] = self._read(read)
        return result

    def flagged_count(self) -> int:
        return int(self._read(lambda: self._redis.zcard(self.flagged_key)))

    def is_flagged(self, client_id: str) -> bool:
        """Fails open: an unreachable Redis flags nobody."""
        with self._lock:
            if not self._may_try():
                return False
            try:
                return self._redis.zscore(self.flagged_key, client_id) is not None
            except redis.RedisError:
                self._failed()
                return False

    def clear_flag(self, client_id: str) -> bool:
        keys = [self.client_key(client_id), self.flagged_key]
        return bool(self._read(lambda: self._clear(keys=keys, args=[client_id])))

    def state(self) -> TrackerState:
        """Ping Redis and replay the buffer; degraded while either fails."""
        with self._lock:
            if not self._may_try():
                return "degraded"
            try:
                self._redis.ping()
                self._replay()
            except redis.RedisError:
                self._failed()
                return "degraded"
            self._down = False
            return "ok"

    def buffered(self) -> int:
        return len(self._buffer)

    def close(self) -> None:
        self._redis.close()
