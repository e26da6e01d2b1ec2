"""Deadline-aware admission (ADVGUARD_LATENCY_BUDGET_MS) and the guard switched off
(ADVGUARD_GUARD_ENABLED=false), on the real Guard of the demo bundle.

Time is never measured here: the batcher runs on a fake clock that only the test moves (each
batch "takes" a fixed delay on it), so which request is stale, what the service time per image is
and what the expected wait is are exact, whatever the machine's load.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.core.features import JPEG_LOGITS
from app.core.guard import Classification, Guard, Verdict
from app.core.images import decode_image
from app.service import routes as service_routes
from app.service.batcher import Batcher, BatchResult, DeadlineExceededError
from app.service.main import ServiceMiddleware, create_app, latency_budget
from app.service.settings import Settings
from tests.service.helpers import LabelledImage, LoopThread, admin_of, upload

WAIT_S = 30.0  # generous bound on waiting for a thread to reach a point; never a measurement


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class GatedGuard:
    """The real Guard, behind a gate: a batch waits until the test opens it, then "takes"
    ``delay`` seconds on the fake clock. Records the size of every batch that ran."""

    def __init__(self, real: Guard, clock: FakeClock, delay: float) -> None:
        self.real, self.clock, self.delay = real, clock, delay
        self.sizes: list[int] = []
        self.entered = threading.Event()
        self.gate = threading.Event()

    def _run(self, pixels: torch.Tensor) -> None:
        self.entered.set()
        assert self.gate.wait(WAIT_S), "the test never opened the gate"
        self.sizes.append(int(pixels.shape[0]))
        self.clock.now += self.delay

    def on_device(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.real.on_device(pixels)

    def infer(self, pixels: torch.Tensor) -> Any:
        self._run(pixels)
        return self.real.infer(pixels)

    def score(self, batch: Any) -> Any:
        return self.real.score(batch)

    def evidence(self, batch: Any) -> Any:
        return self.real.evidence(batch)

    def explain(self, batch: Any, evidence: Any, rows: Any) -> Any:
        return self.real.explain(batch, evidence, rows)

    def decide(self, batch: Any, scores: Any) -> Any:
        return self.real.decide(batch, scores)

    def classify(self, pixels: torch.Tensor) -> list[Classification]:
        self._run(pixels)
        return self.real.classify(pixels)


def _wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# --------------------------------------------------------------------------- the batcher


def test_stale_items_are_refused_never_run_and_fresh_ones_served(
    guard: Guard, pixels: list[torch.Tensor], loop_thread: LoopThread
) -> None:
    clock = FakeClock()
    gated = GatedGuard(guard, clock, delay=1.0)  # every batch "takes" 1 s
    expired: list[int] = []
    batcher = Batcher(
        gated,  # type: ignore[arg-type]
        max_batch_size=4,
        max_wait_s=0.0,
        queue_size=8,
        latency_budget_s=0.5,
        on_expired=expired.append,
        clock=clock,
    )
    batcher.start()
    try:
        submit, result = partial(loop_thread.call, batcher.submit), loop_thread.result
        first = submit(pixels[0])
        assert gated.entered.wait(WAIT_S)  # its batch is closed and running (gated)
        stale = [submit(p) for p in pixels[1:3]]  # will wait 1 s, over the 0.5 s budget
        gated.gate.set()
        served = [result(first)]
        for future in stale:
            with pytest.raises(DeadlineExceededError, match="past the latency budget"):
                result(future)
        served.append(result(submit(pixels[3])))  # a fresh one is served
    finally:
        batcher.stop()
    assert gated.sizes == [1, 1]  # the stale items never reached the model
    assert expired == [1, 1]
    assert [r.batch_size for r in served] == [1, 1]
    expected = guard.classify_pixels(torch.stack([pixels[0], pixels[3]]))
    assert [r.verdict.predicted_class for r in served] == [v.predicted_class for v in expected]


def test_items_within_the_budget_are_served(
    guard: Guard, pixels: list[torch.Tensor], loop_thread: LoopThread
) -> None:
    clock = FakeClock()
    gated = GatedGuard(guard, clock, delay=0.4)  # under the 0.5 s budget
    batcher = Batcher(
        gated,  # type: ignore[arg-type]
        max_batch_size=4,
        max_wait_s=0.0,
        latency_budget_s=0.5,
        clock=clock,
    )
    batcher.start()
    try:
        submit = partial(loop_thread.call, batcher.submit)
        first = submit(pixels[0])
        assert gated.entered.wait(WAIT_S)
        queued = [submit(p) for p in pixels[1:]]
        gated.gate.set()
        results = [loop_thread.result(f) for f in [first, *queued]]
    finally:
        batcher.stop()
    assert gated.sizes == [1, 3]
    assert [r.queue_s for r in results[1:]] == [pytest.approx(0.4)] * 3


def test_service_time_per_image_and_expected_latency(
    guard: Guard, pixels: list[torch.Tensor], loop_thread: LoopThread
) -> None:
    clock = FakeClock()
    gated = GatedGuard(guard, clock, delay=1.0)
    batcher = Batcher(gated, max_batch_size=4, max_wait_s=0.0, clock=clock)  # type: ignore[arg-type]
    assert batcher.item_seconds is None and batcher.expected_latency_s(10) == 0.0
    batcher.start()
    try:
        submit = partial(loop_thread.call, batcher.submit)
        futures = [submit(pixels[0])]
        assert gated.entered.wait(WAIT_S)
        futures += [submit(p) for p in pixels[1:3]]  # queued together: one batch of 2
        gated.gate.set()
        results: list[BatchResult] = [loop_thread.result(f) for f in futures]
    finally:
        batcher.stop()
    assert gated.sizes == [1, 2]
    assert [r.batch_size for r in results] == [1, 2, 2]
    # 1 s for 1 image, then 1 s for 2 (0.5 s each): weighted mean 1.0 + 0.2 x (0.5 - 1.0)
    assert batcher.item_seconds == pytest.approx(0.9)
    assert batcher.expected_latency_s(0) == pytest.approx(0.9)
    assert batcher.expected_latency_s(3) == pytest.approx(3.6)


def test_refusals_are_held_with_jitter() -> None:
    delays = [service_routes.refusal_delay_s(2.0) for _ in range(200)]
    assert all(1.0 <= d <= 3.0 for d in delays)
    assert len(set(delays)) > 1  # not in lockstep
    assert service_routes.refusal_delay_s(0.0) == 0.0


def test_automatic_budget_is_two_full_batches(
    guard: Guard, pixels: list[torch.Tensor], loop_thread: LoopThread
) -> None:
    assert latency_budget(Settings()) == (None, 2.0)  # unset: automatic
    assert latency_budget(Settings(latency_budget_ms=0.0)) == (None, None)  # off
    assert latency_budget(Settings(latency_budget_ms=250.0)) == (0.25, None)
    clock = FakeClock()
    gated = GatedGuard(guard, clock, delay=0.5)
    gated.gate.set()
    batcher = Batcher(
        gated,  # type: ignore[arg-type]
        max_batch_size=4,
        max_wait_s=0.0,
        auto_budget_batches=2.0,
        clock=clock,
    )
    assert batcher.budget_s() is None  # nothing measured yet: no deadline
    batcher.start()
    try:
        loop_thread.result(loop_thread.call(batcher.submit, pixels[0]))  # 0.5 s for one image
    finally:
        batcher.stop()
    assert batcher.budget_s() == pytest.approx(2 * 4 * 0.5)


# --------------------------------------------------------------------------- the service


def _metric(text: str, name: str, **labels: str) -> float:
    label = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{re.escape('{' + label + '}') if label else ''} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{name} {labels} not exposed"
    return float(match.group(1))


def test_service_sheds_by_expected_wait_and_deadline(
    guard: Guard, test_images: list[LabelledImage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past its budget a request gets 503 overloaded + Retry-After: without being run when it
    waited longer than the budget for the model, and before its body is read, its connection
    held about ``shed_delay_ms``, when the expected wait is already over the budget; fresh
    requests are served."""
    held: list[float] = []

    async def hold(seconds: float) -> None:
        held.append(seconds)

    monkeypatch.setattr(service_routes, "hold_refusal", hold)
    settings = Settings(
        device="cpu",
        max_wait_ms=0.0,
        latency_budget_ms=500.0,
        retry_after_s=2,
        shed_delay_ms=2000.0,
    )
    app = create_app(settings)
    images = [image.data for image in test_images[:6]]
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        batcher: Batcher = app.state.service.batcher
        assert batcher.latency_budget_s == pytest.approx(0.5)
        clock = FakeClock()
        gated = GatedGuard(batcher.guard, clock, delay=1.0)  # each batch "takes" 1 s
        batcher.clock = clock
        batcher.guard = gated  # type: ignore[assignment]

        # no batch has run yet: nothing measured, so the second request is admitted...
        first: Future[Any] = pool.submit(upload, client, images[0])
        assert gated.entered.wait(WAIT_S)
        second: Future[Any] = pool.submit(upload, client, images[1])
        _wait_for(lambda: batcher.qsize() == 1, "the second request to be queued")
        gated.gate.set()  # ...but it waits 1 s for the model, over the 0.5 s budget
        assert first.result(WAIT_S).status_code == 200
        refused = second.result(WAIT_S)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "2"
        assert refused.json()["error"] == "overloaded"
        assert "latency budget" in refused.json()["message"]
        assert gated.sizes == [1]  # never run
        assert upload(client, images[2]).status_code == 200  # a fresh one is served

        # now 1 s per image is measured: with one request in flight, the next one would wait
        # 2 s against a 0.5 s budget, and is refused before its body is read
        assert batcher.item_seconds == pytest.approx(1.0)
        gated.gate.clear()
        gated.entered.clear()
        third: Future[Any] = pool.submit(upload, client, images[3])
        assert gated.entered.wait(WAIT_S)
        refused = upload(client, images[4])
        assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
        assert refused.json()["error"] == "overloaded"
        assert "expected wait of 2000 ms" in refused.json()["message"]
        gated.gate.set()
        assert third.result(WAIT_S).status_code == 200
        assert upload(client, images[5]).status_code == 200  # idle again: admitted
        text = admin_of(client).get("/metrics").text
    assert gated.sizes == [1, 1, 1, 1]
    assert held == [2.0, 2.0]  # both refusals held ADVGUARD_SHED_DELAY_MS
    assert _metric(text, "advguard_shed_total", reason="expired") == 1.0
    assert _metric(text, "advguard_shed_total", reason="expected_wait") == 1.0
    assert _metric(text, "advguard_shed_total", reason="in_flight") == 0.0
    assert _metric(text, "advguard_seconds_per_image") == pytest.approx(1.0)


