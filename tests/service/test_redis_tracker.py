"""The Redis tracker (app.service.redis_tracker) without HTTP: it agrees with the in-process
tracker update for update, on a single redis-server and on a local 3-master Redis Cluster; an
outage buffers updates and replays them; a flag is kept through it; a service on a cluster
flags, refuses, lists and clears."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from redis.crc import key_slot

from app.core.flagging import FlagPolicy, WindowParams
from app.service.main import create_app
from app.service.redis_connection import hash_tag
from app.service.redis_tracker import RedisTracker
from app.service.settings import Settings
from app.service.tracking import (
    ClientStats,
    InMemoryTracker,
    Observation,
    RecordResult,
)
from tests.service.helpers import (
    LabelledImage,
    RedisClusterProcesses,
    RedisProcess,
    admin_of,
    flag_policy,
    free_cluster_port,
    free_port,
    upload,
)


@dataclass(frozen=True)
class Backend:
    """Where a Redis tracker keeps its state: one redis-server, or a Redis Cluster."""

    url: str
    cluster: bool

    def tracker(self, policy: FlagPolicy, **options: object) -> RedisTracker:
        return RedisTracker(
            self.url,
            policy,
            prefix=uuid.uuid4().hex,
            cluster=self.cluster,
            **options,  # type: ignore[arg-type]
        )


@pytest.fixture(params=["redis", "cluster"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "redis":
        server: RedisProcess = request.getfixturevalue("redis_server")
        return Backend(server.url, cluster=False)
    cluster: RedisClusterProcesses = request.getfixturevalue("redis_cluster")
    return Backend(cluster.url, cluster=True)


def _trackers(
    backend: Backend, policy: FlagPolicy | None = None
) -> tuple[InMemoryTracker, RedisTracker]:
    policy = policy or flag_policy()
    return InMemoryTracker(policy), backend.tracker(policy)


def _assert_same(a: ClientStats | None, b: ClientStats | None) -> None:
    """Equal statistics; floats to 1e-12 (Lua's and Python's arithmetic may differ in the last
    bit, e.g. the EWMA's power)."""
    assert (a is None) == (b is None)
    if a is None or b is None:
        return
    for name, value in a.__dict__.items():
        other = b.__dict__[name]
        if isinstance(value, float):
            assert other == pytest.approx(value, abs=1e-12), name
        else:
            assert other == value, name


def _assert_same_result(a: RecordResult, b: RecordResult) -> None:
    assert a.newly_flagged == b.newly_flagged
    _assert_same(a.stats, b.stats)


@pytest.mark.parametrize(
    "policy",
    [
        flag_policy(),
        flag_policy("ewma", 0.3),
        flag_policy("rejection_rate", 3.0),
        flag_policy("cusum", 0.3),
        # read from the same window, started at an honest mean above this client's 0.375
        FlagPolicy("ewma_anchored", 0.42, 3, WindowParams(0.05, 0.35, anchor=0.5)),
        # flagged by its shift (the EWMA's threshold is out of reach): the drop below the
        # client's own mean, which the script keeps beside the CUSUM
        FlagPolicy(
            "ewma_shift",
            -1.0,
            3,
            WindowParams(0.05, 0.35, shift_allowance=0.05),
            shift_threshold=0.3,
        ),
    ],
    ids=lambda p: p.kind,
)
def test_trackers_agree(backend: Backend, policy: FlagPolicy) -> None:
    """The Lua window update equals app.core.flagging's, so both trackers flag alike."""
    memory, red = _trackers(backend, policy)
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
        assert a.stats.shift == pytest.approx(b.stats.shift, abs=1e-12)
        assert a.stats.flagged == b.stats.flagged
    assert sum(newly) == 1  # every policy above flags this client, once
    stats = red.get("c")
    assert stats is not None and stats.first_seen == now and stats.last_seen == now + 39
    assert stats.accepted + stats.rejected == 40
    assert memory.get("c") == stats


def test_a_batch_of_updates_gives_what_one_at_a_time_gives(backend: Backend) -> None:
    """``record_many`` (one pipelined round trip on one Redis, one script at a time on a
    cluster) returns the results, flags included, that ``record`` gives one update at a time,
    and leaves the same statistics."""
    policy = flag_policy("cusum", 0.3)
    one, many, memory = backend.tracker(policy), backend.tracker(policy), InMemoryTracker(policy)
    rng = np.random.default_rng(3)
    now = time.time()
    updates = [
        Observation(f"c{i % 3}", float(score), bool(score > 0.3), now + i)
        for i, score in enumerate(rng.uniform(0.15, 0.6, 30))
    ]
    singles = [one.record(update) for update in updates]
    batched = [r for i in range(0, 30, 7) for r in many.record_many(updates[i : i + 7])]
    in_memory = memory.record_many(updates)
    assert sum(r.newly_flagged for r in singles) >= 1
    for a, b, c in zip(singles, batched, in_memory, strict=True):
        _assert_same_result(a, b)
        _assert_same_result(a, c)
    for client in ("c0", "c1", "c2"):
        _assert_same(one.get(client), many.get(client))


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test's own, to kill, pause and restart; gone at the end."""
    server = RedisProcess(free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def outage_tracker(server: RedisProcess, **options: Any) -> RedisTracker:
    """A tracker of ``server`` that tries Redis again at once and times out fast (0.1 s):
    outages are seen and left within a test's time."""
    return RedisTracker(
        server.url, flag_policy(), **{"retry_interval_s": 0.0, "timeout_s": 0.1, **options}
    )


def test_a_batch_is_buffered_while_redis_is_down_and_replayed(own_redis: RedisProcess) -> None:
    server = own_redis
    tracker = outage_tracker(server)
    try:
        tracker.record_many([Observation("x", 0.5, True, 0.0), Observation("y", 0.5, True, 0.0)])
        server.kill()
        down = tracker.record_many([Observation("x", 0.5, True, float(i)) for i in (1, 2, 3)])
        assert [r.stats for r in down] == [None, None, None] and tracker.buffered() == 3
        server.start()
        assert tracker.state() == "ok" and tracker.buffered() == 0
        stats = tracker.get("x")  # the server kept nothing: the replayed three alone
        assert stats is not None and stats.requests == 3
        assert (stats.first_seen, stats.last_seen) == (1.0, 3.0)
    finally:
        tracker.close()


def test_ewma_is_bias_corrected_and_mean_exact(redis_server: RedisProcess) -> None:
    now = time.time()
    for tracker in _trackers(Backend(redis_server.url, cluster=False)):
        tracker.record(Observation("e", 0.8, True, now))
        first = tracker.get("e")
        assert first is not None and first.ewma_score == pytest.approx(0.8)
        tracker.record(Observation("e", 0.2, True, now + 1))
        second = tracker.get("e")
        assert second is not None and second.mean_score == pytest.approx(0.5)
        assert 0.2 < second.ewma_score < 0.5  # the newer score weighs more


def test_clients_expire(backend: Backend) -> None:
    memory = InMemoryTracker(flag_policy(min_requests=1), ttl_s=10)
    memory.record(Observation("old", 0.1, False, time.time() - 60))
    assert memory.get("old") is None and memory.flagged_clients() == []
    red = backend.tracker(flag_policy(min_requests=1), ttl_s=1)
    red.record(Observation("old", 0.1, False, time.time()))
    assert red.is_flagged("old")
    time.sleep(1.2)
    assert red.get("old") is None and not red.is_flagged("old")
    assert red.flagged_clients() == [] and red.flagged_count() == 0
    assert not red.clear_flag("old")


@pytest.mark.parametrize("protocol", [None, 2, 3])
def test_an_expired_flag_leaves_the_index_whichever_protocol_the_client_speaks(
    redis_server: RedisProcess, protocol: int | None
) -> None:
    """The sweep reads an index entry's score and removes the entry only if the score is still
    the one read. Through redis-py 8.2's default connection (``protocol`` None) the score came
    back as 1.7963576455901356e+9 where the script's ZSCORE read 1796357645.5901356: compared as
    text, an expired flag's entry was never removed and the flagged count only grew. Also with
    RESP2 and RESP3 asked for in the URL."""
    tracker = RedisTracker(
        redis_server.url if protocol is None else f"{redis_server.url}?protocol={protocol}",
        flag_policy(min_requests=1),
        prefix=uuid.uuid4().hex,
        ttl_s=1,
    )
    for client in ("a", "b", "c"):
        tracker.record(Observation(client, 0.1, False, time.time()))
    assert tracker.flagged_count() == 3
    time.sleep(1.2)
    assert tracker.flagged_count() == 0
    assert redis.Redis.from_url(redis_server.url).zcard(tracker.flagged_key) == 0


def test_buffer_is_bounded_and_replayed(own_redis: RedisProcess) -> None:
    server = own_redis
    errors: list[int] = []
    tracker = outage_tracker(server, buffer_size=5, on_error=lambda: errors.append(1))
    try:
        server.kill()
        for i in range(8):
            started = time.perf_counter()
            assert tracker.record(Observation("x", 0.5, True, float(i))).stats is None
            assert time.perf_counter() - started < 0.5
        assert tracker.buffered() == 5 and tracker.state() == "degraded"
        assert len(errors) >= 3  # failures and the 3 dropped updates
        server.start()
        assert tracker.state() == "ok" and tracker.buffered() == 0
        stats = tracker.get("x")
        assert stats is not None and stats.requests == 5  # the 5 newest survived
        assert stats.first_seen == 3.0 and stats.last_seen == 7.0
    finally:
        tracker.close()


def test_a_client_flagged_by_a_replayed_update_is_reported_once(own_redis: RedisProcess) -> None:
    """Updates buffered while Redis was down flag their client when replayed: no request waits
    for those results, so the tracker reports the flag itself (the flagged-clients counter)."""
    server = own_redis
    reported: list[int] = []
    tracker = outage_tracker(server, buffer_size=20, on_replayed_flag=lambda: reported.append(1))
    try:
        server.kill()
        now = time.time()
        for i in range(5):  # mean score 0.1 < 0.4 from the 3rd request on
            assert tracker.record(Observation("low", 0.1, False, now + i)).stats is None
        assert reported == [] and tracker.buffered() == 5
        server.start()
        assert tracker.state() == "ok" and tracker.buffered() == 0
        assert tracker.is_flagged("low") and reported == [1]
        result = tracker.record(Observation("low", 0.1, False, now + 5))  # flagged already
        assert result.stats is not None and result.stats.flagged and not result.newly_flagged
        assert reported == [1]
    finally:
        tracker.close()


def test_closing_replays_what_an_outage_buffered_when_redis_is_back(
    own_redis: RedisProcess,
) -> None:
    """A shutdown after an outage used to drop the buffered updates even with Redis back."""
    server = own_redis
    tracker = outage_tracker(server, retry_interval_s=60.0)
    now = time.time()
    tracker.record(Observation("late", 0.5, True, now))
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)  # unresponsive, its data kept
    for i in range(1, 4):
        tracker.record(Observation("late", 0.5, True, now + i))
    assert tracker.buffered() == 3
    server.process.send_signal(signal.SIGCONT)  # back, not retried within the 60 s interval
    tracker.close()
    assert tracker.buffered() == 0
    assert server.client().hget(tracker.client_key("late"), "requests") == "4"
    server.kill()  # still down at the next close: one try, the loss kept and logged
    tracker.record(Observation("late", 0.5, True, now + 5))
    started = time.perf_counter()
    tracker.close()
    assert tracker.buffered() == 1 and time.perf_counter() - started < 2.0


def test_a_flagged_client_is_not_refused_while_redis_does_not_answer(
    own_redis: RedisProcess,
) -> None:
    """Fail open: a client flagged in Redis reads as not flagged while Redis hangs (no error, no
    wait past the timeout), and as flagged again once it answers."""
    server = own_redis
    tracker = outage_tracker(server)
    now = time.time()
    try:
        for i in range(3):
            tracker.record(Observation("low", 0.1, False, now + i))
        assert tracker.is_flagged("low")
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)
        started = time.perf_counter()
        assert not tracker.is_flagged("low")
        assert time.perf_counter() - started < 2.0
        server.process.send_signal(signal.SIGCONT)
        assert tracker.is_flagged("low")
    finally:
        tracker.close()


