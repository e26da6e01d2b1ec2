"""Per-client score statistics: the ``ClientTracker`` protocol and the in-process tracker; the
Redis tracker is ``app.service.redis_tracker``.

Both trackers keep, per client: lifetime requests, accepted and rejected counts, first and last
seen, and the client's score window (``app.core.flagging.ScoreWindow``: scored requests, running
mean, bias-corrected EWMA, rejections and CUSUM of its requests' flag values, advanced by
``advance_window``). Both decide flags with the one pure rule, ``FlagPolicy.should_flag``.
Clearing a flag restarts the client's window, keeping lifetime counts.

Both are bounded under client-id rotation (without API keys every ``X-Client-ID`` value is a new
client) and keep flags longest: the in-process store holds at most ``max_clients`` entries and
evicts least recently seen unflagged clients first; in Redis the statistics carry a TTL and flags
do not, so that ``maxmemory`` with ``volatile-lru`` evicts statistics and never flags.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, ParamSpec, Protocol, TypeVar

from starlette.concurrency import run_in_threadpool

from app.core.flagging import FlagPolicy, ScoreWindow, advance_window

P = ParamSpec("P")
T = TypeVar("T")

TrackerState = Literal["ok", "degraded"]
SCORE_REASON = "score"  # flagged by the flag policy's statistic of the client's scores


@dataclass(frozen=True)
class Observation:
    client_id: str
    # what the request adds to the client's score window: the guard's score, or its per-class
    # p-value when the flag policy has a class scale (``FlagPolicy.flag_value``)
    flag_value: float
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
    # what flagged the client: "score" (the flag policy's statistic), "query_attack" (the
    # stateful detector, app/service/stateful.py); a flag set by one reason gains the other's
    # only when query_attack is detected on it (a set flag's score statistic is not re-read)
    flag_reasons: tuple[str, ...] = ()
    # the window's drop below the client's own mean (ewma_shift's CUSUM, app.core.flagging)
    shift: float = 0.0

    @property
    def window(self) -> ScoreWindow:
        return ScoreWindow(
            self.scored,
            self.mean_score,
            self.ewma_score,
            self.window_rejected,
            self.cusum,
            self.shift,
        )


@dataclass(frozen=True)
class RecordResult:
    stats: ClientStats | None  # None when the update was buffered (Redis unreachable)
    newly_flagged: bool


class TrackerUnavailableError(Exception):
    """The tracker's store cannot be reached (admin reads fail; classification does not)."""


class ClientTracker(Protocol):
    policy: FlagPolicy
    blocks: bool  # a call may wait on the network: the service makes it off the event loop

    def record(self, observation: Observation) -> RecordResult: ...
    def record_many(self, observations: Sequence[Observation]) -> list[RecordResult]:
        """``record`` of each, in order (one Redis round trip where the tracker can)."""
        ...

    def get(self, client_id: str) -> ClientStats | None: ...
    def flagged_clients(self) -> list[ClientStats]: ...
    def flagged_count(self) -> int: ...
    def is_flagged(self, client_id: str) -> bool: ...
    def flag(self, client_id: str, reason: str, at: float) -> bool: ...
    def clear_flag(self, client_id: str) -> bool: ...
    def state(self) -> TrackerState: ...
    def buffered(self) -> int: ...
    def close(self) -> None: ...


async def tracker_call(
    tracker: ClientTracker, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """``call(*args, **kwargs)``, a call that uses ``tracker``, from the event loop: on a worker
    thread when the tracker may wait on the network (Redis), else right here. The in-process
    tracker holds its lock for microseconds, and the hop to a thread and back cost more than
    the call: with it on the loop instead, the guarded service without the query screening
    answered 10-16% more requests for 0.40-0.48 ms less CPU each (two interleaved runs,
    docs/service.md, Per-client tracking)."""
    if tracker.blocks:
        return await run_in_threadpool(call, *args, **kwargs)
    return call(*args, **kwargs)


def noop() -> None:
    """The trackers' default callback: nothing to tell."""
    return None


# --------------------------------------------------------------------------- in-process

DEFAULT_MAX_CLIENTS = 100_000
# Expired entries removed per update at most: more than one, so that expiry outpaces the at most
# one entry an update can add, and few, so that no single request pays for a mass expiry.
SWEEP_BATCH = 8


@dataclass(slots=True)
class _Entry:
    requests: int = 0
    accepted: int = 0
    rejected: int = 0
    window: ScoreWindow = field(default_factory=ScoreWindow)
    first_seen: float = 0.0
    last_seen: float = 0.0
    flagged_at: float | None = None
    flag_reasons: tuple[str, ...] = ()

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
            flag_reasons=self.flag_reasons,
            shift=self.window.shift,
        )


