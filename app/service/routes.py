"""HTTP routes: thin, with typed ``Annotated`` dependencies; the work lives in the core and the
service objects (batcher, tracker)."""

from __future__ import annotations

import asyncio
import random
import re
import time
from typing import Annotated

import torch
from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from app.core.guard import Classification, Verdict
from app.core.images import ImageDecodeError, decode_image
from app.service.batcher import (
    BatcherClosedError,
    BatchResult,
    DeadlineExceededError,
    QueueFullError,
)
from app.service.identity import IdentityError, InvalidClientIdError
from app.service.schemas import (
    BundleSummary,
    ClassifyResponse,
    ErrorResponse,
    ExplanationModel,
    Health,
    LayerSummary,
    Prediction,
    Readiness,
)
from app.service.settings import Settings
from app.service.state import ApiError, Service
from app.service.stateful import (
    LookUp,
    answer_of,
    observation_of,
    served_or_refused,
    track_and_screen,
)
from app.service.tracking import tracker_call
from app.service.trust import Trusted

router = APIRouter()

# Pillow names the in-memory file in some messages: nothing a client needs to see.
_OBJECT_REPR = re.compile(r"\s*<[^<>]* object at 0x[0-9a-f]+>")

_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 413, 422, 503)
}


# --------------------------------------------------------------------------- dependencies


# Dependencies are ``async def`` although they do no I/O: FastAPI runs a plain ``def`` in the
# thread pool, a hand-off and an event-loop round each, three per classification under load.


async def get_service(request: Request) -> Service:
    service = getattr(request.app.state, "service", None)
    if not isinstance(service, Service):
        raise ApiError(503, "not_ready", "the service is not ready", {"Retry-After": "1"})
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


async def get_request_id(request: Request) -> str:
    value = getattr(request.state, "request_id", None)
    return value if isinstance(value, str) else ""


RequestId = Annotated[str, Depends(get_request_id)]


async def get_client_id(request: Request, service: ServiceDep) -> str:
    settings = service.settings
    headers = request.headers
    try:
        return service.identity.resolve(
            api_key=headers.get(settings.api_key_header),
            client_id=headers.get(settings.client_id_header),
            peer=request.client.host if request.client else None,
            # every X-Forwarded-For line, joined as one (RFC 9110): a proxy may add a line of
            # its own rather than extend the client's, and the client's must not win
            forwarded_for=", ".join(headers.getlist("x-forwarded-for")) or None,
        )
    except IdentityError as exc:
        raise ApiError(401, "unauthorized", str(exc), {"WWW-Authenticate": "ApiKey"}) from exc
    except InvalidClientIdError as exc:
        raise ApiError(400, "invalid_client_id", str(exc)) from exc


ClientId = Annotated[str, Depends(get_client_id)]


# --------------------------------------------------------------------------- classification


def refusal_delay_s(delay_s: float) -> float:
    """How long a 503 overloaded waits before it is sent: ``delay_s`` (ADVGUARD_SHED_DELAY_MS)
    jittered +-50%, so that refused clients do not come back in lockstep waves."""
    return delay_s * random.uniform(0.5, 1.5)


async def hold_refusal(delay_s: float) -> None:
    """Hold a 503 overloaded (its connection idle) so that a client that retries at once cannot
    turn refusals into a storm that takes the event loop from the requests being served."""
    if delay_s > 0:
        await asyncio.sleep(refusal_delay_s(delay_s))


def _decode(service: Service, data: bytes) -> torch.Tensor:
    """The pixels the model gets."""
    guard = service.guard
    image = decode_image(data, service.settings.max_pixels, min_size=guard.preset.resize)
    return guard.pixels(image)