def test_the_service_counts_clients_flagged_by_replayed_updates() -> None:
    from app.service.main import build_tracker
    from app.service.metrics import Metrics
    from app.service.settings import Settings

    metrics = Metrics()
    settings = Settings(redis_url="redis://127.0.0.1:1/0", stateful_enabled=False)
    tracker = build_tracker(settings, flag_policy(), metrics)
    assert isinstance(tracker, RedisTracker)
    tracker.on_replayed_flag()
    assert metrics.registry.get_sample_value("advguard_clients_flagged_total") == 1.0


def test_many_clients_agree_on_flags_listing_and_clearing(backend: Backend) -> None:
    """Interleaved clients over many slots (ids with braces and '%' among them): every update,
    the flagged list, clearing and the state after it are the same in both trackers."""
    memory, red = _trackers(backend, flag_policy("cusum", 0.3))
    ids = [f"client-{i}" for i in range(40)] + ["", "{", "}", "{x}", "%7D", "%", "a b:c"]
    rng = np.random.default_rng(1)
    now = time.time()
    for step in range(600):
        index = int(rng.integers(len(ids)))
        attacker = index % 3 == 0
        score = float(rng.uniform(0.05, 0.3) if attacker else rng.uniform(0.3, 0.7))
        obs = Observation(ids[index], score, score > 0.25, now + step * 0.001)
        _assert_same_result(memory.record(obs), red.record(obs))
    flagged = memory.flagged_clients()
    assert len(flagged) >= 10  # most attackers
    assert [s.client_id for s in red.flagged_clients()] == [s.client_id for s in flagged]
    for a, b in zip(flagged, red.flagged_clients(), strict=True):
        _assert_same(a, b)
    assert red.flagged_count() == memory.flagged_count() == len(flagged)
    for stats in flagged[::2]:
        assert memory.clear_flag(stats.client_id) and red.clear_flag(stats.client_id)
    assert not red.clear_flag(flagged[0].client_id)  # cleared already
    assert red.flagged_count() == memory.flagged_count() == len(flagged) - len(flagged[::2])
    for cid in ids:
        _assert_same(memory.get(cid), red.get(cid))
        assert memory.is_flagged(cid) == red.is_flagged(cid)
    slots = {key_slot(red.client_key(cid).encode()) for cid in ids}
    assert len(slots) > 30  # spread over the cluster, not one slot
    red.close()


