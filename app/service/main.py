"""The app factory: ``create_app(settings)``; the lifespan loads the bundle and starts the worker.

Nothing heavy happens at import time or in ``create_app``: the model, the index and the tracker
are built in the lifespan. Shutdown refuses new classifications (503) and drains the batcher.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.bundle import load_honest_classes, load_honest_scores, load_sources
from app.core.errors import AdvguardError
from app.core.flagging import FlagPolicy, HonestTraffic, calibrate_policy, with_threshold
from app.core.guard import Guard
from app.service import routes
from app.service.admin import create_admin_app
from app.service.batcher import AUTO_BUDGET_BATCHES, Batcher
from app.service.demo import install_demo
from app.service.identity import IdentityError, IdentityResolver
from app.service.linger import LingeringClose
from app.service.metrics import Metrics
from app.service.neighbours import NeighbourImages, NeighbourSourceError
from app.service.redis_tracker import RedisTracker
from app.service.routes import router
from app.service.schemas import ErrorResponse
from app.service.settings import Settings
from app.service.state import ApiError, Service
from app.service.stateful import (
    ScreeningWorker,
    batch_screening,
    build_stateful,
    record_screened,
    screens_on_batch_worker,
)
from app.service.tracking import ClientTracker, InMemoryTracker

log = logging.getLogger("advguard.service")

# Multipart framing around the file (boundaries, part headers) allowed on top of the file limit.
MULTIPART_OVERHEAD_BYTES = 16 * 1024


def flag_policy_for(settings: Settings, guard: Guard) -> FlagPolicy:
    """The settings' policy, calibrated on the bundle's held-out honest scores at the guard's
    acceptance threshold, on per-class flag values when the bundle has the scores' classes and
    ``flag_per_class`` is on; ``flag_threshold``, when set, replaces the calibrated threshold."""
    classes = load_honest_classes(settings.bundle, guard.manifest)
    honest = HonestTraffic(
        load_honest_scores(settings.bundle, guard.manifest),
        guard.threshold,
        classes if settings.flag_per_class else None,
    )
    policy = calibrate_policy(
        settings.flag_policy,
        honest,
        min_requests=settings.flag_min_requests,
        ewma_alpha=settings.ewma_alpha,
        false_flag_rate=settings.flag_false_rate,
        horizon=max(settings.flag_horizon, settings.flag_min_requests),
    )
    if settings.flag_threshold is not None:
        policy = with_threshold(policy, settings.flag_threshold)
    return policy


def build_tracker(settings: Settings, policy: FlagPolicy, metrics: Metrics) -> ClientTracker:
    if settings.redis_url:
        return RedisTracker(
            settings.redis_url,
            policy,
            ttl_s=settings.client_ttl_s,
            prefix=settings.redis_prefix,
            timeout_s=settings.redis_timeout_s,
            retry_interval_s=settings.redis_retry_interval_s,
            buffer_size=settings.tracker_buffer_size,
            on_error=metrics.tracker_errors.inc,
            cluster=settings.redis_cluster,
            on_replayed_flag=metrics.clients_flagged.inc,
        )
    return InMemoryTracker(
        policy, ttl_s=settings.client_ttl_s, max_clients=settings.tracker_max_clients
    )


def build_service(
    settings: Settings, metrics: Metrics, identity: IdentityResolver | None = None
) -> Service:
    """The service the settings describe: process settings → guard → flag policy and tracker →
    batcher → identity → stateful screening → metrics bound to the live parts."""
    apply_process_settings(settings)
    guard = load_guard(settings)
    policy = flag_policy_for(settings, guard)
    tracker = build_tracker(settings, policy, metrics)
    batcher = build_batcher(settings, guard, metrics)
    if identity is None:
        identity = IdentityResolver.build(settings.api_keys, settings.trusted_proxies)
    service = Service(settings, metrics, guard, batcher, tracker, identity, policy)
    service.neighbour_images = neighbour_images(settings, guard)
    attach_stateful(service)
    bind_metrics(service)
    return service


def apply_process_settings(settings: Settings) -> None:
    """The settings that are the process's, not the service's: torch's intra-op threads and the
    interpreter's switch interval."""
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    if settings.switch_interval_ms is not None:
        sys.setswitchinterval(settings.switch_interval_ms / 1000.0)


def load_guard(settings: Settings) -> Guard:
    return Guard.load(
        settings.bundle,
        device=settings.device,
        retention=settings.retention,
        search_backend=settings.search_backend,
        precision=settings.model_precision,
        channels_last=settings.channels_last,
    )


