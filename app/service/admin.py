"""The admin listener: ``/metrics`` and the admin routes, on a port of their own.

``advguard serve`` runs two uvicorn servers in one process (``app.service.cli``): the public
port (``/classify``, the demo page, health) and the admin port (``ADVGUARD_ADMIN_PORT``, default
9000: metrics for Prometheus, client statistics and flag clearing for operators, health). The
public port answers the admin paths 404, so exposing it to the internet exposes none of them:
``/metrics`` is a coarse score oracle (docs/reliability.md) and client ids are personal data.
The admin app shares the public app's state (the loaded service, settings, metrics); the public
app's lifespan loads and stops the service, so the admin listener needs no lifespan of its own.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from app.service import routes
from app.service.routes import _ERRORS, ServiceDep
from app.service.schemas import (
    ClientList,
    ClientStatsModel,
    ErrorResponse,
    FlagCleared,
    Health,
    Readiness,
)
from app.service.state import ApiError
from app.service.tracking import ClientStats, TrackerUnavailableError
from app.service.trust import Admin

admin_router = APIRouter()
admin_router.add_api_route("/healthz", routes.healthz, methods=["GET"], response_model=Health)
admin_router.add_api_route(
    "/readyz",
    routes.readyz,
    methods=["GET"],
    response_model=Readiness,
    responses={503: {"model": Readiness}},
)


@admin_router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    payload = await run_in_threadpool(generate_latest, registry)
    return Response(payload, media_type=CONTENT_TYPE_LATEST)


# --------------------------------------------------------------------------- admin


def stats_model(stats: ClientStats) -> ClientStatsModel:
    return ClientStatsModel(**stats.__dict__)


def _unavailable(exc: TrackerUnavailableError) -> ApiError:
    return ApiError(503, "tracker_unavailable", str(exc), {"Retry-After": "1"})


class ClientIdConvertor(Convertor[str]):
    """A client id in a path: anything, '/' and line breaks included (an X-Client-ID such as
    "team/alice", sent or quoted as %2F, which the server decodes before routing). A plain
    parameter stops at '/', and ``:path``'s ``.*`` at a line break, so such a path matched no
    route and answered 404 before the admin token was even checked."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("client_id", ClientIdConvertor())


@admin_router.get(
    "/clients/{client_id:client_id}",
    response_model=ClientStatsModel,
    responses={**_ERRORS, 404: {"model": ErrorResponse}},
)
async def client_stats(client_id: str, service: ServiceDep, _: Admin) -> ClientStatsModel:
    try:
        stats = await run_in_threadpool(service.tracker.get, client_id)
    except TrackerUnavailableError as exc:
        raise _unavailable(exc) from exc
    if stats is None:
        raise ApiError(404, "unknown_client", f"no statistics for client {client_id!r}")
    return stats_model(stats)


@admin_router.get("/clients", response_model=ClientList, responses=_ERRORS)
async def clients(
    service: ServiceDep, _: Admin, flagged: Annotated[bool, Query()] = True
) -> ClientList:
    if not flagged:
        raise ApiError(400, "unsupported", "only flagged clients can be listed (flagged=true)")
    try:
        found = await run_in_threadpool(service.tracker.flagged_clients)
    except TrackerUnavailableError as exc:
        raise _unavailable(exc) from exc
    return ClientList(clients=[stats_model(stats) for stats in found])


@admin_router.delete(
    "/clients/{client_id:client_id}/flag", response_model=FlagCleared, responses=_ERRORS
)
async def clear_flag(client_id: str, service: ServiceDep, _: Admin) -> FlagCleared:
    try:
        cleared = await run_in_threadpool(service.tracker.clear_flag, client_id)
    except TrackerUnavailableError as exc:
        raise _unavailable(exc) from exc
    return FlagCleared(client_id=client_id, cleared=cleared)


def create_admin_app(public: FastAPI) -> FastAPI:
    """The admin listener's app, sharing ``public``'s state (service, settings, metrics)."""
    from app.service.main import install_error_handlers

    admin = FastAPI(
        title="advguard admin",
        summary="Metrics and client administration (private port)",
        version=public.version,
    )
    admin.state = public.state
    admin.include_router(admin_router)
    install_error_handlers(admin)
    return admin
