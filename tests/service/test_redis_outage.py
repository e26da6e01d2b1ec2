"""Redis killed in the middle of a stream: the service fails open, reports degraded, buffers the
updates and replays them when Redis returns, so the counts equal the requests sent."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.service.main import create_app
from app.service.settings import Settings
from tests.service.helpers import LabelledImage, RedisProcess, admin_of, free_port, upload

ADMIN = {"X-Admin-Token": "s3cret"}


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """Its own redis-server with an fsync-always AOF, so SIGKILL loses nothing already written."""
    server = RedisProcess(free_port(), tmp_path, persistent=True)
    server.start()
    yield server
    server.kill()


def test_redis_outage(persistent_redis: RedisProcess, test_images: list[LabelledImage]) -> None:
    settings = Settings(
        device="cpu",
        redis_url=persistent_redis.url,
        stateful_secret="test-secret",
        redis_retry_interval_s=0.1,
        admin_token="s3cret",
    )
    images = test_images[:36]
    with TestClient(create_app(settings)) as client:
        sent = {"a": 0, "b": 0}
        for i, image in enumerate(images[:12]):
            cid = "a" if i % 2 else "b"
            assert upload(client, image.data, {"X-Client-ID": cid}).status_code == 200
            sent[cid] += 1
        assert client.get("/readyz").json()["tracker"] == "ok"

        persistent_redis.kill()
        slowest = 0.0
        for i, image in enumerate(images[12:30]):
            cid = "a" if i % 2 else "b"
            started = time.perf_counter()
            response = upload(client, image.data, {"X-Client-ID": cid})
            slowest = max(slowest, time.perf_counter() - started)
            assert response.status_code == 200
            sent[cid] += 1
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded" and ready.json()["tracker"] == "degraded"
        assert ready.json()["tracker_buffered_updates"] == 18
        assert admin_of(client).get("/clients/a", headers=ADMIN).status_code == 503
        metrics = admin_of(client).get("/metrics").text
        assert "advguard_tracker_buffered_updates 18.0" in metrics
        errors = [line for line in metrics.splitlines() if line.startswith("advguard_tracker_e")]
        assert errors and float(errors[0].split()[-1]) >= 1
        assert slowest < 2.0  # a dead Redis adds no seconds

        persistent_redis.start()  # same port, same AOF
        deadline = time.monotonic() + 10
        while client.get("/readyz").json()["status"] != "ok":
            assert time.monotonic() < deadline, "tracker never recovered"
            time.sleep(0.1)
        for i, image in enumerate(images[30:36]):
            cid = "a" if i % 2 else "b"
            assert upload(client, image.data, {"X-Client-ID": cid}).status_code == 200
            sent[cid] += 1
        for cid, count in sent.items():
            stats = admin_of(client).get(f"/clients/{cid}", headers=ADMIN).json()
            assert stats["requests"] == count == 18
            assert stats["accepted"] + stats["rejected"] == count
        assert client.get("/readyz").json()["tracker_buffered_updates"] == 0
    store = persistent_redis.client()
    assert int(store.hget("advguard:client:{a}", "requests") or 0) == 18
