"""The demo page (``GET /``) and the small public API it uses beside ``POST /classify``.

The page is static HTML/JS/CSS shipped in the package (``app/service/static``): no build step,
no CDN, so it works offline. It identifies itself with ``X-Client-ID`` (a random id the browser
keeps in localStorage) like any other client, and sends ``X-Admin-Token`` / ``X-API-Key`` only
when the user types them. What only trusted callers may see (``app.service.trust``): the
evidence of a decision, the caller's own flag state and the nearest training images.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from app.service.admin import stats_model
from app.service.neighbours import NeighbourNotFoundError
from app.service.routes import _ERRORS, ClientId, ServiceDep
from app.service.schemas import ClientState, DemoSession, ErrorResponse
from app.service.state import ApiError
from app.service.tracking import TrackerUnavailableError
from app.service.trust import Trusted, TrustedOnly

STATIC = Path(__file__).resolve().parent / "static"

demo_router = APIRouter()


@demo_router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@demo_router.get("/v1/demo/session", response_model=DemoSession, responses=_ERRORS)
async def session(service: ServiceDep, client_id: ClientId, trusted: Trusted) -> DemoSession:
    return DemoSession(
        client_id=client_id,
        trusted=trusted,
        neighbour_images=service.neighbour_images is not None,
    )


@demo_router.get("/v1/client", response_model=ClientState, responses=_ERRORS)
async def own_state(service: ServiceDep, client_id: ClientId, _: TrustedOnly) -> ClientState:
    """The caller's own statistics and flag. Trusted callers only: an attacker who could watch
    its own flag would know when to rotate its identity."""
    try:
        stats = await run_in_threadpool(service.tracker.get, client_id)
    except TrackerUnavailableError as exc:
        raise ApiError(503, "tracker_unavailable", str(exc), {"Retry-After": "1"}) from exc
    return ClientState(
        client_id=client_id,
        known=stats is not None,
        stats=None if stats is None else stats_model(stats),
    )


@demo_router.get(
    "/v1/neighbours/{row}",
    response_class=Response,
    responses={**_ERRORS, 404: {"model": ErrorResponse}, 200: {"content": {"image/png": {}}}},
)
async def neighbour_image(row: int, service: ServiceDep, _: TrustedOnly) -> Response:
    """Thumbnail of the bundle's index row ``row`` (an ``explanation.nearest`` id)."""
    images = service.neighbour_images
    if images is None:
        raise ApiError(404, "no_neighbour_source", "ADVGUARD_NEIGHBOUR_SOURCE is not set")
    try:
        png = await run_in_threadpool(images.thumbnail, row)
    except NeighbourNotFoundError as exc:
        raise ApiError(404, "unknown_neighbour", str(exc)) from exc
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def install_demo(app: FastAPI) -> None:
    """The page at ``/``, its files under ``/static``, and the routes above."""
    app.include_router(demo_router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
