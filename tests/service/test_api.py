"""The behavioural suite of the HTTP API, run against both trackers (in-process and Redis)."""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest
from pydantic import ValidationError

from app.core import search
from app.core.guard import Guard
from app.service.batcher import QueueFullError
from app.service.settings import Settings
from tests.service.helpers import LabelledImage, admin_of, fgsm, upload

ADMIN = {"X-Admin-Token": "s3cret"}


def test_classify_accepts_and_hides_scores(
    make_client: Any, test_images: list[LabelledImage]
) -> None:
    with make_client() as client:
        responses = [upload(client, image.data) for image in test_images[:10]]
    assert all(r.status_code == 200 for r in responses)
    bodies = [r.json() for r in responses]
    assert {b["decision"] for b in bodies} <= {"accepted", "rejected"}
    for body, response in zip(bodies, responses, strict=True):
        assert re.fullmatch(r"[0-9a-f]{32}", body["request_id"])
        assert response.headers["x-request-id"] == body["request_id"]
        assert body["score"] is None and body["threshold"] is None
        if body["decision"] == "accepted":
            assert 0 <= body["prediction"]["class_index"] < 10
            assert 0.0 < body["prediction"]["probability"] <= 1.0
        else:
            assert body["prediction"] is None
    correct = sum(
        b["prediction"] is not None and b["prediction"]["class_index"] == image.label
        for b, image in zip(bodies, test_images[:10], strict=True)
    )
    assert correct >= 6  # ~80% top-1 on CIFAR-10 JPEGs


def test_expose_scores_and_rejected_label_withheld(
    make_client: Any, guard: Guard, test_images: list[LabelledImage]
) -> None:
    adversarials = fgsm(guard, test_images[:20])
    with make_client(expose_scores=True) as client:
        bodies = [upload(client, data).json() for data in adversarials]
    for body in bodies:
        assert body["threshold"] == pytest.approx(guard.threshold)
        assert (body["score"] >= body["threshold"]) == (body["decision"] == "accepted")
        assert (body["prediction"] is None) == (body["decision"] == "rejected")
    assert any(b["decision"] == "rejected" for b in bodies)


def test_health_ready_bundle(make_client: Any, tracker_kind: str, guard: Guard) -> None:
    with make_client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz").json()
        assert ready["status"] == "ok" and ready["bundle_loaded"] and ready["tracker"] == "ok"
        assert ready["tracker_backend"] == tracker_kind
        bundle = client.get("/v1/bundle").json()
    assert bundle["name"] == guard.manifest.name
    assert bundle["k"] == guard.manifest.detector.k
    assert bundle["class_names"] == guard.class_names
    assert bundle["threshold"] is None and bundle["flag_threshold"] is None  # withheld
    with make_client(expose_scores=True) as client:
        exposed = client.get("/v1/bundle").json()
    assert exposed["threshold"] == pytest.approx(guard.threshold)
    assert exposed["flag_policy"] == client.app_state.service.flag_policy.kind
    assert exposed["flag_threshold"] == pytest.approx(
        client.app_state.service.flag_policy.threshold
    )


def _metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} missing"
    return float(match.group(1))


def test_metrics(make_client: Any, test_images: list[LabelledImage]) -> None:
    with make_client() as client:
        for image in test_images[:4]:
            upload(client, image.data, {"X-Client-ID": "metrics-client"})
        upload(client, b"not an image", {"X-Client-ID": "metrics-client"})
        text = admin_of(client).get("/metrics").text
    accepted = _metric(text, "advguard_requests_total", '{decision="accepted"}')
    rejected = _metric(text, "advguard_requests_total", '{decision="rejected"}')
    assert accepted + rejected == 4
    assert _metric(text, "advguard_requests_total", '{decision="error"}') == 1
    assert _metric(text, "advguard_http_responses_total", '{status="400"}') == 1
    assert _metric(text, "advguard_http_responses_total", '{status="200"}') >= 4
    assert _metric(text, "advguard_score_count") == 4
    assert 'advguard_score_bucket{le="0.163"}' in text
    for stage in ("decode", "queue", "model", "search", "total"):
        assert _metric(text, "advguard_stage_seconds_count", f'{{stage="{stage}"}}') == 4
    assert _metric(text, "advguard_batch_size_sum") == 4
    for gauge in (
        "advguard_queue_depth",
        "advguard_flagged_clients",
        "advguard_tracker_buffered_updates",
        "advguard_tracker_errors_total",
        "advguard_clients_flagged_total",
    ):
        assert _metric(text, gauge) == 0
    assert re.search(r'^advguard_bundle_info\{.*name="cifar10-resnet20".*\} 1\.0$', text, re.M)
    assert "metrics-client" not in text  # no per-client label


