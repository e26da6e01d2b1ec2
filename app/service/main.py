"""The app factory: ``create_app(settings)``; the lifespan loads the bundle and starts the worker.

Nothing heavy happens at import time or in ``create_app``: the model, the index and the tracker
are built in the lifespan. Shutdown refuses new classifications (503) and drains the batcher.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import AdvguardError
from app.core.flagging import FlagRule, flag_threshold_from_scores
from app.core.guard import Guard
from app.service.batcher import Batcher
from app.service.identity import IdentityError, IdentityResolver
from app.service.metrics import Metrics
from app.service.routes import router
from app.service.schemas import ErrorResponse
from app.service.settings import Settings
from app.service.state import ApiError, Service
from app.service.tracking import ClientTracker, InMemoryTracker, RedisTracker

log = logging.getLogger("advguard.service")

# Multipart framing around the file (boundaries, part headers) allowed on top of the file limit.
MULTIPART_OVERHEAD_BYTES = 16 * 1024


def flag_rule_for(settings: Settings, guard: Guard) -> FlagRule:
    """The settings' threshold, else the ``flag_quantile`` of the bundle's calibrated scores."""
    if settings.flag_threshold is not None:
        threshold = settings.flag_threshold
    else:
        scores = np.load(settings.bundle / guard.manifest.calibration.scores_file)
        threshold = flag_threshold_from_scores(scores, settings.flag_quantile)
    return FlagRule(threshold=threshold, min_requests=settings.flag_min_requests)


def build_tracker(settings: Settings, rule: FlagRule, metrics: Metrics) -> ClientTracker:
    if settings.redis_url:
        return RedisTracker(
            settings.redis_url,
            rule,
            alpha=settings.ewma_alpha,
            ttl_s=settings.client_ttl_s,
            prefix=settings.redis_prefix,
            timeout_s=settings.redis_timeout_s,
            retry_interval_s=settings.redis_retry_interval_s,
            buffer_size=settings.tracker_buffer_size,
            on_error=metrics.tracker_errors.inc,
        )
    return InMemoryTracker(rule, alpha=settings.ewma_alpha, ttl_s=settings.client_ttl_s)


def build_service(
    settings: Settings, metrics: Metrics, identity: IdentityResolver | None = None
) -> Service:
    guard = Guard.load(settings.bundle, device=settings.device, retention=settings.retention)
    rule = flag_rule_for(settings, guard)
    tracker = build_tracker(settings, rule, metrics)
    batcher = Batcher(
        guard,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000.0,
        queue_size=settings.queue_size,
        on_batch=metrics.batch_size.observe,
    )
    if identity is None:
        identity = IdentityResolver.build(settings.api_keys, settings.trusted_proxies)
    service = Service(settings, metrics, guard, batcher, tracker, identity, rule)
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

    metrics.bind(
        queue_depth=lambda: float(batcher.qsize()),
        buffered=lambda: float(tracker.buffered()),
        flagged=flagged_count,
    )
    return service


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
        body_limit: int,
        identity: IdentityResolver | None = None,
        api_key_header: str = "X-API-Key",
        max_in_flight: int | None = None,
        retry_after_s: int = 1,
    ):
        self.app = app
        self.metrics = metrics
        self.body_limit = body_limit
        self.identity = identity
        self.api_key_header = api_key_header.lower().encode("latin-1")
        self.max_in_flight = max_in_flight
        self.retry_after_s = retry_after_s
        self.in_flight = 0  # classifications admitted and not yet answered (one event loop)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        is_classify = scope["path"] == "/classify"
        status_seen: list[int] = []

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                status_seen.append(status)
                self.metrics.http_responses.labels(status=str(status)).inc()
                if is_classify and status >= 400:
                    self.metrics.requests.labels(decision="error").inc()
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        if is_classify and self.identity is not None and self.identity.api_keys:
            # FastAPI parses the multipart body before it runs the route's dependencies: refuse
            # a request without a valid key here, without reading its body
            try:
                self.identity.client_for_key(_header(scope, self.api_key_header))
            except IdentityError as exc:
                await _refuse(
                    scope,
                    receive,
                    send_counted,
                    (401, "unauthorized", str(exc), request_id),
                    {"WWW-Authenticate": "ApiKey"},
                )
                return

        length = _content_length(scope)
        if length is not None and length > self.body_limit:
            response = _error(
                413,
                "payload_too_large",
                f"request body of {length} bytes exceeds the limit of {self.body_limit} bytes",
                request_id,
                Connection="close",
            )
            await response(scope, receive, send_counted)
            return

        if is_classify and self.max_in_flight is not None:
            if self.in_flight >= self.max_in_flight:
                # the batcher's queue bounds only decoded images: bound the whole pipeline
                # (bodies being read and decoded too) and refuse at once, before reading
                message = f"{self.in_flight} classifications in progress; try again later"
                await _refuse(
                    scope,
                    receive,
                    send_counted,
                    (503, "overloaded", message, request_id),
                    {"Retry-After": str(self.retry_after_s)},
                )
                return
            self.in_flight += 1
            try:
                await self._forward(scope, receive, send_counted, is_classify, status_seen)
            finally:
                self.in_flight -= 1
            return
        await self._forward(scope, receive, send_counted, is_classify, status_seen)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send_counted: Send,
        is_classify: bool,
        status_seen: list[int],
    ) -> None:
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.body_limit:
                    raise StarletteHTTPException(
                        413, f"request body exceeds the limit of {self.body_limit} bytes"
                    )
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
) -> None:
    length = _content_length(scope)
    if length is not None and length <= DRAIN_BYTES:
        more = length > 0
        while more:
            message = await receive()
            more = message["type"] == "http.request" and bool(message.get("more_body", False))
    else:
        headers = {**headers, "Connection": "close"}
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
        started = time.perf_counter()
        try:
            service = await run_in_threadpool(build_service, settings, metrics, identity)
        except AdvguardError as exc:  # corrupted or tampered bundle, model that does not fit
            log.error("refusing to start: %s", exc)
            raise
        service.batcher.start()
        app.state.service = service
        log.info(
            "serving bundle %s (threshold %.4f, flag threshold %.4f) in %.2fs",
            service.guard.manifest.name,
            service.guard.threshold,
            service.flag_rule.threshold,
            time.perf_counter() - started,
        )
        try:
            yield
        finally:
            service.accepting = False
            await run_in_threadpool(service.batcher.stop)
            service.tracker.close()

    app = FastAPI(
        title="advguard",
        summary="Image classification guarded by a kNN score over deep features",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(
        ServiceMiddleware,
        metrics=metrics,
        body_limit=settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES,
        identity=identity,
        api_key_header=settings.api_key_header,
        max_in_flight=settings.max_in_flight or settings.queue_size + settings.max_batch_size,
        retry_after_s=settings.retry_after_s,
    )
    return app
