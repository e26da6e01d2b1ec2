"""Fixtures of the service tests: a real redis-server, a local 3-master Redis Cluster, CIFAR-10
test images, FGSM adversarials, and an app factory parametrised over both trackers."""

from __future__ import annotations

import tarfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from app.core.guard import Guard
from app.core.images import decode_image
from app.service.main import create_app
from app.service.settings import DEFAULT_BUNDLE, Settings
from tests.service.helpers import (
    CIFAR_TAR,
    PER_CLASS,
    LabelledImage,
    LoopThread,
    RedisClusterProcesses,
    RedisProcess,
    free_port,
)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """A local 3-master Redis Cluster, shared by the session (tests use their own key prefix)."""
    cluster = RedisClusterProcesses(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.kill()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    """An event loop on its own thread (``LoopThread``), closed after the test."""
    running = LoopThread()
    yield running
    running.close()


@pytest.fixture(scope="session")
def guard() -> Guard:
    return Guard.load(DEFAULT_BUNDLE, device="cpu")


@pytest.fixture
def pixels(guard: Guard, test_images: list[LabelledImage]) -> list[torch.Tensor]:
    """The first four test images as the model's pixels (the batcher's tests submit these)."""
    return [guard.pixels(decode_image(image.data)) for image in test_images[:4]]


@pytest.fixture(scope="session")
def test_images(guard: Guard) -> list[LabelledImage]:
    """``PER_CLASS`` CIFAR-10 test JPEGs per class, read straight from the tar, interleaved."""
    names = guard.class_names
    found: dict[str, list[LabelledImage]] = {name: [] for name in names}
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3 or parts[-3] != "test":
                continue
            cls = parts[-2]
            if cls in found and len(found[cls]) < PER_CLASS:
                handle = tar.extractfile(member)
                assert handle is not None
                label = names.index(cls)
                found[cls].append(LabelledImage(f"{cls}_{parts[-1]}", handle.read(), label))
            if all(len(images) == PER_CLASS for images in found.values()):
                break
    return [found[name][i] for i in range(PER_CLASS) for name in names]


TRACKERS = ("memory", "redis")


@pytest.fixture(params=TRACKERS)
def tracker_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


AppFactory = Callable[..., Any]


@pytest.fixture
def make_client(tracker_kind: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """``make_client(**settings)`` -> a context manager giving a started TestClient."""

    @contextmanager
    def factory(**overrides: Any) -> Iterator[TestClient]:
        values: dict[str, Any] = {"device": "cpu", "max_wait_ms": 1.0}
        if tracker_kind == "redis":
            server: RedisProcess = request.getfixturevalue("redis_server")
            values["redis_url"] = server.url
            values["stateful_secret"] = "test-secret"
            values["redis_prefix"] = f"test-{uuid.uuid4().hex[:12]}"
        values.update(overrides)
        app = create_app(Settings(**values))
        with TestClient(app) as client:
            client.app_state = app.state  # type: ignore[attr-defined]
            yield client

    yield factory
