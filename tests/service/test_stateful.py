"""Stateful detection in ``POST /classify``, over HTTP, with the in-process store and with Redis
(and one run on the 3-master cluster): each policy, the client's flag reason, the metrics, a
Sybil spread, honest bursts, and failing open when Redis is down."""

from __future__ import annotations

import asyncio
import io
import re
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.core.images import encode_image
from app.core.stateful.defaults import DEFAULT_RULE, default_scheme
from app.core.stateful.hashes import pixel_digests
from app.core.stateful.match_rule import Answer, DetectionRule
from app.core.stateful.store import InProcessFingerprintStore
from app.service.fingerprints import DECISIONS as STORED_DECISIONS
from app.service.main import create_app
from app.service.metrics import SCREENING_PARTS, Metrics
from app.service.settings import Settings
from app.service.stateful import (
    LookUp,
    Pending,
    QueryPrint,
    ScreeningWorker,
    build_stateful,
    screens_on_batch_worker,
)
from app.service.tracking import Observation
from evaluation.honest_traffic import EDITS, edit
from tests.core.stateful.probes import attack_sequence, photos  # noqa: F401 (a fixture)
from tests.service.conftest import AppFactory
from tests.service.helpers import (
    RedisClusterProcesses,
    RedisProcess,
    admin_of,
    free_port,
    upload,
)

SECRET = "test-secret"
ADMIN = {"X-Admin-Token": "s3cret"}
LENGTH = 16


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(buffer, format="PNG")
    return buffer.getvalue()


def expected(images: np.ndarray) -> list[int | None]:
    """Per query, the index of the query whose answer ``silent`` serves (None: not detected),
    replayed through the in-process store with the service's secret and rule."""
    scheme = default_scheme(SECRET.encode())
    store = InProcessFingerprintStore(scheme)
    prints = scheme.fingerprints(images)
    digests = pixel_digests(images)
    out: list[int | None] = []
    for i in range(len(images)):
        tag = Answer("accepted", i, 0.0, 0.0)  # the class index tags whose answer it is
        evidence, stored = store.check_and_store("mallory", prints[i], digests[i], float(i), tag)
        if DEFAULT_RULE.detects(evidence):
            assert evidence.anchor is not None
            store.relabel(stored, evidence.anchor)
            out.append(evidence.anchor.class_index)
        else:
            out.append(None)
    return out


DECISIONS = ("accepted", "rejected", "unguarded", "error")