def build_batcher(settings: Settings, guard: Guard, metrics: Metrics) -> Batcher:
    fixed_budget, auto_batches = latency_budget(settings)
    return Batcher(
        guard,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000.0,
        queue_size=settings.queue_size,
        on_batch=metrics.batch_size.observe,
        guarded=settings.guard_enabled,
        latency_budget_s=fixed_budget,
        auto_budget_batches=auto_batches,
        on_expired=metrics.shed.labels(reason="expired").inc,
        search_threads=settings.search_threads,
    )


def attach_stateful(service: Service) -> None:
    """The stateful detector (when on) and where it screens: on the batch worker when nothing
    it calls waits on the network and the model is on the CPU, else on a thread of its own
    (``screens_on_batch_worker``)."""
    settings, guard, tracker = service.settings, service.guard, service.tracker
    crop = guard.preset.crop
    service.stateful = build_stateful(
        settings, service.metrics, tracker.flag, 3 * crop * crop, guard.network.device
    )
    if service.stateful is None:
        return
    if screens_on_batch_worker(
        service.stateful.store.blocks, tracker.blocks, guard.network.device.type
    ):
        service.batcher.screen = batch_screening(service, service.stateful)
    else:
        detector = service.stateful
        early = settings.stateful_look_up_early
        service.screening = ScreeningWorker(
            partial(detector.screen_batch, write_now=False),
            track=partial(record_screened, service),
            look_up_batch=detector.look_up if early else None,
            # once a pass's answers are out: only queries looked up early leave any unwritten
            after_pass=detector.write_answers if early else None,
        )
        if early:
            service.batcher.before_run = service.screening.look_up_all  # as a batch starts


def bind_metrics(service: Service) -> None:
    """The bundle's info and the gauges read from the live parts at each scrape."""
    metrics, guard, batcher, tracker = (
        service.metrics,
        service.guard,
        service.batcher,
        service.tracker,
    )
    manifest = guard.manifest
    metrics.bundle.info(
        {
            "name": manifest.name,
            "model_arch": manifest.model.arch,
            "layer": guard.layer,
            "k": str(manifest.detector.k),
            "score_function": str(manifest.detector.score_function),
            "threshold": f"{guard.threshold:.6g}",
        }
    )

    def flagged_count() -> float:
        # a scrape must not fail because Redis is down: report the last known count
        with contextlib.suppress(Exception):
            service.last_flagged_count[0] = tracker.flagged_count()
        return float(service.last_flagged_count[0])

    metrics.seconds_per_image.set_function(lambda: batcher.item_seconds or 0.0)
    metrics.bind(
        queue_depth=lambda: float(batcher.qsize()),
        buffered=lambda: float(tracker.buffered()),
        flagged=flagged_count,
    )


def neighbour_images(settings: Settings, guard: Guard) -> NeighbourImages | None:
    """The bundle's source images when ``neighbour_source`` is set; a bundle without source
    references (built before the builder recorded them) cannot use one: refused at start."""
    if settings.neighbour_source is None:
        return None
    references = load_sources(settings.bundle, guard.manifest)
    if references is None:
        raise NeighbourSourceError(
            f"ADVGUARD_NEIGHBOUR_SOURCE is set but the bundle {settings.bundle} records no source "
            "references (sources.json): rebuild it with this version of advguard build"
        )
    return NeighbourImages(settings.neighbour_source, references)


def latency_budget(settings: Settings) -> tuple[float | None, float | None]:
    """(fixed budget in seconds, full batches of the automatic budget) for the batcher: unset,
    the automatic budget; 0, neither (deadlines off); else the fixed one."""
    budget_ms = settings.latency_budget_ms
    if budget_ms is None:
        return None, AUTO_BUDGET_BATCHES
    return (budget_ms / 1000.0 if budget_ms > 0 else None), None


def _batcher_of(scope: Scope) -> Batcher | None:
    service = getattr(getattr(scope.get("app"), "state", None), "service", None)
    return service.batcher if isinstance(service, Service) else None


def _error(status: int, code: str, message: str, request_id: str | None, **headers: str) -> Any:
    body = ErrorResponse(error=code, message=message, request_id=request_id)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers or None)


def request_id_of(request: Request) -> str | None:
    value = getattr(request.state, "request_id", None)
    return value if isinstance(value, str) else None


