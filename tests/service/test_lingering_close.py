"""Oversize uploads get a readable 413, even from clients that send the whole body before
reading the reply (Python's urllib): the service answers, then reads and discards the rest of
the body within bounds before it closes (``app.service.linger``), instead of closing on unread
data, which resets the connection and loses the 413.

Against ``advguard serve`` on a loopback port (default 10 MiB limit): 11 MB and 64 MB urllib
uploads get the JSON 413; the server's RSS stays flat over 50 such uploads. The bounds
themselves are checked on the ASGI middleware directly (fast, no timing on a real socket).
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.service.linger import LingeringClose
from tests.deploy.helpers import advguard_serve
from tests.service.helpers import free_port

MB = 1_000_000
UPLOADS = 50
RSS_BOUND_MB = 40.0  # generous: the bodies alone are 11-64 MB each; a leak would show at once


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    port = free_port()
    log = tmp_path_factory.mktemp("linger") / "serve.log"
    with advguard_serve(port, log, {}, "--log-level", "warning") as process:
        yield f"http://127.0.0.1:{port}", process.pid


def _body(size: int) -> tuple[bytes, str]:
    boundary = "lingerboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + b"\0" * (size - len(head) - len(tail)) + tail, boundary


def urllib_upload(base: str, size: int) -> tuple[int, dict[str, Any]]:
    """urllib sends the whole body, then reads the reply: the client this is about."""
    body, boundary = _body(size)
    request = urllib.request.Request(
        f"{base}/classify",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS")


@pytest.mark.parametrize("size", [11 * MB, 64 * MB], ids=["11MB", "64MB"])
def test_urllib_gets_the_413_json(server: tuple[str, int], size: int) -> None:
    base, _ = server
    status, body = urllib_upload(base, size)
    assert status == 413
    assert body["error"] == "payload_too_large" and str(size) in body["message"]
    assert body["request_id"]


def test_rss_stays_flat_over_50_oversize_uploads(server: tuple[str, int]) -> None:
    base, pid = server
    for size in (11 * MB, 64 * MB):  # warm-up: buffers and code paths touched once
        assert urllib_upload(base, size)[0] == 413
    before = rss_mb(pid)
    peak = before
    for i in range(UPLOADS):
        assert urllib_upload(base, (11 if i % 2 else 64) * MB)[0] == 413
        peak = max(peak, rss_mb(pid))
    after = rss_mb(pid)
    print(f"RSS over {UPLOADS} oversize uploads: {before:.1f} -> {after:.1f} MB, peak {peak:.1f}")
    assert peak - before < RSS_BOUND_MB, (before, peak, after)


# --------------------------------------------------------------------------- bounds (ASGI)


async def _refuse_413(scope: Any, receive: Any, send: Any) -> None:
    """An app that refuses at once, without reading the body (as the service's middleware)."""
    await send({"type": "http.response.start", "status": 413, "headers": []})
    await send({"type": "http.response.body", "body": b'{"error":"payload_too_large"}'})


def _run(
    chunks: list[bytes | None], middleware: LingeringClose
) -> tuple[list[dict[str, Any]], int]:
    """Drive the middleware with a body arriving as ``chunks`` (None: the client goes quiet);
    returns what it sent and how many chunks it read."""
    sent: list[dict[str, Any]] = []
    read = 0

    async def receive() -> dict[str, Any]:
        nonlocal read
        chunk = chunks[read]
        if chunk is None:
            await asyncio.sleep(3600)  # silent client: only the idle bound ends the wait
        read += 1
        assert chunk is not None
        return {"type": "http.request", "body": chunk, "more_body": read < len(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    total = sum(len(c) for c in chunks if c is not None) + 1
    scope = {"type": "http", "headers": [(b"content-length", str(total).encode())]}
    asyncio.run(middleware(scope, receive, send))  # type: ignore[arg-type]
    return sent, read


def test_the_refusal_is_sent_whole_then_the_body_drained_then_closed() -> None:
    sent, read = _run([b"x" * 1000] * 5, LingeringClose(_refuse_413))
    assert read == 5  # the whole rest of the body, discarded
    start, refusal, end = sent
    assert (b"connection", b"close") in start["headers"]
    assert refusal["body"].startswith(b'{"error"') and refusal["more_body"] is True
    assert end == {"type": "http.response.body", "body": b"", "more_body": False}


def test_draining_stops_at_the_byte_bound() -> None:
    sent, read = _run([b"x" * 1000] * 50, LingeringClose(_refuse_413, max_bytes=3000))
    assert read == 3 and sent[-1]["more_body"] is False


def test_draining_stops_when_the_client_goes_quiet() -> None:
    chunks: list[bytes | None] = [b"x" * 1000, None]
    sent, read = _run(chunks, LingeringClose(_refuse_413, idle_s=0.05))
    assert read == 1 and sent[-1]["more_body"] is False


def test_other_statuses_and_fully_read_bodies_are_not_drained() -> None:
    async def ok(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    sent, read = _run([b"x"] * 3, LingeringClose(ok))
    assert read == 0 and len(sent) == 2 and "more_body" not in sent[1]


def test_a_client_waiting_for_100_continue_is_not_waited_for() -> None:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        raise AssertionError("nothing to read: the client sends no body after a refusal")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "headers": [(b"content-length", b"99999999"), (b"expect", b"100-continue")],
    }
    asyncio.run(LingeringClose(_refuse_413)(scope, receive, send))  # type: ignore[arg-type]
    assert len(sent) == 2 and sent[1].get("more_body", False) is False


def test_without_draining_urllib_gets_a_reset(tmp_path: Path) -> None:
    """The failure this fixes, reproduced with the bound at 0: the server closes on unread data
    and urllib sees a reset (or a broken pipe) instead of the 413."""
    port = free_port()
    env = {"ADVGUARD_LINGER_MAX_BYTES": "0"}
    with (
        advguard_serve(port, tmp_path / "serve.log", env, "--log-level", "warning"),
        pytest.raises((urllib.error.URLError, ConnectionError)),
    ):
        urllib_upload(f"http://127.0.0.1:{port}", 64 * MB)


def test_at_most_max_active_connections_linger() -> None:
    """Past ``max_active`` lingering connections a refusal closes at once (not drained), so a
    flood of oversize uploads cannot buy event-loop time; the places free up afterwards."""
    middleware = LingeringClose(_refuse_413, idle_s=0.05, max_active=1)
    outcomes: list[tuple[int, bool]] = []

    async def one(delay: float) -> None:
        await asyncio.sleep(delay)
        sent: list[dict[str, Any]] = []
        read = 0

        async def receive() -> dict[str, Any]:
            nonlocal read
            read += 1
            await asyncio.sleep(0.02)  # a client trickling its body
            return {"type": "http.request", "body": b"x" * 100, "more_body": read < 10}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "headers": [(b"content-length", b"1000")]}
        await middleware(scope, receive, send)  # type: ignore[arg-type]
        outcomes.append((read, any(m.get("more_body") for m in sent)))

    async def both() -> None:
        await asyncio.gather(one(0.0), one(0.05))

    asyncio.run(both())
    assert sorted(outcomes) == [(0, False), (10, True)]  # one drained, the other closed at once
    assert middleware.active == 0
    _, read = _run([b"x" * 10] * 3, middleware)
    assert read == 3  # the place is free again