def test_latency_budget_zero_turns_deadlines_off(test_images: list[LabelledImage]) -> None:
    app = create_app(Settings(device="cpu", max_wait_ms=0.0, latency_budget_ms=0.0))
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        batcher: Batcher = app.state.service.batcher
        clock = FakeClock()
        assert batcher.latency_budget_s is None
        gated = GatedGuard(batcher.guard, clock, delay=1000.0)
        batcher.clock = clock
        batcher.guard = gated  # type: ignore[assignment]
        first: Future[Any] = pool.submit(upload, client, test_images[0].data)
        assert gated.entered.wait(WAIT_S)
        gated.gate.set()
        assert first.result(WAIT_S).status_code == 200
        gated.gate.clear()
        gated.entered.clear()
        second: Future[Any] = pool.submit(upload, client, test_images[1].data)
        assert gated.entered.wait(WAIT_S)
        # 1000 s per image measured and one in flight: admitted all the same, and served
        third: Future[Any] = pool.submit(upload, client, test_images[2].data)
        _wait_for(lambda: batcher.qsize() == 1, "the third request to be queued")
        gated.gate.set()
        assert second.result(WAIT_S).status_code == 200
        assert third.result(WAIT_S).status_code == 200


# --------------------------------------------------------------------------- guard off


def test_guard_classify_is_the_guarded_prediction(guard: Guard, pixels: list[torch.Tensor]) -> None:
    batch = torch.stack(pixels)
    verdicts = guard.classify_pixels(batch)
    plain = guard.classify(batch)
    assert all(isinstance(p, Classification) and not isinstance(p, Verdict) for p in plain)
    assert [p.predicted_class for p in plain] == [v.predicted_class for v in verdicts]
    assert [p.class_name for p in plain] == [v.class_name for v in verdicts]
    np.testing.assert_allclose(
        [p.probability for p in plain], [v.probability for v in verdicts], rtol=1e-5
    )


