"""The in-process tracker's bounds (app.service.tracking): it stays under its cap, evicts unflagged
clients first and sweeps expired ones; over rotating ids both trackers, the in-process one and
Redis under maxmemory, keep every flag."""

from __future__ import annotations

import math
import time
from pathlib import Path

from app.service.redis_tracker import RedisTracker
from app.service.tracking import (
    SWEEP_BATCH,
    InMemoryTracker,
    Observation,
)
from tests.service.helpers import (
    RedisProcess,
    flag_policy,
    free_port,
)


def _honest(client_id: str, at: float) -> Observation:
    return Observation(client_id, 0.9, True, at)


def _attacker(client_id: str, at: float) -> Observation:
    return Observation(client_id, 0.1, False, at)  # flagged at once with min_requests=1


def test_memory_store_never_exceeds_its_cap() -> None:
    memory = InMemoryTracker(flag_policy(min_requests=1), max_clients=50)
    now = time.time()
    for i in range(1000):
        memory.record(_honest(f"id-{i}", now + i * 1e-3))
        assert len(memory) <= 50
    assert len(memory) == 50 and memory.evicted == 950
    assert memory.get("id-949") is None and memory.get("id-950") is not None  # the 50 newest


def test_memory_store_evicts_unflagged_before_flagged() -> None:
    memory = InMemoryTracker(flag_policy(min_requests=1), max_clients=10)
    now = time.time()
    for i in range(3):
        assert memory.record(_attacker(f"bad-{i}", now + i)).newly_flagged
    for i in range(30):
        memory.record(_honest(f"ok-{i}", now + 10 + i))
    assert [s.client_id for s in memory.flagged_clients()] == ["bad-0", "bad-1", "bad-2"]
    kept = [f"ok-{i}" for i in range(30) if memory.get(f"ok-{i}") is not None]
    assert kept == [f"ok-{i}" for i in range(23, 30)]  # least recently seen went first
    memory.record(_attacker("bad-0", now + 50))  # bad-0 seen again: bad-1 is now the oldest
    for i in range(8):  # 7 more flagged fill the store; the 8th evicts the oldest flagged
        memory.record(_attacker(f"new-{i}", now + 60 + i))
    assert len(memory) == 10 and memory.flagged_count() == 10
    assert memory.get("bad-1") is None and memory.is_flagged("bad-0")
    assert memory.is_flagged("bad-2") and memory.is_flagged("new-7")
    assert memory.clear_flag("bad-0")  # cleared: unflagged again, so evicted first
    memory.record(_attacker("new-8", now + 70))
    assert memory.get("bad-0") is None and memory.flagged_count() == 10


def test_memory_store_sweeps_expired_entries() -> None:
    memory = InMemoryTracker(flag_policy(min_requests=1), ttl_s=10)
    now = time.time()
    for i in range(100):
        observe = _attacker if i % 10 == 0 else _honest
        memory.record(observe(f"old-{i}", now - 100 + i * 0.01))
    assert len(memory) == 100
    later = math.ceil(100 / SWEEP_BATCH)
    for i in range(later):  # no old id comes back: each update sweeps a batch per table
        memory.record(_honest(f"new-{i}", now + i * 0.01))
    assert len(memory) == later and memory.evicted == 0
    assert memory.flagged_clients() == []


def test_rotating_ids_keep_every_flag_in_both_trackers(tmp_path: Path) -> None:
    """20,000 rotating ids, every 200th an attacker, through a capped in-process store and a
    redis-server under a small maxmemory with volatile-lru (as deployed): both stay bounded,
    both keep and list every flag, and they agree on which clients are flagged."""
    server = RedisProcess(free_port(), tmp_path)
    server.start()
    store = server.client()
    try:
        store.config_set("maxmemory-policy", "volatile-lru")
        limit = int(store.info("memory")["used_memory"]) + 1024 * 1024
        store.config_set("maxmemory", limit)
        memory = InMemoryTracker(flag_policy(min_requests=1), max_clients=2000)
        red = RedisTracker(server.url, flag_policy(min_requests=1), timeout_s=2.0)
        now = time.time()
        attackers = []
        for i in range(20_000):
            cid = f"id-{i}"
            observe = _honest
            if i % 200 == 0:
                observe = _attacker
                attackers.append(cid)
            obs = observe(cid, now + i * 1e-4)
            a, b = memory.record(obs), red.record(obs)
            assert b.stats is not None and a.newly_flagged == b.newly_flagged
            assert len(memory) <= 2000
        info = store.info()
        assert info["evicted_keys"] > 10_000
        # Redis evicts before each command: the last command's writes may stand above the limit
        assert info["used_memory"] <= limit + 16 * 1024
        assert memory.get("id-19999") is not None and memory.get("id-1") is None
        for tracker in (memory, red):
            assert [s.client_id for s in tracker.flagged_clients()] == attackers
            assert tracker.flagged_count() == len(attackers)
            assert all(tracker.is_flagged(cid) for cid in attackers)
        # Redis evicted most statistics, attackers' among them; their flags stayed
        assert any(s.requests == 0 for s in red.flagged_clients())
        assert {s.flagged_at for s in memory.flagged_clients()} == {
            s.flagged_at for s in red.flagged_clients()
        }
        red.close()
    finally:
        store.close()
        server.kill()