@router.post("/classify", response_model=ClassifyResponse, responses=_ERRORS)
async def classify(
    service: ServiceDep,
    client_id: ClientId,
    request_id: RequestId,
    file: Annotated[UploadFile, File(description="one image")],
    trusted: Trusted,
    request: Request,
    explain: Annotated[
        bool,
        Query(description="add the detector's evidence (trusted callers only; else omitted)"),
    ] = False,
) -> ClassifyResponse:
    """Admit, read, decode, classify in a batch, then judge: each stage below raises the
    ``ApiError`` its failure answers with."""
    started = time.perf_counter()
    await _admit(service, client_id)
    await _one_file(request)
    data = await _read_upload(service.settings, file)
    pixels = await _decoded(service, data)
    service.metrics.stage_seconds.labels(stage="decode").observe(time.perf_counter() - started)
    # ADVGUARD_STATEFUL_LOOK_UP_EARLY: looked up while the model classifies its batch
    looked_up = None if service.screening is None else service.screening.look_up(client_id, pixels)
    result = await _classified(service, pixels, explain and trusted, client_id, looked_up)
    if not isinstance(result.verdict, Verdict):  # the guard is off: no score, no tracking
        response = _unguarded(request_id, result.verdict)
        service.metrics.requests.labels(decision="unguarded").inc()
    else:
        response = await _judged(
            service, client_id, request_id, pixels, result, result.verdict, looked_up
        )
    service.metrics.stage_seconds.labels(stage="total").observe(time.perf_counter() - started)
    return response


async def _admit(service: Service, client_id: str) -> None:
    """Refuse before the upload is read: shutting down, or a flagged client under ``refuse``."""
    settings = service.settings
    if not service.accepting:
        raise ApiError(503, "shutting_down", "the service is shutting down", {"Retry-After": "1"})
    if (
        settings.policy == "refuse"
        and settings.guard_enabled  # the guard off: no tracking, no flags
        and await tracker_call(service.tracker, service.tracker.is_flagged, client_id)
    ):
        raise ApiError(403, "client_flagged", "this client is flagged and refused service")


async def _one_file(request: Request) -> None:
    """422 for a body with several ``file`` parts: the API answers one image per request, and
    classifying one of them (the framework keeps the last) would leave the client believing
    every image it sent was judged."""
    parts = len((await request.form()).getlist("file"))  # the form the route already parsed
    if parts > 1:
        raise ApiError(
            422, "invalid_request", f"one image per request: the body has {parts} 'file' parts"
        )


async def _read_upload(settings: Settings, file: UploadFile) -> bytes:
    """The upload's bytes, at most ``max_upload_bytes`` (413 beyond)."""
    if file.size is not None and file.size > settings.max_upload_bytes:
        raise ApiError(
            413,
            "payload_too_large",
            f"file of {file.size} bytes exceeds the limit of {settings.max_upload_bytes} bytes",
        )
    data = await file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise ApiError(413, "payload_too_large", "file exceeds the byte limit")
    return data


async def _decoded(service: Service, data: bytes) -> torch.Tensor:
    """The model's pixels, decoded on a worker thread (400 for what is not an image)."""
    try:
        return await run_in_threadpool(_decode, service, data)
    except ImageDecodeError as exc:
        raise ApiError(400, "invalid_image", _OBJECT_REPR.sub("", str(exc))) from exc


async def _classified(
    service: Service,
    pixels: torch.Tensor,
    explain: bool,
    client_id: str,
    looked_up: LookUp | None = None,
) -> BatchResult:
    """The batch worker's result for the pixels (screened there too when it screens): 503
    (held, with Retry-After) when its queue is full or the image waited past the latency
    budget, or when it is shutting down."""
    settings, metrics = service.settings, service.metrics
    retry = {"Retry-After": str(settings.retry_after_s)}
    try:
        future = service.batcher.submit(
            pixels, explain=explain, client_id=client_id, look_up=looked_up
        )
    except QueueFullError as exc:
        metrics.shed.labels(reason="queue_full").inc()
        await hold_refusal(settings.shed_delay_ms / 1000.0)
        raise ApiError(503, "overloaded", str(exc), retry) from exc
    except BatcherClosedError as exc:
        raise ApiError(503, "shutting_down", str(exc), retry) from exc
    try:
        result = await future
    except DeadlineExceededError as exc:  # waited past the latency budget: never run
        await hold_refusal(settings.shed_delay_ms / 1000.0)
        raise ApiError(503, "overloaded", str(exc), retry) from exc
    metrics.stage_seconds.labels(stage="queue").observe(result.queue_s)
    metrics.stage_seconds.labels(stage="model").observe(result.model_s)
    return result


def _unguarded(request_id: str, classification: Classification) -> ClassifyResponse:
    return ClassifyResponse(
        request_id=request_id,
        decision="unguarded",
        prediction=Prediction(
            class_index=classification.predicted_class,
            class_name=classification.class_name,
            probability=classification.probability,
        ),
    )


