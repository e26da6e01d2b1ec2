"""The blend test in the service (``ADVGUARD_STATEFUL_BLENDS``): a decision-based attack's
binary search (a photo, a natural start, their blends) is detected at its first blend under
every policy, in process, in Redis and on a local 3-master Redis Cluster; on by default; a
Redis that is down fails open; the Redis memory reads back what the in-process one keeps."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.core.stateful.blends import BlendEntry, BlendRule, InProcessBlendMemory, sketch
from app.core.stateful.match_rule import Answer
from app.service.blend_memory import RedisBlendMemory, entry_bytes, recent_of
from app.service.main import create_app
from app.service.settings import Settings
from app.service.stateful import settings_blends
from tests.core.stateful.probes import photos  # noqa: F401 (a fixture)
from tests.service.conftest import AppFactory
from tests.service.helpers import RedisClusterProcesses, RedisProcess, admin_of, free_port
from tests.service.test_stateful import ADMIN, _settings, bodies, metric

BLENDS = {"stateful_blends": True}


@pytest.fixture
def search(photos: np.ndarray) -> np.ndarray:  # noqa: F811
    """HopSkipJump's start as the service sees it: the attacked photo, a natural start of
    another class, then the binary search's blends between them (rounded to 8 bits)."""
    x, s = photos[3].astype(np.float64), photos[7].astype(np.float64)
    blends = [np.round((1 - t) * x + t * s) for t in (0.5, 0.25, 0.375)]
    return np.stack([x, s, *blends]).astype(np.uint8)


def test_the_first_blend_is_refused_and_flags_its_client(
    make_client: AppFactory, search: np.ndarray
) -> None:
    with make_client(**_settings("refuse"), **BLENDS) as client:
        answers = bodies(client, search, ["mallory"] * len(search))
        stats = admin_of(client).get("/clients/mallory", headers=ADMIN).json()
        detected = metric(
            client, "advguard_stateful_queries_total", policy="refuse", outcome="detected"
        )
    assert [status for status, _ in answers] == [200, 200, 403, 403, 403]
    assert answers[2][1]["error"] == "query_refused"
    assert detected == 3
    assert stats["flagged"] and stats["flag_reasons"] == ["query_attack"]


def test_silent_serves_the_older_ends_answer_and_flag_answers_as_usual(
    make_client: AppFactory, search: np.ndarray
) -> None:
    with make_client(**_settings("flag"), **BLENDS) as client:
        honest = bodies(client, search, ["mallory"] * len(search))
        assert admin_of(client).get("/clients/mallory", headers=ADMIN).json()["flagged"]
    with make_client(**_settings("silent"), **BLENDS) as client:
        silent = bodies(client, search, ["mallory"] * len(search))
    assert silent[:2] == honest[:2]
    # each blend hears the photo's answer, the older end of its line, score included
    assert silent[2:] == [honest[0]] * 3
    # the test can fail: the model did not answer every blend as it answered the photo
    assert any(answer != honest[0] for answer in honest[2:])


def test_on_by_default_off_by_its_setting_and_per_client(
    make_client: AppFactory, search: np.ndarray
) -> None:
    with make_client(**_settings("refuse")) as client:
        statuses = [s for s, _ in bodies(client, search, ["mallory"] * len(search))]
        assert statuses == [200, 200, 403, 403, 403]
    with make_client(**_settings("refuse"), stateful_blends=False) as client:
        assert [s for s, _ in bodies(client, search, ["mallory"] * len(search))] == [200] * 5
    with make_client(**_settings("refuse")) as client:
        # the blend's ends came from other clients: no client sent a line's three points
        ids = ["alice", "bob", "carol", "dave", "erin"]
        assert [s for s, _ in bodies(client, search, ids)] == [200] * 5