def test_api_keys(make_client: Any) -> None:
    with make_client(api_keys={"alice": "key-a", "bob": "key-b"}, admin_token="s3cret") as c:
        data = _tiny_png()
        assert upload(c, data).status_code == 401
        assert upload(c, data, {"X-API-Key": "wrong"}).status_code == 401
        assert upload(c, data, {"X-API-Key": "", "X-Client-ID": "alice"}).status_code == 401
        assert upload(c, data, {"X-API-Key": "key-b", "X-Client-ID": "alice"}).status_code == 200
        assert admin_of(c).get("/clients/bob", headers=ADMIN).json()["requests"] == 1
        assert admin_of(c).get("/clients/alice", headers=ADMIN).status_code == 404


def test_client_identity_and_trusted_proxies(make_client: Any) -> None:
    data = _tiny_png()
    with make_client(trusted_proxies=["10.0.0.0/8"], admin_token="s3cret") as c:
        upload(c, data, {"X-Client-ID": "named"})
        upload(c, data)  # TestClient's peer is "testclient" (not an address: never trusted)
        upload(c, data, {"X-Forwarded-For": "1.2.3.4"})
        assert admin_of(c).get("/clients/named", headers=ADMIN).json()["requests"] == 1
        assert admin_of(c).get("/clients/testclient", headers=ADMIN).json()["requests"] == 2
        assert admin_of(c).get("/clients/1.2.3.4", headers=ADMIN).status_code == 404
        assert upload(c, data, {"X-Client-ID": "x" * 500}).status_code == 400


def test_forwarded_for_only_from_trusted_proxies() -> None:
    from app.service.identity import IdentityResolver

    resolver = IdentityResolver.build({}, ["10.0.0.0/8", "192.168.1.1"])
    assert resolver.peer_client("10.1.2.3", "8.8.8.8, 192.168.1.1") == "8.8.8.8"
    assert resolver.peer_client("10.1.2.3", "6.6.6.6, 8.8.8.8, 10.9.9.9") == "8.8.8.8"
    assert resolver.peer_client("7.7.7.7", "8.8.8.8") == "7.7.7.7"  # untrusted peer
    assert resolver.peer_client("10.1.2.3", None) == "10.1.2.3"


def test_admin_endpoints_and_refuse_policy(
    make_client: Any, test_images: list[LabelledImage]
) -> None:
    # every score is below a mean threshold of 1.0: flagged after 3 scored requests
    settings = {
        "flag_policy": "mean",
        "flag_threshold": 1.0,
        "flag_min_requests": 3,
        "admin_token": "s3cret",
    }
    with make_client(policy="refuse", **settings) as client:
        hdr = {"X-Client-ID": "mallory"}
        codes = [upload(client, image.data, hdr).status_code for image in test_images[:5]]
        assert codes == [200, 200, 200, 403, 403]
        assert admin_of(client).get("/clients/mallory").status_code == 401  # no token
        assert (
            admin_of(client).get("/clients/mallory", headers={"X-Admin-Token": "no"}).status_code
            == 401
        )
        stats = admin_of(client).get("/clients/mallory", headers=ADMIN).json()
        assert stats["requests"] == 3 and stats["scored"] == 3 and stats["flagged"]
        assert stats["accepted"] + stats["rejected"] == 3
        assert stats["first_seen"] <= stats["last_seen"]
        listed = admin_of(client).get("/clients?flagged=true", headers=ADMIN).json()["clients"]
        assert [c["client_id"] for c in listed] == ["mallory"]
        assert "advguard_clients_flagged_total 1.0" in admin_of(client).get("/metrics").text
        assert "advguard_flagged_clients 1.0" in admin_of(client).get("/metrics").text
        cleared = admin_of(client).delete("/clients/mallory/flag", headers=ADMIN).json()
        assert cleared == {"client_id": "mallory", "cleared": True}
        stats = admin_of(client).get("/clients/mallory", headers=ADMIN).json()
        assert not stats["flagged"] and stats["scored"] == 0 and stats["requests"] == 3
        assert upload(client, test_images[5].data, hdr).status_code == 200
        assert admin_of(client).get("/clients?flagged=true", headers=ADMIN).json()["clients"] == []
        assert (
            admin_of(client).delete("/clients/nobody/flag", headers=ADMIN).json()["cleared"]
            is False
        )


