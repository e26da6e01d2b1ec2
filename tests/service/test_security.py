"""Security properties of the service: constant-time secrets, admin token on every admin route,
no client-id spoofing once API keys are configured, X-Forwarded-For only from trusted proxies,
no scores or stack traces in responses, and requests refused before their body is read (API key)
or decoded (byte limit)."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr

import app.service.identity as identity_module
import app.service.routes as routes_module
from app.core.guard import Guard
from app.service.identity import IdentityError, IdentityResolver
from app.service.main import DRAIN_BYTES, create_app
from app.service.settings import Settings
from tests.service.helpers import LabelledImage, admin_of, fgsm, upload

KEYS = {"alice": "key-alice-0123456789", "bob": "key-bob-9876543210xyz"}
TOKEN = "admin-s3cret-token"
LIMIT = 100_000
ADMIN_ROUTES = (
    ("GET", "/clients/alice"),
    ("GET", "/clients?flagged=true"),
    ("DELETE", "/clients/alice/flag"),
)


def _png(size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (120, 80, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def keyed() -> Iterator[tuple[FastAPI, TestClient]]:
    settings = Settings(
        device="cpu",
        api_keys=KEYS,
        admin_token=TOKEN,
        max_upload_bytes=LIMIT,
        trusted_proxies=["10.0.0.0/8"],
    )
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield app, client


# --------------------------------------------------------------------------- raw ASGI calls


def _scope(headers: dict[str, str], path: str = "/classify") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
    }


async def _asgi_call_async(
    app: FastAPI, headers: dict[str, str], body: bytes, path: str = "/classify"
) -> tuple[int, dict[bytes, bytes], bytes, int]:
    """One request straight into the ASGI app; returns status, headers, body and how many times
    the app asked for the request body."""
    reads = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(_scope(headers, path), receive, send)  # type: ignore[arg-type]
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), payload, reads


def _asgi_call(
    app: FastAPI, headers: dict[str, str], body: bytes, path: str = "/classify"
) -> tuple[int, dict[bytes, bytes], bytes, int]:
    return asyncio.run(_asgi_call_async(app, headers, body, path))


def _multipart(data: bytes) -> tuple[dict[str, str], bytes]:
    boundary = "securityboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(body)),
    }
    return headers, body


def test_api_key_refused_before_the_body_is_read(
    keyed: tuple[FastAPI, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No valid key: 401 from the middleware. A large body is not read at all (and the
    connection is closed); a small one is read and discarded, never parsed, so that the client
    sees the response rather than a reset connection."""
    app, _ = keyed
    parsed: list[int] = []
    real_form = Request.form

    def spy_form(self: Request, **kwargs: Any) -> Any:
        parsed.append(1)
        return real_form(self, **kwargs)

    monkeypatch.setattr(Request, "form", spy_form)
    big_headers, big_body = _multipart(b"\0" * (DRAIN_BYTES + 1000))
    small_headers, small_body = _multipart(_png())
    for presented in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}, {"X-Client-ID": "alice"}):
        status, response_headers, payload, reads = _asgi_call(
            app, {**big_headers, **presented}, big_body
        )
        assert status == 401 and reads == 0, (presented, payload)
        assert b'"error":"unauthorized"' in payload
        assert response_headers[b"www-authenticate"] == b"ApiKey"
        assert response_headers[b"connection"] == b"close"
        status, response_headers, payload, reads = _asgi_call(
            app, {**small_headers, **presented}, small_body
        )
        assert status == 401 and reads == 1 and b"connection" not in response_headers
    assert parsed == []
    headers, body = small_headers, small_body
    status, _, payload, reads = _asgi_call(app, {**headers, "X-API-Key": KEYS["bob"]}, body)
    assert status == 200 and reads >= 1, payload


def test_byte_limit_refused_before_the_body_is_read(keyed: tuple[FastAPI, TestClient]) -> None:
    """The 413 is decided and sent whole before a byte of the body is read; the body is then
    read only to be discarded (lingering close, app.service.linger), and the response ends."""
    app, _ = keyed
    headers, body = _multipart(b"\0" * (LIMIT + 50_000))
    events: list[str] = []

    async def receive() -> dict[str, Any]:
        events.append("read")
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        more = message.get("more_body", False)
        events.append(f"{message['type']}{'+' if more else ''}:{message.get('status', '')}")

    scope = _scope({**headers, "X-API-Key": KEYS["bob"]})
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    assert events == [
        "http.response.start:413",
        "http.response.body+:",  # the whole JSON refusal
        "read",  # the unread body, discarded
        "http.response.body:",  # the end of the response
    ]