def test_the_first_blend_is_refused_on_the_cluster(
    redis_cluster: RedisClusterProcesses, search: np.ndarray
) -> None:
    settings = Settings(
        device="cpu",
        max_wait_ms=1.0,
        redis_url=redis_cluster.url,
        redis_cluster=True,
        redis_prefix=f"test-{uuid.uuid4().hex[:12]}",
        **_settings("refuse"),
        **BLENDS,
    )
    with TestClient(create_app(settings)) as client:
        answers = bodies(client, search, ["mallory"] * len(search))
        stats = admin_of(client).get("/clients/mallory", headers=ADMIN).json()
    assert [status for status, _ in answers] == [200, 200, 403, 403, 403]
    assert stats["flag_reasons"] == ["query_attack"]


def test_redis_down_fails_open(search: np.ndarray) -> None:
    settings = Settings(
        device="cpu",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        redis_retry_interval_s=0.0,
        **_settings("refuse"),
        **BLENDS,
    )
    with TestClient(create_app(settings)) as client:
        answers = bodies(client, search, ["mallory"] * len(search))
        errors = metric(client, "advguard_stateful_queries_total", policy="refuse", outcome="error")
    assert [status for status, _ in answers] == [200] * 5
    assert errors == 5


def test_the_settings_choose_the_memory(redis_server: RedisProcess) -> None:
    def memory(**values: Any) -> object:
        app = create_app(Settings(device="cpu", **_settings("refuse"), **values))
        with TestClient(app):
            detector = app.state.service.stateful
            assert detector is not None
            return detector.blends

    assert memory(stateful_blends=False) is None
    kept = memory(stateful_blend_clients=7)
    assert isinstance(kept, InProcessBlendMemory) and kept.max_clients == 7
    assert isinstance(memory(redis_url=redis_server.url), RedisBlendMemory)


@pytest.mark.parametrize("in_redis", [False, True])
def test_a_clients_kept_queries_expire_with_the_shorter_of_the_two_ttls(
    redis_server: RedisProcess, in_redis: bool
) -> None:
    where = {"redis_url": redis_server.url} if in_redis else {}
    for everyone, own, expected in [(3600.0, 60.0, 60.0), (600.0, 86_400.0, 600.0)]:
        settings = Settings(
            device="cpu",
            **_settings("refuse"),
            **where,
            stateful_ttl_s=everyone,
            stateful_client_ttl_s=own,
        )
        memory = settings_blends(settings)
        assert isinstance(memory, RedisBlendMemory if in_redis else InProcessBlendMemory)
        assert memory.ttl_s == expected


def _entries(rng: np.random.Generator, n: int) -> list[BlendEntry]:
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    return [
        BlendEntry(sketch(image), bytes([i]) * 16, Answer("accepted", i, 0.5, -1.25) if i else None)
        for i, image in enumerate(images)
    ]


def test_a_prefix_with_a_hash_tag_is_refused() -> None:
    with pytest.raises(ValueError, match="braces"):
        RedisBlendMemory("redis://127.0.0.1:1/0", BlendRule(), prefix="a{b}")


def test_an_entry_reads_back_as_written() -> None:
    for entry in _entries(np.random.default_rng(0), 3):
        (back,) = recent_of(BlendRule(), entry_bytes(entry), 1).entries
        assert back.digest == entry.digest and back.answer == entry.answer
        assert np.array_equal(back.sketch, entry.sketch) and back.sketch.dtype == np.float16