class ServiceMiddleware:
    """Request ids, the API key and request body limit checks (both before a byte of the body is
    read), HTTP status and error counting (pure ASGI)."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        upload_limit: int,
        identity: IdentityResolver | None = None,
        api_key_header: str = "X-API-Key",
        max_in_flight: int | None = None,
        retry_after_s: int = 1,
        shed_delay_s: float = 0.0,
    ):
        self.app = app
        self.metrics = metrics
        # the limit users set is the file's; the body may carry the form's framing on top
        self.body_limit = upload_limit + MULTIPART_OVERHEAD_BYTES
        self._limit_text = (
            f"a file of at most {upload_limit} bytes ({self.body_limit} with the form's framing)"
        )
        self.identity = identity
        self.api_key_header = api_key_header.lower().encode("latin-1")
        self.max_in_flight = max_in_flight
        self.retry_after_s = retry_after_s
        self.shed_delay_s = shed_delay_s
        self.in_flight = 0  # classifications admitted and not yet answered (one event loop)
        self.uploading = 0  # of which still receiving their body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived = time.perf_counter()
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        is_classify = scope["path"] == "/classify"
        status_seen: list[int] = []
        send_counted = self._counting(send, request_id, is_classify, arrived, status_seen)
        if await self._refused_unread(scope, receive, send_counted, is_classify, request_id):
            return
        if is_classify and self.max_in_flight is not None:
            await self._admitted(scope, receive, send_counted, status_seen, request_id)
            return
        await self._forward(scope, receive, send_counted, is_classify, status_seen)

    def _counting(
        self,
        send: Send,
        request_id: str,
        is_classify: bool,
        arrived: float,
        status_seen: list[int],
    ) -> Send:
        """``send`` that counts the response's status (and a classification's error), notes it
        in ``status_seen``, and adds X-Request-ID (and a classification's Server-Timing)."""

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                status_seen.append(status)
                self.metrics.http_responses.labels(status=str(status)).inc()
                if is_classify and status >= 400:
                    self.metrics.requests.labels(decision="error").inc()
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                if is_classify:  # time in the app, from the request's head to the answer
                    took_ms = (time.perf_counter() - arrived) * 1000.0
                    headers.append((b"server-timing", f"app;dur={took_ms:.1f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        return send_counted

    async def _refused_unread(
        self, scope: Scope, receive: Receive, send: Send, is_classify: bool, request_id: str
    ) -> bool:
        """Answer before the body is read, and say so: a classification without a valid API
        key (401), a declared body over the limit (413)."""
        if is_classify and self.identity is not None and self.identity.api_keys:
            # FastAPI parses the multipart body before it runs the route's dependencies: refuse
            # a request without a valid key here, without reading its body
            try:
                self.identity.client_for_key(_header(scope, self.api_key_header))
            except IdentityError as exc:
                await _refuse(
                    scope,
                    receive,
                    send,
                    (401, "unauthorized", str(exc), request_id),
                    {"WWW-Authenticate": "ApiKey"},
                )
                return True
        length = _content_length(scope)
        if length is not None and length > self.body_limit:
            response = _error(
                413,
                "payload_too_large",
                f"request body of {length} bytes exceeds the limit: {self._limit_text}",
                request_id,
                Connection="close",
            )
            await response(scope, receive, send)
            return True
        return False

    async def _admitted(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        status_seen: list[int],
        request_id: str,
    ) -> None:
        """A classification, admitted or refused at once (503 before reading): the batcher's
        queue bounds only decoded images, so this bounds the whole pipeline (bodies being read
        and decoded too), in number and in expected wait."""
        refusal = self._refusal(_batcher_of(scope))
        if refusal is not None:
            reason, message = refusal
            self.metrics.shed.labels(reason=reason).inc()
            await _refuse(
                scope,
                receive,
                send,
                (503, "overloaded", message, request_id),
                {"Retry-After": str(self.retry_after_s)},
                self.shed_delay_s,
            )
            return
        self.in_flight += 1
        self.uploading += 1
        uploaded = False

        def body_received() -> None:
            nonlocal uploaded
            if not uploaded:
                uploaded = True
                self.uploading -= 1

        try:
            await self._forward(scope, receive, send, True, status_seen, body_received)
        finally:
            body_received()
            self.in_flight -= 1

    def _refusal(self, batcher: Batcher | None) -> tuple[str, str] | None:
        """(shed reason, message) when a new classification must be refused, else None."""
        if self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
            return "in_flight", f"{self.in_flight} classifications in progress; try again later"
        budget = None if batcher is None else batcher.budget_s()
        # ahead of a new request: those with their body in (parsing, decoding, queued, in a
        # batch); a slow upload does not hold up the model
        ahead = self.in_flight - self.uploading
        if budget is None or batcher is None or ahead == 0:
            return None  # an idle service admits a request whatever the budget
        expected = batcher.expected_latency_s(ahead)
        if expected <= budget:
            return None
        return "expected_wait", (
            f"expected wait of {expected * 1000:.0f} ms ({ahead} in progress) is over "
            f"the latency budget of {budget * 1000:.0f} ms; try again later"
        )

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send_counted: Send,
        is_classify: bool,
        status_seen: list[int],
        body_received: Callable[[], None] | None = None,
    ) -> None:
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.body_limit:
                    raise StarletteHTTPException(
                        413, f"request body exceeds the limit: {self._limit_text}"
                    )
                if body_received is not None and not message.get("more_body", False):
                    body_received()
            return message

        try:
            await self.app(scope, receive_limited, send_counted)
        except Exception:
            if not status_seen:
                self.metrics.http_responses.labels(status="500").inc()
                if is_classify:
                    self.metrics.requests.labels(decision="error").inc()
            raise


# A refused request's body up to this size is read and discarded (never parsed), so that the
# connection stays usable: a server that closes a socket with unread data in it resets the
# connection, and the client may never see the response. Larger or chunked bodies are not read:
# the response says Connection: close.
DRAIN_BYTES = 64 * 1024


async def _refuse(
    scope: Scope,
    receive: Receive,
    send: Send,
    error: tuple[int, str, str, str | None],
    headers: dict[str, str],
    delay_s: float = 0.0,
) -> None:
    length = _content_length(scope)
    if length is not None and length <= DRAIN_BYTES:
        more = length > 0
        while more:
            message = await receive()
            more = message["type"] == "http.request" and bool(message.get("more_body", False))
    else:
        headers = {**headers, "Connection": "close"}
    await routes.hold_refusal(delay_s)
    status, code, text, request_id = error
    await _error(status, code, text, request_id, **headers)(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    503: "unavailable",
}


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> Any:
        assert isinstance(exc, ApiError)
        return _error(exc.status, exc.code, exc.message, request_id_of(request), **exc.headers)

    async def http_error(request: Request, exc: Exception) -> Any:
        assert isinstance(exc, StarletteHTTPException)
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        return _error(exc.status_code, code, str(exc.detail), request_id_of(request), **headers)

    async def validation_error(request: Request, exc: Exception) -> Any:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
            for err in exc.errors()
        )
        return _error(422, "invalid_request", problems or "invalid request", request_id_of(request))

    async def unexpected(request: Request, exc: Exception) -> Any:
        log.exception("unexpected error", exc_info=exc)
        return _error(500, "internal_error", "internal error", request_id_of(request))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The guard service. Without settings: environment (``ADVGUARD_*``) or the defaults."""
    settings = settings or Settings()
    metrics = Metrics()
    identity = IdentityResolver.build(settings.api_keys, settings.trusted_proxies)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await start_service(settings, metrics, identity)
        app.state.service = service
        try:
            yield
        finally:
            await stop_service(service)

    app = FastAPI(
        title="advguard",
        summary="Image classification guarded by a kNN score over deep features",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.include_router(router)
    install_demo(app)
    install_error_handlers(app)
    install_middleware(app, settings, metrics, identity)
    # the private listener (metrics, admin routes): ``advguard serve`` runs it on admin_port
    app.state.admin_app = create_admin_app(app)
    return app


async def start_service(
    settings: Settings, metrics: Metrics, identity: IdentityResolver
) -> Service:
    """Build the service off the event loop (loading the bundle takes seconds) and start its
    threads; a bundle that fails its checks refuses the start."""
    started = time.perf_counter()
    try:
        service = await run_in_threadpool(build_service, settings, metrics, identity)
    except AdvguardError as exc:  # corrupted or tampered bundle, model that does not fit
        log.error("refusing to start: %s", exc)
        raise
    service.batcher.start()
    if service.screening is not None:
        service.screening.start()
    log.info(
        "serving bundle %s (threshold %.4f, flag policy %s at %.4f) in %.2fs",
        service.guard.manifest.name,
        service.guard.threshold,
        service.flag_policy.kind,
        service.flag_policy.threshold,
        time.perf_counter() - started,
    )
    return service


async def stop_service(service: Service) -> None:
    """Refuse new work, finish what is queued (batches, then their screening), then close the
    tracker (Redis's: after replaying what an outage buffered, if Redis is back) and the
    stateful detector."""
    service.accepting = False
    await run_in_threadpool(service.batcher.stop)
    if service.screening is not None:
        await run_in_threadpool(service.screening.stop)
    await run_in_threadpool(service.tracker.close)
    if service.stateful is not None:
        service.stateful.close()


def install_middleware(
    app: FastAPI, settings: Settings, metrics: Metrics, identity: IdentityResolver
) -> None:
    """Admission (identity, body limit, in-flight cap, metrics) inside the lingering close."""
    app.add_middleware(
        ServiceMiddleware,
        metrics=metrics,
        upload_limit=settings.max_upload_bytes,
        identity=identity,
        api_key_header=settings.api_key_header,
        max_in_flight=settings.max_in_flight or settings.queue_size + settings.max_batch_size,
        retry_after_s=settings.retry_after_s,
        shed_delay_s=settings.shed_delay_ms / 1000.0,
    )
    app.add_middleware(  # outermost: sees the final response of every refusal
        LingeringClose,
        max_bytes=settings.linger_max_bytes,
        max_s=settings.linger_max_s,
        idle_s=settings.linger_idle_s,
        max_active=settings.linger_max_connections,
    )