def test_guard_classify_runs_the_bare_model_once(
    guard: Guard, test_images: list[LabelledImage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard off pays for the classifier alone: one pass of the model even for queries
    the demo bundle's detector suspects (for which the guarded path runs the JPEG pass of
    ``jpeg.logits``), and no pixel statistics."""
    batch = torch.stack([guard.pixels(decode_image(image.data)) for image in test_images[:16]])
    assert guard.network.deferred == (JPEG_LOGITS,)
    suspects = guard.detector.suspects(guard.evidence(guard.infer(batch)).values)
    assert suspects.any(), "no test image is suspect: the JPEG pass would not run either way"
    calls: list[int] = []
    handle = guard.network.model.register_forward_hook(lambda *_: calls.append(1))
    assert guard.network.highpass is not None and guard.network.chroma is not None
    for stage in (guard.network.highpass, guard.network.chroma):
        monkeypatch.setattr(stage, "forward", lambda *_: pytest.fail("pixel statistics ran"))
    try:
        plain = guard.classify(batch)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert len(plain) == len(batch)


def test_guard_off_classifies_without_search_or_tracking(
    guard: Guard, test_images: list[LabelledImage], monkeypatch: pytest.MonkeyPatch
) -> None:
    images = test_images[:6]
    app = create_app(
        Settings(device="cpu", guard_enabled=False, admin_token="s3cret", policy="refuse")
    )
    with TestClient(app) as client:
        served = app.state.service.guard

        def no_search(*_args: object) -> None:
            raise AssertionError("the index was searched with the guard off")

        monkeypatch.setattr(served.detector, "score", no_search)
        responses = [upload(client, image.data, {"X-Client-ID": "alice"}) for image in images]
        stats = admin_of(client).get("/clients/alice", headers={"X-Admin-Token": "s3cret"})
        text = admin_of(client).get("/metrics").text
    assert [r.status_code for r in responses] == [200] * len(images), responses[0].text
    bodies = [r.json() for r in responses]
    expected = guard.classify_pixels(
        torch.stack([guard.pixels(decode_image(image.data)) for image in images])
    )
    for body, verdict in zip(bodies, expected, strict=True):
        assert body["decision"] == "unguarded"
        assert body["score"] is None and body["threshold"] is None
        assert body["prediction"]["class_index"] == verdict.predicted_class
        assert body["prediction"]["class_name"] == verdict.class_name
        assert body["prediction"]["probability"] == pytest.approx(verdict.probability, rel=1e-5)
    assert stats.status_code == 404  # not tracked
    assert _metric(text, "advguard_requests_total", decision="unguarded") == len(images)
    assert _metric(text, "advguard_requests_total", decision="accepted") == 0.0
    assert _metric(text, "advguard_stage_seconds_count", stage="search") == 0.0
    assert _metric(text, "advguard_stage_seconds_count", stage="model") == len(images)


def _multipart(data: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    boundary = "admissionboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = [
        (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    return headers, body


def _scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/classify",
        "raw_path": b"/classify",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
    }


def test_a_slow_upload_is_not_work_ahead(test_images: list[LabelledImage]) -> None:
    """A request still receiving its body does not hold up the model: with 1 s per image
    measured and a 0.5 s budget, a new request is admitted next to a slow upload."""
    app = create_app(Settings(device="cpu", max_wait_ms=0.0, latency_budget_ms=500.0))
    with TestClient(app) as client:
        batcher: Batcher = app.state.service.batcher
        clock = FakeClock()
        gated = GatedGuard(batcher.guard, clock, delay=1.0)
        batcher.clock = clock
        batcher.guard = gated  # type: ignore[assignment]
        gated.gate.set()
        assert upload(client, test_images[0].data).status_code == 200
        assert batcher.item_seconds == pytest.approx(1.0)
        middleware = app.middleware_stack
        while not isinstance(middleware, ServiceMiddleware):
            middleware = middleware.app  # type: ignore[union-attr]
        headers, body = _multipart(test_images[1].data)

        async def scenario() -> list[int]:
            release = asyncio.Event()
            statuses: list[int] = []

            async def slow_receive() -> dict[str, Any]:
                await release.wait()
                return {"type": "http.request", "body": body, "more_body": False}

            async def fast_receive() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])

            slow = asyncio.create_task(app(_scope(headers), slow_receive, send))  # type: ignore[arg-type]
            give_up = time.monotonic() + WAIT_S
            while middleware.uploading == 0:
                assert time.monotonic() < give_up, "the slow upload was never admitted"
                await asyncio.sleep(0.001)
            assert middleware.in_flight == 1
            await app(_scope(headers), fast_receive, send)  # type: ignore[arg-type]
            release.set()
            await slow
            return statuses

        assert asyncio.run(scenario()) == [200, 200]
        assert middleware.in_flight == 0 and middleware.uploading == 0
    assert gated.sizes == [1, 1, 1]
