"""The trackers and the flagging rule, without HTTP: both trackers agree, the rule is pure."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
import torch

from app.core.flagging import FlagPolicy, WindowParams
from app.core.guard import Guard
from app.service.batcher import Batcher, BatcherClosedError, QueueFullError
from app.service.tracking import InMemoryTracker, Observation, RedisTracker
from tests.service.helpers import RedisProcess, free_port


def _policy(kind: str = "mean", threshold: float = 0.4, min_requests: int = 3) -> FlagPolicy:
    return FlagPolicy(kind, threshold, min_requests, WindowParams(0.05, 0.35))  # type: ignore[arg-type]


def _trackers(
    redis_url: str, policy: FlagPolicy | None = None
) -> tuple[InMemoryTracker, RedisTracker]:
    policy = policy or _policy()
    return InMemoryTracker(policy), RedisTracker(redis_url, policy, prefix=uuid.uuid4().hex)


@pytest.mark.parametrize(
    "policy",
    [_policy(), _policy("ewma", 0.3), _policy("rejection_rate", 3.0), _policy("cusum", 0.3)],
    ids=lambda p: p.kind,
)
def test_trackers_agree(redis_server: RedisProcess, policy: FlagPolicy) -> None:
    """The Lua window update equals app.core.flagging's, so both trackers flag alike."""
    memory, red = _trackers(redis_server.url, policy)
    rng = np.random.default_rng(0)
    now = time.time()
    newly = []
    for i, score in enumerate(rng.uniform(0.15, 0.6, 40)):
        obs = Observation("c", float(score), bool(score > 0.3), now + i)
        a, b = memory.record(obs), red.record(obs)
        assert a.newly_flagged == b.newly_flagged
        newly.append(a.newly_flagged)
        assert a.stats is not None and b.stats is not None
        assert a.stats.requests == b.stats.requests == i + 1
        assert a.stats.mean_score == pytest.approx(b.stats.mean_score, abs=1e-12)
        assert a.stats.ewma_score == pytest.approx(b.stats.ewma_score, abs=1e-12)
        assert a.stats.window_rejected == b.stats.window_rejected
        assert a.stats.cusum == pytest.approx(b.stats.cusum, abs=1e-12)
        assert a.stats.flagged == b.stats.flagged
    assert sum(newly) == 1  # every policy above flags this client, once
    stats = red.get("c")
    assert stats is not None and stats.first_seen == now and stats.last_seen == now + 39
    assert stats.accepted + stats.rejected == 40
    assert memory.get("c") == stats


def test_ewma_is_bias_corrected_and_mean_exact(redis_server: RedisProcess) -> None:
    now = time.time()
    for tracker in _trackers(redis_server.url):
        tracker.record(Observation("e", 0.8, True, now))
        first = tracker.get("e")
        assert first is not None and first.ewma_score == pytest.approx(0.8)
        tracker.record(Observation("e", 0.2, True, now + 1))
        second = tracker.get("e")
        assert second is not None and second.mean_score == pytest.approx(0.5)
        assert 0.2 < second.ewma_score < 0.5  # the newer score weighs more


def test_clients_expire(redis_server: RedisProcess) -> None:
    memory = InMemoryTracker(_policy(min_requests=1), ttl_s=10)
    memory.record(Observation("old", 0.1, False, time.time() - 60))
    assert memory.get("old") is None and memory.flagged_clients() == []
    red = RedisTracker(redis_server.url, _policy(min_requests=1), prefix=uuid.uuid4().hex, ttl_s=1)
    red.record(Observation("old", 0.1, False, time.time()))
    assert red.is_flagged("old")
    time.sleep(1.2)
    assert red.get("old") is None
    assert red.flagged_clients() == [] and red.flagged_count() == 0


def test_buffer_is_bounded_and_replayed(tmp_path: object) -> None:
    server = RedisProcess(free_port(), __import__("pathlib").Path(str(tmp_path)))
    server.start()
    errors: list[int] = []
    tracker = RedisTracker(
        server.url,
        _policy(),
        retry_interval_s=0.0,
        buffer_size=5,
        timeout_s=0.1,
        on_error=lambda: errors.append(1),
    )
    try:
        server.kill()
        for i in range(8):
            started = time.perf_counter()
            assert tracker.record(Observation("x", 0.5, True, float(i))).stats is None
            assert time.perf_counter() - started < 0.5
        assert tracker.buffered() == 5 and tracker.state() == "degraded"
        assert not tracker.is_flagged("x")  # fails open
        assert len(errors) >= 3  # failures and the 3 dropped updates
        server.start()
        assert tracker.state() == "ok" and tracker.buffered() == 0
        stats = tracker.get("x")
        assert stats is not None and stats.requests == 5  # the 5 newest survived
        assert stats.first_seen == 3.0 and stats.last_seen == 7.0
    finally:
        tracker.close()
        server.kill()


class _SlowGuard:
    """Stands in for a Guard: records batch sizes, blocks until released."""

    def __init__(self, real: Guard) -> None:
        self.real = real
        self.sizes: list[int] = []
        self.release = __import__("threading").Event()

    def infer(self, pixels: torch.Tensor):  # type: ignore[no-untyped-def]
        self.release.wait(10)
        self.sizes.append(int(pixels.shape[0]))
        return self.real.infer(pixels)

    def score(self, batch):  # type: ignore[no-untyped-def]
        return self.real.score(batch)

    def decide(self, batch, scores):  # type: ignore[no-untyped-def]
        return self.real.decide(batch, scores)


def test_batcher_batches_bounds_and_drains(guard: Guard) -> None:
    slow = _SlowGuard(guard)
    batcher = Batcher(slow, max_batch_size=4, max_wait_s=0.05, queue_size=6)  # type: ignore[arg-type]
    batcher.start()
    pixels = torch.rand(3, 32, 32)
    futures = [batcher.submit(pixels)]
    time.sleep(0.1)  # the worker holds the first item, blocked in infer
    futures += [batcher.submit(pixels) for _ in range(6)]
    with pytest.raises(QueueFullError):
        batcher.submit(pixels)
    slow.release.set()
    batcher.stop()  # drains everything queued
    with pytest.raises(BatcherClosedError):
        batcher.submit(pixels)
    results = [f.result(timeout=10) for f in futures]
    assert slow.sizes == [1, 4, 2]
    assert [r.batch_size for r in results] == [1, 4, 4, 4, 4, 2, 2]
    first = results[0].verdict
    assert all(r.verdict.predicted_class == first.predicted_class for r in results)
    assert all(r.verdict.score == pytest.approx(first.score, abs=1e-5) for r in results)