@pytest.mark.parametrize(
    "header",
    [
        b"x" * 129,  # one character too long
        "é".encode() * 129,
        b"tab\there",  # a control character
    ],
)
def test_an_unusable_client_id_is_refused(make_client: Any, header: bytes) -> None:
    with make_client() as client:
        response = client.post("/classify", files={"file": b"x"}, headers={"X-Client-ID": header})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_client_id"


def test_a_client_id_that_is_not_utf8_is_refused() -> None:
    """The app sees header bytes decoded as latin-1 (the test client cannot send bytes that are
    not UTF-8, so the resolver is called as the server would call it)."""
    from app.service.identity import IdentityResolver, InvalidClientIdError

    resolver = IdentityResolver.build({}, [])
    with pytest.raises(InvalidClientIdError, match="UTF-8"):
        resolver.resolve(
            api_key=None, client_id=b"\xff\xfe".decode("latin-1"), peer=None, forwarded_for=None
        )
    as_sent = "héllo".encode().decode("latin-1")
    assert resolver.resolve(api_key=None, client_id=as_sent, peer=None, forwarded_for=None) == (
        "héllo"
    )


@pytest.mark.parametrize("client_id", ["héllo✓", "é" * 128, "日本"])
def test_a_utf8_client_id_is_tracked_under_its_own_name(
    make_client: Any, test_images: list[LabelledImage], client_id: str
) -> None:
    """Header values reach the app decoded as latin-1: "héllo" used to be stored as "hÃ©llo",
    and "héllo✓" refused; the 128 limit counted bytes."""
    with make_client(admin_token="s3cret") as client:
        sent = upload(client, test_images[0].data, {"X-Client-ID": client_id.encode()})
        assert sent.status_code == 200, sent.text
        stats = admin_of(client).get(f"/clients/{quote(client_id)}", headers=ADMIN).json()
    assert stats["client_id"] == client_id and stats["requests"] == 1


@pytest.mark.parametrize("client_id", ["team/alice", "a/flag", "/lead", "x//y/"])
def test_a_client_id_with_slashes_can_be_looked_up_and_cleared(
    make_client: Any, test_images: list[LabelledImage], client_id: str
) -> None:
    """The admin routes' id is a path: 'team/alice' (as /clients/team/alice or team%2Falice)
    used to answer 404 to both, so such a flagged client could never be cleared."""
    settings = {"flag_policy": "mean", "flag_threshold": 1.0, "flag_min_requests": 2}
    with make_client(policy="refuse", admin_token="s3cret", **settings) as client:
        hdr = {"X-Client-ID": client_id}
        codes = [upload(client, image.data, hdr).status_code for image in test_images[:3]]
        assert codes == [200, 200, 403]
        admin = admin_of(client)
        for path in (client_id, quote(client_id, safe="")):
            stats = admin.get(f"/clients/{path}", headers=ADMIN).json()
            assert stats["client_id"] == client_id and stats["flagged"], path
        cleared = admin.delete(f"/clients/{quote(client_id, safe='')}/flag", headers=ADMIN)
        assert cleared.json() == {"client_id": client_id, "cleared": True}
        assert upload(client, test_images[3].data, hdr).status_code == 200


def test_admin_disabled_without_token(make_client: Any) -> None:
    with make_client() as client:
        response = admin_of(client).get("/clients?flagged=true", headers=ADMIN)
    assert response.status_code == 403 and response.json()["error"] == "admin_disabled"


def test_flag_only_policy_keeps_serving(make_client: Any, test_images: list[LabelledImage]) -> None:
    with make_client(
        flag_policy="mean", flag_threshold=1.0, flag_min_requests=2, admin_token="s3cret"
    ) as client:
        codes = [upload(client, image.data).status_code for image in test_images[:4]]
        assert codes == [200] * 4
        assert admin_of(client).get("/clients/testclient", headers=ADMIN).json()["flagged"]