async def _judged(
    service: Service,
    client_id: str,
    request_id: str,
    pixels: torch.Tensor,
    result: BatchResult,
    verdict: Verdict,
    looked_up: LookUp | None = None,
) -> ClassifyResponse:
    """The guard's answer: recorded in the client's statistics, screened by the stateful
    detector, which may change it (``silent``) or refuse it (403, ``refuse``; the batch worker
    has done these two when it screens), then counted by the guard's decision. A refused query
    is counted once, as an ``error`` (by the middleware, from its 403), not also as served."""
    settings, metrics = service.settings, service.metrics
    metrics.stage_seconds.labels(stage="search").observe(result.search_s)
    metrics.score.observe(verdict.score)
    if result.screened:
        metrics.stage_seconds.labels(stage="stateful").observe(result.screen_s)
        answer = served_or_refused(result.served)
    else:
        observation = observation_of(client_id, verdict, time.time(), service.flag_policy)
        screened = pixels if result.model_pixels is None else result.model_pixels
        answer = await track_and_screen(
            service, observation, screened, answer_of(verdict), looked_up
        )
    metrics.requests.labels(decision="accepted" if verdict.accepted else "rejected").inc()
    return ClassifyResponse(
        request_id=request_id,
        decision=answer.decision,
        prediction=Prediction(
            class_index=answer.class_index,
            class_name=service.guard.class_names[answer.class_index],
            probability=answer.probability,
        )
        if answer.decision == "accepted"
        else None,
        score=answer.score if settings.expose_scores else None,
        threshold=verdict.threshold if settings.expose_scores else None,
        explanation=None
        if result.explanation is None
        else ExplanationModel.of(
            result.explanation,
            service.guard.class_names,
            service.guard.manifest.detector.combination,
            service.neighbour_images is not None,
        ),
    )


# --------------------------------------------------------------------------- operations


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(request: Request) -> Response:
    service = getattr(request.app.state, "service", None)
    if not isinstance(service, Service):
        body = Readiness(
            status="unavailable",
            bundle_loaded=False,
            batcher_running=False,
            tracker="none",
            tracker_backend="redis" if request.app.state.settings.redis_url else "memory",
            tracker_buffered_updates=0,
        )
        return Response(body.model_dump_json(), 503, media_type="application/json")
    tracker_state = await run_in_threadpool(service.tracker.state)
    running = service.batcher.running and service.accepting
    status = "unavailable" if not running else tracker_state
    body = Readiness(
        status=status,
        bundle_loaded=True,
        batcher_running=running,
        tracker=tracker_state,
        tracker_backend="redis" if service.settings.redis_url else "memory",
        tracker_buffered_updates=service.tracker.buffered(),
    )
    return Response(body.model_dump_json(), 200 if running else 503, media_type="application/json")


@router.get("/v1/bundle", response_model=BundleSummary)
async def bundle(service: ServiceDep) -> BundleSummary:
    """The manifest summary. The threshold values are withheld like the scores: an attacker who
    knows them knows how far to push an adversarial's score."""
    manifest = service.guard.manifest
    expose = service.settings.expose_scores
    return BundleSummary(
        name=manifest.name,
        model_arch=manifest.model.arch,
        num_classes=manifest.model.num_classes,
        layers=[
            LayerSummary(
                name=layer.name,
                processing=str(layer.processing),
                output_dim=layer.output_dim,
                index_type=str(layer.index_type),
            )
            for layer in manifest.detector.layers
        ],
        k=manifest.detector.k,
        score_function=str(manifest.detector.score_function),
        combination=manifest.detector.combination,
        statistics=service.guard.detector.names,
        threshold=service.guard.threshold if expose else None,
        operating_retention=service.settings.retention or manifest.calibration.operating_retention,
        threshold_policy=(
            "accept when the kNN score of the predicted class is at or above the threshold, "
            "calibrated to keep this share of correctly classified held-out authentic images"
            if manifest.detector.combination == "single"
            else "accept when the combined p-value of the statistics of the predicted class is at "
            "or above the threshold, calibrated on held-out authentic images the p-values' "
            "reference never saw, to keep this share of the correctly classified ones"
        ),
        flag_policy=service.flag_policy.kind,
        flag_threshold=service.flag_policy.threshold if expose else None,
        flag_shift_threshold=service.flag_policy.shift_threshold if expose else None,
        flag_min_requests=service.flag_policy.min_requests,
        flag_per_class=service.flag_policy.scale is not None,
        class_names=list(manifest.class_names),
    )
