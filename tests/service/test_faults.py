"""Faults: Redis unreachable from the start and restarted under concurrent load (nothing lost once
it answers), a corrupted bundle file and model weights that do not match the bundle (refused at
start with a clear error, by the app and by ``advguard serve``).

Redis killed mid-stream with an AOF is in test_redis_outage.py; SIGTERM drain in test_serve.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import torch
from fastapi.testclient import TestClient

from app.core.errors import BundleError
from app.core.flagging import FlagPolicy
from app.service.main import create_app
from app.service.redis_tracker import RedisTracker
from app.service.settings import DEFAULT_BUNDLE, Settings
from app.service.tracking import Observation
from tests.service.helpers import LabelledImage, RedisProcess, admin_of, free_port, upload

ADMIN = {"X-Admin-Token": "s3cret"}
ADVGUARD = str(Path(sys.executable).parent / "advguard")


def _wait_ready(client: TestClient, status: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while client.get("/readyz").json()["status"] != status:
        assert time.monotonic() < deadline, f"/readyz never became {status}"
        time.sleep(0.1)


def test_redis_unreachable_from_the_start(tmp_path: Path, test_images: list[LabelledImage]) -> None:
    """No Redis at startup: the service starts, serves (fail open), reports degraded, and replays
    every update once Redis comes up on that address."""
    server = RedisProcess(free_port(), tmp_path)  # not started yet
    settings = Settings(
        device="cpu",
        redis_url=server.url,
        stateful_secret="test-secret",
        redis_retry_interval_s=0.1,
        admin_token="s3cret",
    )
    try:
        with TestClient(create_app(settings)) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["tracker"] == "degraded"
            for image in test_images[:10]:
                assert upload(client, image.data, {"X-Client-ID": "early"}).status_code == 200
            assert client.get("/readyz").json()["tracker_buffered_updates"] == 10
            assert admin_of(client).get("/clients/early", headers=ADMIN).status_code == 503
            server.start()
            _wait_ready(client, "ok")
            for image in test_images[10:15]:
                assert upload(client, image.data, {"X-Client-ID": "early"}).status_code == 200
            stats = admin_of(client).get("/clients/early", headers=ADMIN).json()
            assert stats["requests"] == 15 and stats["accepted"] + stats["rejected"] == 15
            assert client.get("/readyz").json()["tracker_buffered_updates"] == 0
    finally:
        server.kill()


def test_redis_restarted_under_concurrent_load(
    tmp_path: Path, test_images: list[LabelledImage]
) -> None:
    """Requests in flight from several threads while Redis (AOF) is killed and restarted: every
    request is answered 200 and every one is counted once Redis is back."""
    server = RedisProcess(free_port(), tmp_path, persistent=True)
    server.start()
    settings = Settings(
        device="cpu",
        redis_url=server.url,
        stateful_secret="test-secret",
        redis_retry_interval_s=0.1,
        admin_token="s3cret",
    )
    images = test_images[:40]
    clients = ("c0", "c1", "c2", "c3")
    try:
        with TestClient(create_app(settings)) as client:

            def send(i: int) -> int:
                cid = clients[i % len(clients)]
                status: int = upload(client, images[i].data, {"X-Client-ID": cid}).status_code
                if i == 12:
                    server.kill()
                if i == 26:
                    server.start()
                return status

            with ThreadPoolExecutor(4) as pool:
                statuses = list(pool.map(send, range(len(images))))
            assert statuses == [200] * len(images)
            _wait_ready(client, "ok")
            # the buffer is replayed on the next Redis call after recovery
            assert upload(client, images[0].data, {"X-Client-ID": "c0"}).status_code == 200
            total = 0
            for cid in clients:
                stats = admin_of(client).get(f"/clients/{cid}", headers=ADMIN).json()
                total += stats["requests"]
            assert total == len(images) + 1
            assert client.get("/readyz").json()["tracker_buffered_updates"] == 0
    finally:
        server.kill()


def test_update_whose_reply_was_lost_is_not_counted_twice(tmp_path: Path) -> None:
    """Redis applies an update but the reply never arrives (killed or timed out after the write):
    the tracker buffers and replays it, and the replay must not count it again."""
    server = RedisProcess(free_port(), tmp_path)
    server.start()
    try:
        tracker = RedisTracker(
            server.url, FlagPolicy("mean", threshold=0.0, min_requests=1000), retry_interval_s=0.0
        )
        real = tracker._record
        lose_next = [True]

        def reply_lost(*args: object, **kwargs: object) -> object:
            result = real(*args, **kwargs)  # type: ignore[arg-type]
            if lose_next[0]:
                lose_next[0] = False
                raise redis.ConnectionError("connection lost before the reply")
            return result

        tracker._record = reply_lost  # type: ignore[method-assign]
        now = time.time()
        assert tracker.record(Observation("lost", 0.5, True, now)).stats is None  # buffered
        assert tracker.buffered() == 1
        stats = tracker.record(Observation("lost", 0.3, False, now + 1)).stats
        assert stats is not None and tracker.buffered() == 0
        assert (stats.requests, stats.accepted, stats.rejected, stats.scored) == (2, 1, 1, 2)
        assert stats.mean_score == pytest.approx(0.4)
        # another writer (a second replica) with its own sequence numbers is not mistaken for it
        other = RedisTracker(server.url, FlagPolicy("mean", threshold=0.0, min_requests=1000))
        stats = other.record(Observation("lost", 0.2, True, now + 2)).stats
        assert stats is not None and stats.requests == 3
        tracker.close()
        other.close()
    finally:
        server.kill()


# --------------------------------------------------------------------------- bundle faults


@pytest.fixture
def bundle_copy(tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, target)
    return target


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _app_refuses(bundle: Path, message: str) -> None:
    """The app's lifespan refuses the bundle: startup raises, nothing is served."""
    app = create_app(Settings(device="cpu", bundle=bundle))
    with pytest.raises(BundleError, match=re.escape(message)), TestClient(app):
        pass