def metric(client: TestClient, name: str, **labels: str) -> float:
    text = admin_of(client).get("/metrics").text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.match(rf"{name}(?:\{{(.*)\}})? (\S+)$", line)
        if match and ",".join(sorted((match.group(1) or "").split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def bodies(client: TestClient, images: np.ndarray, ids: list[str]) -> list[Any]:
    out = []
    for image, cid in zip(images, ids, strict=True):
        response = upload(client, png(image), {"X-Client-ID": cid})
        body = response.json()
        body.pop("request_id", None)
        out.append((response.status_code, body))
    return out


@pytest.fixture
def sequence(photos: np.ndarray) -> np.ndarray:  # noqa: F811
    return attack_sequence(photos[12], LENGTH, seed=21)


def _settings(policy: str) -> dict[str, Any]:
    # the score-based flag stays out of the way: these tests are about query_attack
    return {
        "stateful_policy": policy,
        "stateful_secret": SECRET,
        "admin_token": "s3cret",
        "flag_min_requests": 1000,
        "expose_scores": True,
    }


def test_silent_serves_the_anchors_answer(make_client: AppFactory, sequence: np.ndarray) -> None:
    plan = expected(sequence)
    detected = [i for i, anchor in enumerate(plan) if anchor is not None]
    assert len(detected) >= LENGTH // 2
    with make_client(**_settings("flag")) as client:
        honest = bodies(client, sequence, ["mallory"] * LENGTH)
    with make_client(**_settings("silent")) as client:
        silent = bodies(client, sequence, ["mallory"] * LENGTH)
        stats = admin_of(client).get("/clients/mallory", headers=ADMIN).json()
        assert metric(
            client, "advguard_stateful_queries_total", policy="silent", outcome="detected"
        ) == len(detected)
    assert all(status == 200 for status, _ in honest + silent)
    for i, anchor in enumerate(plan):
        if anchor is None:
            assert silent[i] == honest[i]  # not detected: its own answer
        else:
            assert silent[i] == honest[anchor]  # the anchor's answer, score included
    # the silent answers are not what the model said of those queries (the test can fail)
    assert any(honest[i] != honest[plan[i]] for i in detected)  # type: ignore[index]
    assert stats["flagged"] and stats["flag_reasons"] == ["query_attack"]


def test_flag_answers_as_usual_and_flags(make_client: AppFactory, sequence: np.ndarray) -> None:
    first = next(i for i, anchor in enumerate(expected(sequence)) if anchor is not None)
    with make_client(**_settings("flag")) as client:
        answers = bodies(client, sequence[:first], ["mallory"] * first)
        assert admin_of(client).get("/clients/mallory", headers=ADMIN).json()["flagged"] is False
        answers += bodies(client, sequence[first:], ["mallory"] * (LENGTH - first))
        listed = admin_of(client).get("/clients", headers=ADMIN).json()["clients"]
        assert [(c["client_id"], c["flag_reasons"]) for c in listed] == [
            ("mallory", ["query_attack"])
        ]
        assert metric(client, "advguard_clients_flagged_total") == 1
        assert (
            metric(client, "advguard_stateful_queries_total", policy="flag", outcome="clear")
            == first
        )
    assert all(status == 200 and "prediction" in body for status, body in answers)


def test_the_in_process_store_is_screened_on_the_batch_worker_and_redis_on_its_own_thread(
    make_client: AppFactory, tracker_kind: str, sequence: np.ndarray
) -> None:
    """A store that never waits on the network is screened by the batch worker right after the
    guard (no second hand-off); Redis by the screening thread, so that the model never waits on
    it. Either way the query is screened once and recorded once in the client's statistics."""
    with make_client(**_settings("flag")) as client:
        service = client.app_state.service
        store = service.stateful.store
        screened_on: list[str] = []
        real = store.check_and_store_many

        def spy(queries: Sequence[Any], decide: Any, *found: Any) -> None:
            screened_on.extend(threading.current_thread().name for _ in queries)
            real(queries, decide, *found)

        store.check_and_store_many = spy
        answers = bodies(client, sequence[:3], ["t1"] * 3)
        assert service.tracker.get("t1").requests == 3
        assert (
            metric(client, "advguard_stateful_queries_total", policy="flag", outcome="clear") == 3
        )
        for part in SCREENING_PARTS:  # where the screening's time went, on either thread
            assert metric(client, "advguard_screening_seconds_total", part=part) > 0, part
    assert [status for status, _ in answers] == [200, 200, 200]
    if tracker_kind == "memory":
        assert screened_on == ["advguard-batcher"] * 3 and service.screening is None
    else:
        assert screened_on == ["advguard-screening"] * 3 and service.screening is not None


def test_with_redis_and_the_default_a_query_is_screened_after_it_is_classified(
    redis_server: RedisProcess, sequence: np.ndarray
) -> None:
    """``ADVGUARD_STATEFUL_LOOK_UP_EARLY`` off (the default): nothing is looked up as a batch
    starts; the query is fingerprinted, checked and stored with its answer once classified."""
    settings = Settings(
        device="cpu",
        max_wait_ms=1.0,
        redis_url=redis_server.url,
        redis_prefix=f"test-{uuid.uuid4().hex[:12]}",
        **_settings("flag"),
    )
    app = create_app(settings)
    with TestClient(app) as client:
        service = app.state.service
        store = service.stateful.store
        calls: list[str] = []
        real_decide = store.check_and_store_many

        def look_up_many(queries: Sequence[Any]) -> Any:
            calls.append("look up")
            raise AssertionError("looked up early")

        def check_and_store_many(queries: Sequence[Any], decide: Any, *found: Any) -> None:
            calls.append(f"check and store, found: {bool(found and found[0])}")
            real_decide(queries, decide, *found)

        store.look_up_many, store.check_and_store_many = look_up_many, check_and_store_many
        assert service.batcher.before_run is None and service.screening is not None
        status, body = bodies(client, sequence[:1], ["late"])[0]
        raw = redis.Redis.from_url(redis_server.url).get(store.client_key("late"))
    assert status == 200 and calls == ["check and store, found: False"]
    record = np.frombuffer(raw, store.dtype)[0]
    assert STORED_DECISIONS[int(record["decision"])] == body["decision"]  # stored with it


def test_with_redis_a_query_is_looked_up_while_the_model_classifies_it(
    redis_server: RedisProcess, sequence: np.ndarray
) -> None:
    """With Redis the query is stored and its candidates fetched while the model classifies it:
    the model, held until the query's look-up has begun, is not held long (it would wait out
    its 10 s if the look-up came after it). Then the query is decided on what was found, and its
    answer written."""
    settings = Settings(
        device="cpu",
        max_wait_ms=1.0,
        redis_url=redis_server.url,
        redis_prefix=f"test-{uuid.uuid4().hex[:12]}",
        stateful_look_up_early=True,
        **_settings("flag"),
    )
    app = create_app(settings)
    with TestClient(app) as client:
        service = app.state.service
        store, guard = service.stateful.store, service.guard
        looking, overlapped, decided = threading.Event(), [], []
        real_infer, real_look_up, real_decide = (
            guard.infer,
            store.look_up_many,
            store.check_and_store_many,
        )

        def infer(pixels: torch.Tensor) -> Any:
            overlapped.append(looking.wait(10))  # the look-up has begun
            return real_infer(pixels)

        def look_up_many(queries: Sequence[Any]) -> Any:
            looking.set()
            return real_look_up(queries)

        def check_and_store_many(queries: Sequence[Any], decide: Any, *found: Any) -> None:
            decided.append(len(found) == 1 and found[0] is not None)
            real_decide(queries, decide, *found)

        guard.infer, store.look_up_many = infer, look_up_many
        store.check_and_store_many = check_and_store_many
        status, body = bodies(client, sequence[:1], ["early"])[0]
        assert status == 200 and body["decision"] in ("accepted", "rejected")
        assert overlapped == [True] and decided == [True]
        assert (
            metric(client, "advguard_stateful_queries_total", policy="flag", outcome="clear") == 1
        )
        raw = redis.Redis.from_url(redis_server.url).get(store.client_key("early"))
        record = np.frombuffer(raw, store.dtype)[0]
    assert STORED_DECISIONS[int(record["decision"])] == body["decision"]  # its answer written


@pytest.mark.parametrize(
    ("store_blocks", "tracker_blocks", "device", "on_worker"),
    [
        (False, False, "cpu", True),  # in process on the CPU: the batch worker
        (True, True, "cpu", False),  # Redis: never make the model wait on it
        (True, False, "cpu", False),
        (False, True, "cpu", False),
        (False, False, "cuda", False),  # a GPU's batches overlap the screening thread's work
    ],
)
def test_where_the_service_screens(
    store_blocks: bool, tracker_blocks: bool, device: str, on_worker: bool
) -> None:
    assert screens_on_batch_worker(store_blocks, tracker_blocks, device) is on_worker


def test_refuse_answers_403_and_nothing_else(
    make_client: AppFactory,
    sequence: np.ndarray,
    photos: np.ndarray,  # noqa: F811
) -> None:
    plan = expected(sequence)
    with make_client(**_settings("refuse")) as client:
        answers = bodies(client, sequence, ["mallory"] * LENGTH)
        # another client's photo is unaffected
        other = upload(client, png(photos[14]), {"X-Client-ID": "alice"})
        assert other.status_code == 200, other.json()
        # each request counted once: a refused query as an error only, not also as served
        counted = {d: metric(client, "advguard_requests_total", decision=d) for d in DECISIONS}
    refused = sum(anchor is not None for anchor in plan)
    assert refused > 0
    assert counted["error"] == refused
    assert counted["accepted"] + counted["rejected"] == LENGTH + 1 - refused
    for (status, body), anchor in zip(answers, plan, strict=True):
        if anchor is None:
            assert status == 200
        else:
            assert status == 403
            assert set(body) == {"error", "message"}
            assert body["error"] == "query_refused"


def test_a_sybil_spread_is_detected(make_client: AppFactory, photos: np.ndarray) -> None:  # noqa: F811
    """One attack sent by 50 client ids (each id's first query): detected account-obliviously."""
    sequence = attack_sequence(photos[13], 50, seed=22)
    ids = [f"sybil-{i}" for i in range(len(sequence))]
    with make_client(**_settings("flag")) as client:
        bodies(client, sequence, ids)
        detected = metric(
            client, "advguard_stateful_queries_total", policy="flag", outcome="detected"
        )
        flagged = admin_of(client).get("/clients", headers=ADMIN).json()["clients"]
    assert detected >= len(sequence) - DEFAULT_RULE.global_matches - 3
    assert len(flagged) == detected and all(c["flag_reasons"] == ["query_attack"] for c in flagged)


def test_honest_near_duplicate_bursts_are_not_flagged(
    make_client: AppFactory,
    photos: np.ndarray,  # noqa: F811
) -> None:
    """evaluation.honest_traffic's edits of a few training photos (crops, resizes, flips,
    brightness, JPEG at several qualities; PNG or JPEG uploads), each photo resent too."""
    rng = np.random.default_rng(5)
    with make_client(**_settings("refuse")) as client:
        for c, photo in enumerate(photos[20:26]):
            uploads = [png(photo), png(photo)]
            for i in range(12):
                quality = None if i % 2 else int(rng.choice([95, 90, 85, 75]))
                uploads.append(encode_image(edit(photo, EDITS[i % len(EDITS)], rng), quality))
            for data in uploads:
                assert upload(client, data, {"X-Client-ID": f"honest-{c}"}).status_code == 200
        assert (
            metric(client, "advguard_stateful_queries_total", policy="refuse", outcome="detected")
            == 0
        )
        assert admin_of(client).get("/clients", headers=ADMIN).json()["clients"] == []


def test_redis_down_fails_open(sequence: np.ndarray) -> None:
    settings = Settings(
        device="cpu",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        redis_retry_interval_s=0.0,
        **_settings("refuse"),
    )
    with TestClient(create_app(settings)) as client:
        answers = bodies(client, sequence, ["mallory"] * LENGTH)
        errors = metric(client, "advguard_stateful_queries_total", policy="refuse", outcome="error")
    assert all(status == 200 for status, _ in answers)  # never refused: fail open
    assert errors == LENGTH


def test_the_secret_is_required_with_redis() -> None:
    with pytest.raises(ValueError, match="ADVGUARD_STATEFUL_SECRET"):
        Settings(redis_url="redis://127.0.0.1:6379/0")
    Settings(redis_url="redis://127.0.0.1:6379/0", stateful_enabled=False)
    Settings(redis_url="redis://127.0.0.1:6379/0", guard_enabled=False)


def test_silent_on_the_cluster(redis_cluster: RedisClusterProcesses, sequence: np.ndarray) -> None:
    plan = expected(sequence)
    base = {"device": "cpu", "max_wait_ms": 1.0, **_settings("flag")}
    cluster = {
        "redis_url": redis_cluster.url,
        "redis_cluster": True,
        "redis_prefix": f"test-{uuid.uuid4().hex[:12]}",
    }
    with TestClient(create_app(Settings(**base))) as client:
        honest = bodies(client, sequence, ["mallory"] * LENGTH)
    base["stateful_policy"] = "silent"
    with TestClient(create_app(Settings(**base, **cluster))) as client:
        silent = bodies(client, sequence, ["mallory"] * LENGTH)
        stats = admin_of(client).get("/clients/mallory", headers=ADMIN).json()
    for i, anchor in enumerate(plan):
        assert silent[i] == (honest[i] if anchor is None else honest[anchor])
    assert stats["flag_reasons"] == ["query_attack"]


# --------------------------------------------------------------------------- the screening thread


def _answer(i: int) -> Answer:
    return Answer("accepted", i, 0.5, 1.0)


def test_the_screening_thread_batches_what_waits_in_arrival_order() -> None:
    """While one batch is screened, later queries wait; the next pass takes them all (up to
    ``max_batch``), in the order they came, and each future gets its own answer."""
    release, first_taken = threading.Event(), threading.Event()
    batches: list[list[str]] = []

    def screen_batch(batch: Sequence[Pending]) -> list[Answer | None]:
        batches.append([pending.client_id for pending in batch])
        first_taken.set()
        release.wait(10)
        return [None if pending.client_id == "c3" else pending.answer for pending in batch]

    async def run() -> list[Answer | None]:
        worker = ScreeningWorker(screen_batch, max_batch=4)
        worker.start()
        pixels = torch.zeros(3, 32, 32)
        futures = [worker.submit("c0", pixels, _answer(0))]
        assert await asyncio.to_thread(first_taken.wait, 10)
        futures += [worker.submit(f"c{i}", pixels, _answer(i)) for i in range(1, 7)]
        release.set()
        results = [await asyncio.wait_for(f, 10) for f in futures if f is not None]
        worker.stop()
        return results

    results = asyncio.run(run())
    assert batches == [["c0"], ["c1", "c2", "c3", "c4"], ["c5", "c6"]]
    assert results == [None if i == 3 else _answer(i) for i in range(7)]


def test_the_screening_thread_stops_after_the_queued_and_takes_no_more() -> None:
    seen: list[str] = []

    def screen_batch(batch: Sequence[Pending]) -> list[Answer | None]:
        seen.extend(pending.client_id for pending in batch)
        return [pending.answer for pending in batch]

    async def run() -> None:
        worker = ScreeningWorker(screen_batch)
        queued = [worker.submit(f"c{i}", torch.zeros(3, 4, 4), _answer(i)) for i in range(5)]
        worker.start()
        worker.stop()
        answered = [await asyncio.wait_for(f, 10) for f in queued if f is not None]
        assert answered == [_answer(i) for i in range(5)]
        assert worker.submit("late", torch.zeros(3, 4, 4), _answer(9)) is None  # fails open

    asyncio.run(run())
    assert seen == [f"c{i}" for i in range(5)]


def test_a_failing_batch_fails_its_queries_and_the_thread_goes_on() -> None:
    calls = []

    def screen_batch(batch: Sequence[Pending]) -> list[Answer | None]:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return [pending.answer for pending in batch]

    async def run() -> None:
        worker = ScreeningWorker(screen_batch)
        worker.start()
        broken = worker.submit("a", torch.zeros(3, 4, 4), _answer(1))
        assert broken is not None
        with pytest.raises(RuntimeError, match="a bug"):
            await asyncio.wait_for(broken, 10)
        fine = worker.submit("b", torch.zeros(3, 4, 4), _answer(2))
        assert fine is not None and await asyncio.wait_for(fine, 10) == _answer(2)
        worker.stop()

    asyncio.run(run())


def test_a_batch_is_looked_up_while_it_is_classified_and_waits_for_no_later_look_up() -> None:
    """A model batch's look-ups are queued as the batch starts (``look_up_all``); the thread
    runs them together while the model classifies them, and a classified query then only waits
    for its own screening. In one pass,
    queries whose look-up is done are screened before the pass's new look-ups run, and those
    that waited on them after; ``after_pass`` (writing the answers) runs last."""
    events: list[tuple[str, list[str]]] = []
    release, taken = threading.Event(), threading.Event()

    def look_up(queries: Sequence[LookUp]) -> None:
        events.append(("look up", [q.client_id for q in queries]))
        for query in queries:
            query.print = QueryPrint(np.zeros(1, np.uint64), np.zeros(1, np.uint64), b"")

    def screen_batch(batch: Sequence[Pending]) -> list[Answer | None]:
        events.append(("screen", [p.client_id for p in batch]))
        assert all(p.look_up is not None and p.look_up.print is not None for p in batch)
        taken.set()
        release.wait(10)
        return [pending.answer for pending in batch]

    worker = ScreeningWorker(
        screen_batch, look_up_batch=look_up, after_pass=lambda: events.append(("after", []))
    )

    async def run() -> list[Answer | None]:
        pixels = torch.zeros(3, 4, 4)
        first = worker.look_up("first", pixels)
        early = worker.look_up("early", pixels)
        assert first is not None and early is not None
        worker.look_up_all([first, early])  # one model batch's
        worker.start()
        while early.print is None:  # looked up before "classified"
            await asyncio.sleep(0.01)
        futures = [worker.submit("first", pixels, _answer(0), None, first)]
        assert await asyncio.to_thread(taken.wait, 10)  # "first" is being screened
        late = worker.look_up("late", pixels)
        assert late is not None
        worker.look_up_all([late])
        futures.append(worker.submit("early", pixels, _answer(1), None, early))
        futures.append(worker.submit("late", pixels, _answer(2), None, late))
        release.set()
        results = [await asyncio.wait_for(f, 10) for f in futures if f is not None]
        worker.stop()
        return results

    assert asyncio.run(run()) == [_answer(i) for i in range(3)]
    assert events == [
        ("look up", ["first", "early"]),
        ("after", []),
        ("screen", ["first"]),
        ("after", []),
        ("screen", ["early"]),  # looked up already: before the pass's new look-up
        ("look up", ["late"]),
        ("screen", ["late"]),
        ("after", []),  # once the pass's answers are out
    ]
    plain = ScreeningWorker(screen_batch)  # nothing to look up early: looked up when screened
    assert plain.look_up("a", torch.zeros(3, 4, 4)) is None


def test_a_batchs_statistics_are_recorded_at_once_beside_its_screening() -> None:
    """The observations of a screened batch go to ``track`` in one call, in arrival order, on
    the tracking thread while the batch is screened (both with Redis are round trips), before
    any of the batch's futures resolves; when it raises, the queries it was recording fail and
    the others are answered."""
    calls: list[tuple[list[str], str, bool]] = []
    overlapped: list[bool] = []
    futures: dict[str, asyncio.Future[Answer | None]] = {}

    def track(observations: Sequence[Observation]) -> None:
        names = [o.client_id for o in observations]
        done = any(futures[name].done() for name in names)
        calls.append((names, threading.current_thread().name, done))
        recording.set()
        if "bad" in names:
            raise ValueError("tracker bug")

    release, taken, recording = threading.Event(), threading.Event(), threading.Event()

    def screen_batch(batch: Sequence[Pending]) -> list[Answer | None]:
        if not overlapped:  # the first batch: is it being recorded while it is screened?
            overlapped.append(recording.wait(5))
        taken.set()
        release.wait(10)
        return [pending.answer for pending in batch]

    worker = ScreeningWorker(screen_batch, track=track)

    def send(name: str, i: int, tracked: bool = True) -> None:
        observation = Observation(name, 0.5, True, float(i)) if tracked else None
        future = worker.submit(name, torch.zeros(3, 4, 4), _answer(i), observation)
        assert future is not None
        futures[name] = future

    async def answer_of(name: str) -> Answer | None:
        return await asyncio.wait_for(futures[name], 10)

    async def run() -> None:
        worker.start()
        send("first", 0)
        assert await asyncio.to_thread(taken.wait, 10)  # being screened: the next three wait
        for i, name in enumerate(("a", "b", "c"), start=1):
            send(name, i)
        release.set()
        assert [await answer_of(n) for n in ("first", "a", "b", "c")] == [
            _answer(i) for i in range(4)
        ]
        assert [names for names, _, _ in calls] == [["first"], ["a", "b", "c"]]
        assert all(thread.startswith("advguard-tracking") and not done for _, thread, done in calls)
        assert overlapped == [True]  # recorded while its batch was being screened
        release.clear()
        taken.clear()
        send("blocker", 4)
        assert await asyncio.to_thread(taken.wait, 10)
        send("bad", 5)
        send("untracked", 6, tracked=False)
        release.set()
        assert await answer_of("blocker") == _answer(4)
        with pytest.raises(ValueError, match="tracker bug"):
            await answer_of("bad")
        assert await answer_of("untracked") == _answer(6)
        worker.stop()

    asyncio.run(run())


@pytest.mark.parametrize("store", ["in_process", "redis"])
def test_a_changed_answer_is_screened_before_it_is_served(
    store: str,
    sequence: np.ndarray,
    request: pytest.FixtureRequest,
) -> None:
    """The changed-answer count, through the screening path the service runs: a near-duplicate
    whose answer would carry another class than its anchor's is detected at that query (below
    the near-duplicate counts), and ``silent`` serves the anchor's answer instead; a rejected
    near-duplicate tells no class and passes."""
    overrides: dict[str, Any] = {"stateful_changed_matches": 1}
    if store == "redis":
        overrides["redis_url"] = request.getfixturevalue("redis_server").url
        overrides["redis_prefix"] = f"t-{uuid.uuid4().hex[:8]}"
    settings = Settings(device="cpu", **_settings("silent") | overrides)
    flagged: list[tuple[str, str]] = []

    def flag(client: str, reason: str, at: float) -> bool:
        flagged.append((client, reason))
        return True

    detector = build_stateful(settings, Metrics(), flag, 3 * 32 * 32)
    assert detector is not None and detector.rule.changed_matches == 1
    pixels = torch.from_numpy(sequence[:4].astype(np.float32) / 255.0)
    cat, dog = Answer("accepted", 3, 0.9, 0.5), Answer("accepted", 5, 0.8, 0.4)
    rejected_dog = Answer("rejected", 5, 0.7, 0.001)
    answers = [cat, rejected_dog, cat, dog]
    batch = [Pending("mallory", pixels[i], answers[i]) for i in range(4)]
    try:
        served = detector.screen_batch(batch)
    finally:
        detector.close()
    assert served == [cat, rejected_dog, cat, cat]  # the dog answer withheld: the anchor's
    assert flagged == [("mallory", "query_attack")]


@dataclass
class Screened:
    """One batch screened by a fresh detector built from the settings: what it served, whom it
    flagged, its metrics."""

    served: list[Answer | None]
    flagged: list[str]
    metrics: Metrics
    rule: DetectionRule

    def outcomes(self, policy: str, outcome: str) -> float:
        value: float = self.metrics.stateful.labels(policy=policy, outcome=outcome)._value.get()
        return value


def screen_once(settings: dict[str, Any], batch: list[Pending]) -> Screened:
    flagged: list[str] = []

    def flag(client: str, reason: str, at: float) -> bool:
        flagged.append(client)
        return True

    metrics = Metrics()
    prefix = {"redis_prefix": uuid.uuid4().hex[:8]}
    detector = build_stateful(Settings(device="cpu", **settings | prefix), metrics, flag, 3072)
    assert detector is not None
    try:
        served = detector.screen_batch(batch)
    finally:
        detector.close()
    return Screened(served, flagged, metrics, detector.rule)


def _store_overrides(store: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    if store == "redis":
        return {"redis_url": request.getfixturevalue("redis_server").url}
    return {}


@pytest.mark.parametrize("store", ["in_process", "redis"])
@pytest.mark.parametrize("policy", ["refuse", "silent", "flag"])
def test_a_class_change_below_the_counts_hears_its_anchor(
    store: str,
    policy: str,
    sequence: np.ndarray,
    request: pytest.FixtureRequest,
) -> None:
    """The default rule's consistent count: a near-duplicate whose answer would change its
    anchor's class, with fewer matches than the changed-answer count, is not detected, but under
    ``refuse`` and ``silent`` it is served its anchor's answer (counted as ``consistent``), and
    nobody is flagged; ``flag`` answers as usual. With the count off it is answered as usual."""
    cat, dog = Answer("accepted", 3, 0.9, 0.5), Answer("accepted", 5, 0.8, 0.4)
    pixels = torch.from_numpy(sequence[:2].astype(np.float32) / 255.0)
    batch = [Pending("mallory", pixels[0], cat), Pending("mallory", pixels[1], dog)]
    served_by: dict[int, list[Answer | None]] = {}
    for consistent in (1, 0):
        settings = _settings(policy) | _store_overrides(store, request)
        screened = screen_once(settings | {"stateful_consistent_matches": consistent}, batch)
        assert screened.rule.changed_matches == DEFAULT_RULE.changed_matches == 2
        assert screened.flagged == []
        counted = screened.outcomes(policy, "consistent")
        assert counted == (1 if consistent and policy != "flag" else 0)
        assert screened.outcomes(policy, "clear") == 2 - counted
        served_by[consistent] = screened.served
    assert served_by[1] == ([cat, dog] if policy == "flag" else [cat, cat])
    assert served_by[0] == [cat, dog]


@pytest.mark.parametrize("store", ["in_process", "redis"])
def test_squares_first_probe_from_another_id_hears_its_photos_answer(
    store: str,
    photos: np.ndarray,  # noqa: F811
    request: pytest.FixtureRequest,
) -> None:
    """A photo, then Square's first probe of it (+-8/255 stripes: no near-duplicate, a close
    copy) from another client id, answered with another class: under ``refuse`` the probe is
    served the photo's answer (``consistent``), nobody flagged or refused; with close copies off
    (``ADVGUARD_STATEFUL_CLOSE_RADIUS=0``) it is answered as usual."""
    cat, dog = Answer("accepted", 3, 0.9, 0.5), Answer("accepted", 5, 0.8, 0.4)
    signs = np.random.default_rng(2).choice([-8, 8], size=(3, 1, 32))
    probe = np.clip(photos[20].astype(np.int16) + signs, 0, 255).astype(np.uint8)
    pixels = torch.from_numpy(np.stack([photos[20], probe]).astype(np.float32) / 255.0)
    batch = [Pending("photo-sender", pixels[0], cat), Pending("prober", pixels[1], dog)]
    served_by: dict[int, list[Answer | None]] = {}
    for radius in (9, 0):
        settings = _settings("refuse") | _store_overrides(store, request)
        screened = screen_once(settings | {"stateful_close_radius": radius}, batch)
        assert screened.flagged == []
        assert screened.outcomes("refuse", "consistent") == (1 if radius else 0)
        served_by[radius] = screened.served
    assert served_by == {9: [cat, cat], 0: [cat, dog]}