def test_queue_full_is_503_with_retry_after(
    make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with make_client(retry_after_s=3) as client:
        batcher = client.app_state.service.batcher

        def full(
            _pixels: object,
            explain: bool = False,
            client_id: str | None = None,
            look_up: object = None,
        ) -> None:
            raise QueueFullError("the classification queue is full")

        monkeypatch.setattr(batcher, "submit", full)
        response = upload(client, _tiny_png())
        assert response.status_code == 503
        assert response.headers["retry-after"] == "3"
        assert response.json()["error"] == "overloaded"
        monkeypatch.undo()
        assert upload(client, _tiny_png()).status_code == 200


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 80, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_search_threads_setting_is_applied_on_the_batch_worker(
    make_client: Any, test_images: list[LabelledImage]
) -> None:
    """``ADVGUARD_SEARCH_THREADS`` sets faiss's search threads on the thread that searches (the
    batch worker: OpenMP keeps the setting per thread), default one; zero is refused."""
    for overrides, expected in (({}, search.SERVING_THREADS), ({"search_threads": 3}, 3)):
        with make_client(**overrides) as client:
            assert upload(client, test_images[0].data).status_code == 200  # the worker ran
            assert client.app_state.service.batcher.search_threads_in_use == expected
    assert search.SERVING_THREADS == 1
    with pytest.raises(ValidationError, match="search_threads"):
        Settings(search_threads=0)


def test_the_in_process_tracker_is_called_on_the_event_loop_and_redis_on_a_worker_thread(
    make_client: Any, tracker_kind: str, test_images: list[LabelledImage]
) -> None:
    """Without the query screening, the route records each classification itself, and under
    ``refuse`` checks the client's flag first: the in-process tracker is called right on the
    event loop (its lock is held for microseconds; a hop to a thread cost more than the call),
    Redis on a worker thread (a round trip must not hold the loop)."""
    with make_client(stateful_enabled=False, policy="refuse") as client:
        service = client.app_state.service
        called_on: dict[str, str] = {}

        def spy(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                called_on[name] = threading.current_thread().name
                return method(*args, **kwargs)

            return wrapped

        # the batcher's submit must run on the event loop: it names the loop's thread
        service.batcher.submit = spy("submit", service.batcher.submit)
        service.tracker.record_many = spy("record_many", service.tracker.record_many)
        service.tracker.is_flagged = spy("is_flagged", service.tracker.is_flagged)
        assert upload(client, test_images[0].data, {"X-Client-ID": "t1"}).status_code == 200
        assert service.tracker.get("t1").requests == 1
    loop = called_on["submit"]
    if tracker_kind == "memory":
        assert called_on["record_many"] == loop and called_on["is_flagged"] == loop
    else:
        assert called_on["record_many"] != loop and called_on["is_flagged"] != loop


def test_switch_interval_setting_is_applied_and_bounded(make_client: Any) -> None:
    """``ADVGUARD_SWITCH_INTERVAL_MS`` sets the interpreter's switch interval at start; unset,
    Python's stays."""
    before = sys.getswitchinterval()
    try:
        with make_client() as client:
            assert client.get("/healthz").status_code == 200
            assert sys.getswitchinterval() == before
        with make_client(switch_interval_ms=0.5) as client:
            assert client.get("/healthz").status_code == 200
            assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(before)
    for bad in (0.0, -1.0, 1000.0):
        with pytest.raises(ValidationError):
            Settings(switch_interval_ms=bad)


def test_not_ready_says_when_to_retry() -> None:
    """Before the bundle is loaded (the lifespan not run yet) every route that needs the service
    answers 503 not_ready with Retry-After: 1, as the README's error table says."""
    import asyncio

    from fastapi import FastAPI
    from starlette.requests import Request

    from app.service.routes import get_service
    from app.service.state import ApiError

    request = Request({"type": "http", "app": FastAPI(), "headers": []})
    with pytest.raises(ApiError) as refused:
        asyncio.run(get_service(request))
    assert refused.value.status == 503 and refused.value.code == "not_ready"
    assert refused.value.headers == {"Retry-After": "1"}


def test_admin_paths_with_any_client_id_ask_for_the_token_first(make_client: Any) -> None:
    """A line break in the id (no id holds one) once matched no route, answering 404 before the
    token was checked (found by the schema fuzzer)."""
    with make_client(admin_token="s3cret") as client:
        admin = admin_of(client)
        for path in ("/clients/%0A0", "/clients/a%0Ab/flag"):
            method = admin.delete if path.endswith("/flag") else admin.get
            assert method(path).status_code == 401
        assert admin.get("/clients/%0A0", headers=ADMIN).json()["error"] == "unknown_client"
        cleared = admin.delete("/clients/a%0Ab/flag", headers=ADMIN).json()
        assert cleared == {"client_id": "a\nb", "cleared": False}