def _serve_refused(bundle: Path) -> str:
    """``advguard serve`` on a bad bundle: exits non-zero at once; returns its stderr."""
    env = {**os.environ, "ADVGUARD_BUNDLE": str(bundle)}
    done = subprocess.run(
        [ADVGUARD, "serve", "--port", str(free_port()), "--device", "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("advguard serve: refusing to start: ")
    return done.stderr


@pytest.mark.parametrize(
    "name",
    [
        "index_layer3_2.faiss",
        "labels.npy",
        "processing_layer3_2.npz",
        "class_density_pixels_chromahighpass.npz",
    ],
)
def test_corrupted_bundle_file_refused(bundle_copy: Path, name: str) -> None:
    _flip_byte(bundle_copy / name, (bundle_copy / name).stat().st_size // 2)
    _app_refuses(bundle_copy, f"bundle file {name} does not match the manifest")
    stderr = _serve_refused(bundle_copy)
    assert f"bundle file {name} does not match the manifest" in stderr
    assert "modified or corrupted" in stderr


def test_missing_bundle_file_refused(bundle_copy: Path) -> None:
    (bundle_copy / "calibration_scores.npy").unlink()
    assert "bundle file missing" in _serve_refused(bundle_copy)


def test_other_model_weights_refused(bundle_copy: Path) -> None:
    """Weights of the right architecture but not the bundle's model: the sha256 differs."""
    weights = bundle_copy / "model.pth"
    state = torch.load(weights, map_location="cpu", weights_only=True)
    tensors = state.get("state_dict", state) if isinstance(state, dict) else state
    first = next(key for key, value in tensors.items() if value.is_floating_point())
    tensors[first] = tensors[first] + 0.01  # a retrained / different model of the same shape
    torch.save(state, weights)
    _app_refuses(bundle_copy, "model.pth does not match the manifest")
    assert "model.pth does not match the manifest" in _serve_refused(bundle_copy)


def test_model_of_another_architecture_refused(bundle_copy: Path) -> None:
    """A manifest that claims another architecture for the (untouched) weights: refused when the
    weights do not load strictly into it."""
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["model"]["arch"] = "resnet32"
    path.write_text(json.dumps(manifest))
    _app_refuses(bundle_copy, "the bundle's model cannot be loaded")