def test_keys_of_one_client_share_a_slot() -> None:
    """Every script touches one client's keys only: they must hash to one cluster slot, whatever
    the id (braces would otherwise end the hash tag early, and an empty tag hashes the key)."""
    tracker = RedisTracker("redis://127.0.0.1:1/0", flag_policy())
    for cid in ["alice", "", "{", "}", "}{", "{}", "a}b{c", "%", "%7B", "10.0.0.1", "::1"]:
        assert key_slot(tracker.client_key(cid).encode()) == key_slot(
            tracker.flag_key(cid).encode()
        )
    tags = [hash_tag(cid) for cid in ["", "%", "{", "%7B", "}", "%7D"]]
    assert len(set(tags)) == len(tags)  # one-to-one
    with pytest.raises(ValueError, match="braces"):
        RedisTracker("redis://127.0.0.1:1/0", flag_policy(), prefix="a{b")


def test_cluster_buffer_is_bounded_and_replayed(redis_cluster: RedisClusterProcesses) -> None:
    """The master holding a client's slot dies: updates are buffered (fast), flags elsewhere are
    still read, and the buffer is replayed when the node is back."""
    errors: list[int] = []
    tracker = Backend(redis_cluster.url, cluster=True).tracker(
        flag_policy(min_requests=1),
        retry_interval_s=0.0,
        buffer_size=5,
        timeout_s=0.1,
        on_error=lambda: errors.append(1),
    )
    port = redis_cluster.port_of_slot(key_slot(tracker.client_key("x").encode()))
    other = next(f"y{i}" for i in range(100) if _port_of(redis_cluster, tracker, f"y{i}") != port)
    tracker.record(Observation(other, 0.1, False, time.time()))
    assert tracker.is_flagged(other)
    redis_cluster.kill_node(port)
    try:
        for i in range(8):
            started = time.perf_counter()
            assert tracker.record(Observation("x", 0.5, True, float(i))).stats is None
            assert time.perf_counter() - started < 0.5
        assert tracker.buffered() == 5 and tracker.state() == "degraded"
        assert not tracker.is_flagged("x")  # fails open
        assert tracker.is_flagged(other)  # its node is up
        assert len(errors) >= 3
    finally:
        redis_cluster.start_node(port)
        redis_cluster.wait_ok()
    deadline = time.monotonic() + 30
    while tracker.state() != "ok":
        assert time.monotonic() < deadline, "the tracker never recovered"
        time.sleep(0.1)
    assert tracker.buffered() == 0
    stats = tracker.get("x")
    assert stats is not None and stats.requests == 5  # the 5 newest survived
    assert stats.first_seen == 3.0 and stats.last_seen == 7.0
    tracker.close()