def test_byte_limit_enforced_before_decoding(
    keyed: tuple[FastAPI, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file over the limit whose multipart body fits the framing allowance never reaches the
    image decoder."""
    _, client = keyed
    decoded: list[int] = []
    real = routes_module.decode_image

    def spy(data: bytes, max_pixels: int, min_size: int | None = None) -> Any:
        decoded.append(len(data))
        return real(data, max_pixels, min_size=min_size)

    monkeypatch.setattr(routes_module, "decode_image", spy)
    key = {"X-API-Key": KEYS["alice"]}
    response = upload(client, b"\x89PNG" + b"\0" * LIMIT, key)
    assert response.status_code == 413 and decoded == []
    assert upload(client, _png(), key).status_code == 200 and len(decoded) == 1


# --------------------------------------------------------------------------- secrets


def test_secrets_compared_in_constant_time(
    keyed: tuple[FastAPI, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every configured key is compared (no early exit), with ``hmac.compare_digest``, on
    equal-length digests; the admin token likewise."""
    calls: list[tuple[int, int]] = []
    real = identity_module.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(identity_module.hmac, "compare_digest", spy)
    keys = {cid: SecretStr(key) for cid, key in {**KEYS, "carol": "k"}.items()}
    resolver = IdentityResolver.build(keys, [])
    for presented in (KEYS["alice"], KEYS["bob"], "k", "wrong", "x" * 1000, ""):
        calls.clear()
        with contextlib.suppress(IdentityError):
            resolver.client_for_key(presented)
        assert calls == [(32, 32)] * 3, presented
    assert resolver.client_for_key(KEYS["alice"]) == "alice"
    assert resolver.client_for_key("k") == "carol"

    _, client = keyed
    calls.clear()
    assert (
        admin_of(client)
        .get("/clients?flagged=true", headers={"X-Admin-Token": "short"})
        .status_code
        == 401
    )
    assert calls == [(32, 32)]


def test_admin_routes_need_the_admin_token(keyed: tuple[FastAPI, TestClient]) -> None:
    _, client = keyed
    wrong = (
        {},
        {"X-Admin-Token": ""},
        {"X-Admin-Token": "wrong"},
        {"X-Admin-Token": TOKEN[:-1]},
        {"X-Admin-Token": TOKEN + "x"},
        {"X-Admin-Token": TOKEN.upper()},
        {"X-API-Key": KEYS["alice"]},  # a client key is not an admin token
        {"Authorization": f"Bearer {TOKEN}"},
    )
    admin = admin_of(client)
    for method, path in ADMIN_ROUTES:
        for headers in wrong:
            response = admin.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert response.json()["error"] == "unauthorized"
        right = admin.request(method, path, headers={"X-Admin-Token": TOKEN})
        body = right.json()
        if path == "/clients/alice":  # alice's statistics, or none yet: never a missing route
            assert (right.status_code, body.get("client_id", body.get("error"))) in (
                (200, "alice"),
                (404, "unknown_client"),
            ), right.text
        elif path == "/clients?flagged=true":
            assert right.status_code == 200 and isinstance(body["clients"], list), right.text
        else:
            assert right.status_code == 200 and body["client_id"] == "alice", right.text


def test_public_port_answers_admin_paths_404(keyed: tuple[FastAPI, TestClient]) -> None:
    """/metrics and the admin routes live on the admin listener only: the public one does not
    know them, even with the right token, so they cannot leak through a public ingress."""
    _, client = keyed
    for method, path in (*ADMIN_ROUTES, ("GET", "/metrics")):
        response = client.request(method, path, headers={"X-Admin-Token": TOKEN})
        assert response.status_code == 404, (method, path)
        assert response.json()["error"] == "not_found"
    assert admin_of(client).get("/metrics").status_code == 200


@pytest.mark.parametrize("token", [None, ""])
def test_admin_routes_disabled_without_a_token(token: str | None) -> None:
    """No token, or an empty one (``ADVGUARD_ADMIN_TOKEN=``), disables the admin routes: an empty
    token must not match a request that sends no header."""
    app = create_app(Settings(device="cpu", admin_token=token))
    with TestClient(app) as client:
        for method, path in ADMIN_ROUTES:
            for headers in ({}, {"X-Admin-Token": ""}):
                response = admin_of(client).request(method, path, headers=headers)
                assert response.status_code == 403, (token, method, path, headers)
                assert response.json()["error"] == "admin_disabled"


# --------------------------------------------------------------------------- identity


def test_client_id_ignored_once_keys_are_configured(keyed: tuple[FastAPI, TestClient]) -> None:
    _, client = keyed
    admin = {"X-Admin-Token": TOKEN}

    def requests(cid: str) -> int:
        response = admin_of(client).get(f"/clients/{cid}", headers=admin)
        return int(response.json()["requests"]) if response.status_code == 200 else 0

    before = {cid: requests(cid) for cid in ("alice", "bob", "9.9.9.9", "testclient")}
    spoof = {"X-API-Key": KEYS["alice"], "X-Client-ID": "bob", "X-Forwarded-For": "9.9.9.9"}
    assert upload(client, _png(), spoof).status_code == 200
    after = {cid: requests(cid) for cid in before}
    assert after == {**before, "alice": before["alice"] + 1}
    # an id without a key is refused, whatever headers come with it
    assert upload(client, _png(), {"X-Client-ID": "alice"}).status_code == 401


def test_forwarded_for_honoured_only_from_trusted_proxies() -> None:
    """Over real peer addresses: the header counts only when the peer is a trusted proxy."""
    settings = Settings(device="cpu", trusted_proxies=["10.0.0.0/8"], admin_token=TOKEN)
    app = create_app(settings)
    admin = {"X-Admin-Token": TOKEN}
    with TestClient(app, client=("10.1.2.3", 40000)) as proxied:
        untrusted = TestClient(app, client=("7.7.7.7", 40001))  # shares the started app
        assert upload(proxied, _png(), {"X-Forwarded-For": "8.8.8.8"}).status_code == 200
        chain = {"X-Forwarded-For": "6.6.6.6, 8.8.8.8, 10.9.9.9"}
        assert upload(proxied, _png(), chain).status_code == 200
        assert upload(proxied, _png(), {"X-Forwarded-For": "not-an-address"}).status_code == 200
        assert upload(proxied, _png()).status_code == 200
        assert upload(untrusted, _png(), {"X-Forwarded-For": "8.8.8.8"}).status_code == 200
        assert upload(untrusted, _png(), {"X-Forwarded-For": "10.1.2.3"}).status_code == 200

        def requests(cid: str) -> int:
            response = admin_of(proxied).get(f"/clients/{cid}", headers=admin)
            return int(response.json()["requests"]) if response.status_code == 200 else 0

        assert requests("8.8.8.8") == 2  # only the two from the trusted proxy
        assert requests("6.6.6.6") == 0  # a hop left of an untrusted one is never believed
        assert requests("10.1.2.3") == 2  # unparsable header, and no header: the proxy itself
        assert requests("7.7.7.7") == 2  # an untrusted peer cannot claim any address


# --------------------------------------------------------------------------- responses


def test_scores_and_threshold_never_returned_unless_enabled(
    keyed: tuple[FastAPI, TestClient], test_images: list[LabelledImage], guard: Guard
) -> None:
    _, client = keyed
    decisions = set()
    # authentic images, and FGSM adversarials of others so that some answers are rejections
    uploads = [image.data for image in test_images[:20]] + fgsm(guard, test_images[20:30])
    for data in uploads:
        response = upload(client, data, {"X-API-Key": KEYS["bob"]})
        body = response.json()
        decisions.add(body["decision"])
        assert body["score"] is None and body["threshold"] is None
        assert not any("score" in name.lower() for name in response.headers)
        if body["decision"] == "rejected":
            assert body["prediction"] is None
    assert decisions == {"accepted", "rejected"}
    error = upload(client, b"junk", {"X-API-Key": KEYS["bob"]}).json()
    assert set(error) == {"error", "message", "request_id"}


def test_no_stack_trace_on_an_unexpected_error(
    keyed: tuple[FastAPI, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, client = keyed
    batcher = app.state.service.batcher

    def broken(_pixels: object, explain: bool = False, client_id: str | None = None) -> None:
        raise RuntimeError("boom in /srv/secret/path.py line 42")

    monkeypatch.setattr(batcher, "submit", broken)
    response = upload(client, _png(), {"X-API-Key": KEYS["bob"]})
    assert response.status_code == 500
    assert response.json() == {
        "error": "internal_error",
        "message": "internal error",
        "request_id": response.json()["request_id"],
    }
    assert "boom" not in response.text and "Traceback" not in response.text
    monkeypatch.undo()
    assert upload(client, _png(), {"X-API-Key": KEYS["bob"]}).status_code == 200


def test_in_flight_limit_refuses_before_reading() -> None:
    """Past ``max_in_flight`` classifications a request gets 503 + Retry-After at once, its body
    unread; the slot frees when the admitted request is answered."""
    app = create_app(Settings(device="cpu", max_in_flight=1, retry_after_s=2))
    headers, body = _multipart(_png())
    with TestClient(app):

        async def scenario() -> None:
            release = asyncio.Event()
            sent_a: list[dict[str, Any]] = []

            async def slow_receive() -> dict[str, Any]:
                await release.wait()  # a slow upload holds its slot
                return {"type": "http.request", "body": body, "more_body": False}

            async def send_a(message: dict[str, Any]) -> None:
                sent_a.append(message)

            scope = _scope(headers)
            first = asyncio.create_task(app(scope, slow_receive, send_a))  # type: ignore[arg-type]
            await asyncio.sleep(0.05)
            status, response_headers, payload, reads = await _asgi_call_async(app, headers, body)
            assert status == 503 and reads == 1, payload  # small: drained, not parsed
            assert response_headers[b"retry-after"] == b"2"
            assert b'"error":"overloaded"' in payload
            big_headers, big_body = _multipart(b"\0" * (DRAIN_BYTES + 1000))
            status, response_headers, _, reads = await _asgi_call_async(app, big_headers, big_body)
            assert status == 503 and reads == 0
            assert response_headers[b"connection"] == b"close"
            release.set()
            await first
            assert sent_a[0]["status"] == 200
            status, _, payload, reads = await _asgi_call_async(app, headers, body)
            assert status == 200 and reads >= 1, payload

        asyncio.run(scenario())
