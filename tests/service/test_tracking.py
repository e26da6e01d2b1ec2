"""The trackers and the flagging rule, without HTTP: both trackers agree, the rule is pure."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
import torch

from app.core.flagging import (
    FlagRule,
    flag_threshold_from_quantiles,
    flag_threshold_from_scores,
    should_flag,
)
from app.core.guard import Guard
from app.service.batcher import Batcher, BatcherClosedError, QueueFullError
from app.service.tracking import InMemoryTracker, Observation, RedisTracker
from tests.service.helpers import RedisProcess, free_port


def test_should_flag_rule() -> None:
    rule = FlagRule(threshold=0.3, min_requests=5)
    assert not should_flag(4, 0.0, rule)
    assert should_flag(5, 0.29, rule)
    assert not should_flag(5, 0.3, rule)
    assert not should_flag(100, 0.9, rule)
    with pytest.raises(ValueError):
        FlagRule(threshold=0.3, min_requests=0)


def test_default_threshold_from_bundle_calibration(guard: Guard) -> None:
    from app.service.settings import DEFAULT_BUNDLE

    calibration = guard.manifest.calibration
    scores = np.load(DEFAULT_BUNDLE / calibration.scores_file)
    from_file = flag_threshold_from_scores(scores, 0.30)
    assert np.mean(scores < from_file) == pytest.approx(0.30, abs=0.01)
    assert flag_threshold_from_scores(scores, 0.25) == pytest.approx(
        calibration.quantiles["0.25"], abs=1e-6
    )
    # the manifest's quantile table gives nearly the same value without the file
    assert flag_threshold_from_quantiles(calibration.quantiles, 0.30) == pytest.approx(
        from_file, abs=0.02
    )
    assert calibration.threshold < from_file < calibration.mean


def _trackers(redis_url: str) -> tuple[InMemoryTracker, RedisTracker]:
    rule = FlagRule(threshold=0.4, min_requests=3)
    return InMemoryTracker(rule), RedisTracker(redis_url, rule, prefix=uuid.uuid4().hex)


def test_trackers_agree(redis_server: RedisProcess) -> None:
    memory, red = _trackers(redis_server.url)
    rng = np.random.default_rng(0)
    now = time.time()
    for i, score in enumerate(rng.uniform(0.2, 0.6, 40)):
        obs = Observation("c", float(score), bool(score > 0.3), now + i)
        a, b = memory.record(obs), red.record(obs)
        assert a.newly_flagged == b.newly_flagged
        assert a.stats is not None and b.stats is not None
        assert a.stats.requests == b.stats.requests == i + 1
        assert a.stats.mean_score == pytest.approx(b.stats.mean_score, abs=1e-12)
        assert a.stats.ewma_score == pytest.approx(b.stats.ewma_score, abs=1e-12)
        assert a.stats.flagged == b.stats.flagged
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
    memory = InMemoryTracker(FlagRule(0.4, 1), ttl_s=10)
    memory.record(Observation("old", 0.1, False, time.time() - 60))
    assert memory.get("old") is None and memory.flagged_clients() == []
    red = RedisTracker(redis_server.url, FlagRule(0.4, 1), prefix=uuid.uuid4().hex, ttl_s=1)
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
        FlagRule(0.4, 3),
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