class InMemoryTracker:
    """One process, one lock, at most ``max_clients`` entries; an entry expires ``ttl_s`` after
    its client's last request.

    Without API keys every ``X-Client-ID`` value is a new client, so a client rotating ids would
    otherwise grow the store without bound (measured before the cap: ~1.3 KB per id, and an entry
    only expired when its id came back). Entries live in two recency-ordered tables, unflagged
    and flagged (oldest update first). Each update sweeps up to ``SWEEP_BATCH`` expired entries
    from the old end of each table, and a new client that finds the store full evicts the least
    recently updated *unflagged* client, a flagged one only when every entry is flagged: flags are
    what the refuse policy acts on, so they are kept longest.
    """

    def __init__(
        self,
        policy: FlagPolicy,
        ttl_s: float = 7 * 24 * 3600,
        max_clients: int = DEFAULT_MAX_CLIENTS,
    ):
        if max_clients < 1:
            raise ValueError(f"max_clients must be at least 1, got {max_clients}")
        self.policy = policy
        self.blocks = False  # one lock held for microseconds, no I/O
        self.ttl_s = ttl_s
        self.max_clients = max_clients
        self.evicted = 0  # entries removed to make room (not by expiry)
        self._unflagged: OrderedDict[str, _Entry] = OrderedDict()
        self._flagged: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._unflagged) + len(self._flagged)

    def _table(self, entry: _Entry) -> OrderedDict[str, _Entry]:
        return self._unflagged if entry.flagged_at is None else self._flagged

    def _expired(self, entry: _Entry, now: float) -> bool:
        return now - entry.last_seen > self.ttl_s

    def _live(self, client_id: str, now: float) -> _Entry | None:
        entry = self._unflagged.get(client_id) or self._flagged.get(client_id)
        if entry is not None and self._expired(entry, now):
            del self._table(entry)[client_id]
            return None
        return entry

    def _sweep(self, now: float) -> None:
        """Drop expired entries from the old end of each table, ``SWEEP_BATCH`` at most each."""
        for table in (self._unflagged, self._flagged):
            for _ in range(SWEEP_BATCH):
                oldest = next(iter(table.items()), None)
                if oldest is None or not self._expired(oldest[1], now):
                    break
                del table[oldest[0]]

    def _make_room(self) -> None:
        """Evict least recently updated clients, unflagged first, until one more fits."""
        while len(self) >= self.max_clients:
            table = self._unflagged or self._flagged
            table.popitem(last=False)
            self.evicted += 1

    def record(self, observation: Observation) -> RecordResult:
        with self._lock:
            self._sweep(observation.at)
            entry = self._live(observation.client_id, observation.at)
            if entry is None:
                self._make_room()
                entry = self._unflagged[observation.client_id] = _Entry(first_seen=observation.at)
            entry.requests += 1
            if observation.accepted:
                entry.accepted += 1
            else:
                entry.rejected += 1
            entry.window = advance_window(
                entry.window, observation.flag_value, observation.accepted, self.policy.window
            )
            entry.first_seen = min(entry.first_seen, observation.at)
            entry.last_seen = max(entry.last_seen, observation.at)
            newly = entry.flagged_at is None and self.policy.should_flag(entry.window)
            if newly:
                self._set_flag(observation.client_id, entry, SCORE_REASON, observation.at)
            self._table(entry).move_to_end(observation.client_id)
            return RecordResult(entry.stats(observation.client_id), newly)

    def record_many(self, observations: Sequence[Observation]) -> list[RecordResult]:
        return [self.record(observation) for observation in observations]

    def _set_flag(self, client_id: str, entry: _Entry, reason: str, at: float) -> bool:
        """Flag an unflagged entry (True), or add ``reason`` to its flag's reasons (False)."""
        if entry.flagged_at is not None:
            if reason not in entry.flag_reasons:
                entry.flag_reasons = (*entry.flag_reasons, reason)
            return False
        del self._unflagged[client_id]
        entry.flagged_at = at
        entry.flag_reasons = (reason,)
        self._flagged[client_id] = entry
        return True

    def flag(self, client_id: str, reason: str, at: float) -> bool:
        """Flag a client for ``reason`` (a query attack); True when this call set the flag. A
        client the tracker no longer holds starts an entry with no requests."""
        with self._lock:
            entry = self._live(client_id, at)
            if entry is None:
                self._make_room()
                entry = self._unflagged[client_id] = _Entry(first_seen=at, last_seen=at)
            newly = self._set_flag(client_id, entry, reason, at)
            self._table(entry).move_to_end(client_id)
            return newly

    def get(self, client_id: str) -> ClientStats | None:
        with self._lock:
            entry = self._live(client_id, time.time())
            return None if entry is None else entry.stats(client_id)

    def flagged_clients(self) -> list[ClientStats]:
        now = time.time()
        with self._lock:
            found = [(cid, self._live(cid, now)) for cid in list(self._flagged)]
            flagged = [e.stats(cid) for cid, e in found if e is not None]
        return sorted(flagged, key=lambda s: (s.flagged_at or 0.0, s.client_id))

    def flagged_count(self) -> int:
        return len(self.flagged_clients())

    def is_flagged(self, client_id: str) -> bool:
        stats = self.get(client_id)
        return stats is not None and stats.flagged

    def clear_flag(self, client_id: str) -> bool:
        """Unflag and restart the window; the client then counts as just updated."""
        with self._lock:
            entry = self._live(client_id, time.time())
            if entry is None or entry.flagged_at is None:
                return False
            del self._flagged[client_id]
            entry.flagged_at = None
            entry.flag_reasons = ()
            entry.window = ScoreWindow()
            self._unflagged[client_id] = entry
            return True

    def state(self) -> TrackerState:
        return "ok"

    def buffered(self) -> int:
        return 0

    def close(self) -> None:
        return None