def test_cluster_down_at_start_fails_open() -> None:
    """The cluster client connects when created: the tracker creates it on first use, so a
    cluster unreachable at start-up buffers updates and flags nobody instead of failing."""
    tracker = RedisTracker(
        f"redis://127.0.0.1:{free_cluster_port()}/0",
        flag_policy(),
        cluster=True,
        retry_interval_s=0,
    )
    started = time.perf_counter()
    assert tracker.record(Observation("a", 0.1, False, time.time())).stats is None
    assert tracker.state() == "degraded" and not tracker.is_flagged("a")
    assert tracker.buffered() == 1 and time.perf_counter() - started < 1.0
    tracker.close()


def _port_of(cluster: RedisClusterProcesses, tracker: RedisTracker, client_id: str) -> int:
    return cluster.port_of_slot(key_slot(tracker.client_key(client_id).encode()))


def test_service_on_a_cluster_flags_refuses_lists_and_clears(
    redis_cluster: RedisClusterProcesses, test_images: list[LabelledImage]
) -> None:
    """ADVGUARD_REDIS_CLUSTER=true: the service end to end (the admin API's listing included)."""
    admin = {"X-Admin-Token": "s3cret"}
    settings = Settings(
        device="cpu",
        max_wait_ms=1.0,
        redis_url=redis_cluster.url,
        stateful_secret="test-secret",  # type: ignore[arg-type]
        redis_cluster=True,
        redis_prefix=f"test-{uuid.uuid4().hex[:12]}",
        flag_policy="mean",
        flag_threshold=1.0,  # every score is below: flagged after 3 scored requests
        flag_min_requests=3,
        admin_token="s3cret",  # type: ignore[arg-type]
        policy="refuse",
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json()["tracker"] == "ok"
        for cid in ("mallory", "trudy"):
            codes = [
                upload(client, image.data, {"X-Client-ID": cid}).status_code
                for image in test_images[:4]
            ]
            assert codes == [200, 200, 200, 403]
        listed = admin_of(client).get("/clients?flagged=true", headers=admin).json()["clients"]
        assert sorted(c["client_id"] for c in listed) == ["mallory", "trudy"]
        assert all(c["requests"] == 3 and c["flagged"] for c in listed)
        assert "advguard_flagged_clients 2.0" in admin_of(client).get("/metrics").text
        cleared = admin_of(client).delete("/clients/mallory/flag", headers=admin).json()
        assert cleared == {"client_id": "mallory", "cleared": True}
        stats = admin_of(client).get("/clients/mallory", headers=admin).json()
        assert not stats["flagged"] and stats["scored"] == 0 and stats["requests"] == 3
        listed = admin_of(client).get("/clients?flagged=true", headers=admin).json()["clients"]
        assert [c["client_id"] for c in listed] == ["trudy"]
