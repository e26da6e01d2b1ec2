"""SIGTERM during a stream of requests (issue 6): a real ``advguard serve`` process finishes the
requests in flight (200), refuses new ones (connection refused, or 503) and exits within its
``--graceful-shutdown-s``; a client that never finishes its upload is cut off at the grace period.

In flight for certain: a few uploads whose multipart body is streamed slowly, spanning the signal.
Around them, threads send ordinary requests back to back, each on a new connection (a pooled
keep-alive connection closed by the server between two requests would be a client-side race,
not a refusal). uvicorn notices the signal on its next tick (0.1 s): requests that start in that
moment may still be accepted and served, or (a connection accepted but its request not yet read)
closed without a response, in no particular order with those served; from the first connection
refused (or 503) on, every new request is refused.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from tests.conftest import random_image_bytes
from tests.deploy.helpers import advguard_serve
from tests.service.helpers import free_port

GRACE_S = 10.0
STUCK_GRACE_S = 3.0
SLOW_UPLOADS = 3
SLOW_UPLOAD_S = 3.0  # each slow upload streams its body over this long
STREAM_THREADS = 4
SIGNAL_NOTICED_S = 1.5  # the listener must be closed this soon after SIGTERM (busy machine)
BOUNDARY = "advguard-drain-test"
REFUSED = ("refused", "503", "dropped")  # connection refused; 503; closed without a response


@dataclass
class Outcome:
    kind: str  # "slow" or "stream"
    attempted: float  # the TCP connect began
    sent: float | None  # the request headers were sent (None: never)
    ended: float
    result: str  # "200", "503", ..., "refused", "dropped", or the exception


def images(count: int) -> list[bytes]:
    rng = np.random.default_rng(6)
    return [random_image_bytes(rng, 32, i) for i in range(count)]


def slow_body(data: bytes, chunks_sent: list[int], index: int) -> Iterator[bytes]:
    """A multipart body with one file, streamed over ``SLOW_UPLOAD_S`` (chunked encoding)."""
    yield (
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="file"; filename="slow.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    pieces = 10
    size = -(-len(data) // pieces)
    for start in range(0, len(data), size):
        chunks_sent[index] += 1
        yield data[start : start + size]
        time.sleep(SLOW_UPLOAD_S / pieces)
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def classify(base: str, kind: str, data: bytes | Iterator[bytes]) -> Outcome:
    """One request on a new connection: when it connected and sent its headers, and its status
    code or how it failed."""
    times: dict[str, float] = {}

    def trace(event: str, info: object) -> None:
        if event in ("connection.connect_tcp.started", "http11.send_request_headers.complete"):
            times.setdefault(event, time.monotonic())

    headers = {"Connection": "close", "X-Client-ID": "drain-test"}
    extensions = {"trace": trace}
    with httpx.Client(base_url=base, timeout=30) as client:
        try:
            if kind == "slow":
                headers["Content-Type"] = f"multipart/form-data; boundary={BOUNDARY}"
                response = client.post(
                    "/classify", content=data, headers=headers, extensions=extensions
                )
            else:
                files = {"file": ("x.png", data)}
                response = client.post(
                    "/classify", files=files, headers=headers, extensions=extensions
                )
            result = str(response.status_code)
            if response.status_code == 200:
                assert response.json()["decision"] in ("accepted", "rejected")
        except httpx.ConnectError as exc:
            refused = isinstance(exc.__cause__, ConnectionRefusedError) or "refused" in str(exc)
            # reset while connecting: the kernel queued the handshake on the listener just as
            # uvicorn closed it (a CI run, 2026-12-07); nothing was sent, so it is dropped
            reset = isinstance(exc.__cause__, ConnectionResetError) or "reset by peer" in str(exc)
            result = "refused" if refused else "dropped" if reset else f"ConnectError: {exc}"
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            result = "dropped"  # the connection closed without a response
        except httpx.HTTPError as exc:
            result = f"{type(exc).__name__}: {exc}"
    ended = time.monotonic()
    return Outcome(
        kind,
        times.get("connection.connect_tcp.started", ended),
        times.get("http11.send_request_headers.complete"),
        ended,
        result,
    )


def test_sigterm_finishes_in_flight_refuses_new_and_exits_in_grace(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    pictures = images(8)
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    stop = threading.Event()
    chunks_sent = [0] * SLOW_UPLOADS
    log = tmp_path / "serve.log"

    def record(outcome: Outcome) -> None:
        with lock:
            outcomes.append(outcome)

    def slow(index: int) -> None:
        record(classify(base, "slow", slow_body(pictures[index], chunks_sent, index)))

    def stream(index: int) -> None:
        i = index
        while not stop.is_set():
            record(classify(base, "stream", pictures[i % len(pictures)]))
            i += 1
            time.sleep(0.01)

    args = ("--graceful-shutdown-s", str(GRACE_S), "--log-level", "info")
    with advguard_serve(port, log, {}, *args) as process:
        assert classify(base, "stream", pictures[0]).result == "200"  # warm
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAM_THREADS)]
        threads += [threading.Thread(target=slow, args=(i,)) for i in range(SLOW_UPLOADS)]
        for thread in threads:
            thread.start()
        # every slow upload has sent its headers and part of its file: in flight
        deadline = time.monotonic() + 20
        while min(chunks_sent) < 3:
            assert time.monotonic() < deadline, f"slow uploads did not start: {chunks_sent}"
            time.sleep(0.02)
        sigterm_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(GRACE_S + 20)
        finally:
            exited_at = time.monotonic()
            time.sleep(0.5)  # the stream keeps knocking after the exit
            stop.set()
            for thread in threads:
                thread.join(40)
    output = log.read_text(errors="replace")

    slow_done = [o for o in outcomes if o.kind == "slow"]
    # in flight: the request was sent before the signal and had no answer by then
    in_flight = [o for o in outcomes if o.sent and o.sent < sigterm_at < o.ended]
    # new: the connection attempt began after the signal
    after = sorted((o for o in outcomes if o.attempted > sigterm_at), key=lambda o: o.attempted)
    refusals = [o for o in after if o.result in REFUSED]
    first_refusal = refusals[0].attempted if refusals else float("inf")
    # the listener closed (or the app refuses): a dropped connection was accepted before that, and
    # may have connected a moment before one that was accepted and served (CI, 2026-12-07)
    closed = [o.attempted for o in refusals if o.result != "dropped"]
    listener_closed = closed[0] if closed else float("inf")
    served_late = [o for o in after if o.result == "200"]
    refused_while_draining = [o for o in refusals if o.attempted < exited_at]
    counts = Counter(o.result for o in refusals)
    print(
        f"\n{len(outcomes)} requests; in flight at SIGTERM: {len(in_flight)} "
        f"({len(slow_done)} slow uploads), results {sorted({o.result for o in in_flight})}; "
        f"started after SIGTERM: {len(after)}: {len(served_late)} served (accepted before the "
        f"listener closed, first refusal {first_refusal - sigterm_at:.2f}s after SIGTERM), "
        f"{len(refusals)} refused {dict(counts)} ({len(refused_while_draining)} while draining); "
        f"exit {exited_at - sigterm_at:.2f}s after SIGTERM (grace {GRACE_S:.0f}s), code {code}; "
        f"other {sorted({o.result for o in outcomes} - {'200', *REFUSED})}"
    )

    assert len(slow_done) == SLOW_UPLOADS
    assert all(o in in_flight for o in slow_done), "a slow upload was not in flight"
    # in flight at SIGTERM: finished, with a verdict
    assert [o.result for o in in_flight if o.result != "200"] == []
    # every other request: served, or refused without being processed ("dropped": a connection
    # uvicorn accepted in the moment before it closed the listener, closed by its shutdown
    # before the request was read; never a request sent before the signal)
    assert [o.result for o in outcomes if o.result not in ("200", *REFUSED)] == []
    assert [o for o in outcomes if o.result == "dropped" and o.sent and o.sent < sigterm_at] == []
    # started after SIGTERM: refused, apart from those accepted before uvicorn noticed it
    assert first_refusal - sigterm_at < SIGNAL_NOTICED_S
    assert [o for o in served_late if o.attempted > listener_closed] == []
    assert len(refused_while_draining) >= 3, "no request was refused while the drain ran"
    # the process outlived the slow uploads, and exited within the grace period, cleanly
    assert max(o.ended for o in slow_done) <= exited_at
    assert exited_at - sigterm_at < GRACE_S
    assert code in (0, -signal.SIGTERM), output
    assert "Traceback" not in output, output


def test_sigterm_exit_bounded_by_grace_with_a_stuck_upload(tmp_path: Path) -> None:
    """A client that never finishes its upload keeps the drain waiting only until the grace
    period ends: then uvicorn cancels it and the process exits."""
    port = free_port()
    data = images(1)[0]
    log = tmp_path / "serve.log"
    args = ("--graceful-shutdown-s", str(STUCK_GRACE_S), "--log-level", "info")
    with (
        advguard_serve(port, log, {}, *args) as process,
        socket.create_connection(("127.0.0.1", port), timeout=30) as sock,
    ):
        sock.sendall(
            (
                "POST /classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n"
            ).encode()
        )
        part = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
        ).encode() + data[: len(data) // 2]
        sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))  # ... and never the rest
        time.sleep(0.5)
        sigterm_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(STUCK_GRACE_S + 20)
        exited_at = time.monotonic()
        sock.settimeout(5)
        try:
            leftover = sock.recv(65536)
        except OSError as exc:
            leftover = repr(exc).encode()
    output = log.read_text(errors="replace")
    took = exited_at - sigterm_at
    print(f"\nstuck upload: exit after {took:.2f}s (grace {STUCK_GRACE_S:.0f}s), code {code}")
    # it waited for the upload through the grace period, no longer (plus the lifespan shutdown)
    assert STUCK_GRACE_S - 0.2 <= took < STUCK_GRACE_S + 2.0
    assert "timeout graceful shutdown exceeded" in output
    assert code in (0, -signal.SIGTERM), output
    assert not leftover.startswith(b"HTTP/1.1 200"), leftover[:200]