@pytest.mark.parametrize("where", ["redis_server", "redis_cluster"])
def test_redis_keeps_what_the_in_process_memory_keeps(
    where: str, request: pytest.FixtureRequest
) -> None:
    """The same keeps read back alike from the in-process memory and from Redis: one Redis
    (a script a call) and the cluster (pipelines of plain commands)."""
    server: RedisProcess | RedisClusterProcesses = request.getfixturevalue(where)
    rule = BlendRule(window=3)
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    in_redis = RedisBlendMemory(
        server.url, rule, prefix=prefix, ttl_s=60.0, cluster=where == "redis_cluster"
    )
    in_process = InProcessBlendMemory(rule)
    entries = _entries(np.random.default_rng(1), 5)
    try:
        for memory in (in_redis, in_process):
            memory.keep({"a": entries[:2], "b": entries[2:3], "idle": []}, 0.0)
            memory.keep({"a": entries[3:], "c": entries}, 1.0)  # c: more than the window at once
        recalled = [m.recall(["a", "b", "c", "new"]) for m in (in_redis, in_process)]
        for client in ("a", "b", "c", "new"):
            got = [[(e.digest, e.answer) for e in r[client].entries] for r in recalled]
            assert got[0] == got[1]
        digests = [[e.digest for e in recalled[0][client].entries] for client in ("a", "c")]
        assert digests == [[entries[i].digest for i in kept] for kept in ([1, 3, 4], [2, 3, 4])]
        assert not recalled[0]["new"].entries and in_redis.recall([]) == {}
        ttl = in_redis.redis.pttl(in_redis.key("a"))
        assert 0 < ttl <= 60_000  # type: ignore[operator]
        assert not in_redis.redis.exists(in_redis.key("idle"))
    finally:
        in_redis.close()


@pytest.mark.parametrize("where", ["redis_server", "redis_cluster"])
def test_a_recall_leaves_out_older_entries_of_another_size(
    where: str, request: pytest.FixtureRequest
) -> None:
    """A list whose older entries came from a service of another input size reads back as its
    newest size's entries only, in order: sketches of two sizes are not comparable."""
    server: RedisProcess | RedisClusterProcesses = request.getfixturevalue(where)
    memory = RedisBlendMemory(
        server.url,
        BlendRule(),
        prefix=f"t-{uuid.uuid4().hex[:8]}",
        cluster=where == "redis_cluster",
    )
    rng = np.random.default_rng(3)
    small = [
        BlendEntry(sketch(image), bytes([40 + i]) * 16)
        for i, image in enumerate(rng.integers(0, 256, size=(2, 3, 8, 8), dtype=np.uint8))
    ]
    entries = _entries(rng, 3)
    try:
        memory.keep({"a": [entries[0], *small]}, 0.0)
        memory.keep({"a": entries[1:]}, 1.0)
        recalled = memory.recall(["a", "b"])
        assert recalled["a"].digests == [entries[i].digest for i in (0, 1, 2)]
        assert recalled["a"].answers == [entries[i].answer for i in (0, 1, 2)]
        assert np.array_equal(recalled["a"].sketches, np.stack([e.sketch for e in entries]))
        memory.keep({"b": small}, 2.0)
        assert [e.digest for e in memory.recall(["b"])["b"].entries] == [e.digest for e in small]
    finally:
        memory.close()


def test_one_redis_writes_a_batch_in_one_call_and_reads_it_in_plain_commands(
    redis_server: RedisProcess,
) -> None:
    """On one Redis, a batch's keep is one script call whatever the number of clients (the
    client's per-command cost, not the round trip, had made the test dear), and its recall
    one ``LRANGE`` a client, no script (a script's replies pass through Lua)."""
    memory = RedisBlendMemory(redis_server.url, BlendRule(), prefix=f"t-{uuid.uuid4().hex[:8]}")
    entries = _entries(np.random.default_rng(2), 4)
    clients = [f"client-{i}" for i in range(10)]
    admin = memory.redis
    try:
        memory.keep({"warm": entries}, 0.0)  # loads the script
        admin.config_resetstat()
        memory.keep({client: entries[: 1 + i % 4] for i, client in enumerate(clients)}, 1.0)
        recalled = memory.recall(clients)
        stats = admin.info("commandstats")
        assert [len(recalled[client].entries) for client in clients] == [
            1 + i % 4 for i in range(10)
        ]
        assert stats["cmdstat_evalsha"]["calls"] == 1
        assert stats["cmdstat_lrange"]["calls"] == 10
    finally:
        memory.close()
