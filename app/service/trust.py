"""Who may see what the public may not: the admin token, and trusted callers.

Two kinds of privilege, decided in one place:

- *admin*: the admin routes (client statistics, flag clearing) need ``X-Admin-Token`` equal to
  ``ADVGUARD_ADMIN_TOKEN`` (compared in constant time); they are served on the admin port only.
- *trusted*: a caller who may see the detector's evidence (``POST /classify?explain=true``, its
  own flag state, neighbour thumbnails): every caller when ``ADVGUARD_EXPOSE_SCORES`` is set (a
  deployment whose callers are all trusted), else a caller presenting the admin token. An
  attacker who sees scores, p-values or neighbours can tune an adversarial against them.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.service.identity import token_matches
from app.service.settings import Settings
from app.service.state import ApiError


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def admin_token_valid(request: Request, settings: Settings) -> bool:
    """The request carries the configured admin token (never true when none, or an empty one,
    is configured: an empty token would match a request that sends no header at all)."""
    token = settings.admin_token
    if token is None or not token.get_secret_value():
        return False
    presented = request.headers.get(settings.admin_token_header, "")
    return token_matches(presented, token.get_secret_value())


async def require_admin(request: Request) -> None:
    settings = _settings(request)
    token = settings.admin_token
    if token is None or not token.get_secret_value():
        raise ApiError(403, "admin_disabled", "admin endpoints need ADVGUARD_ADMIN_TOKEN set")
    if not admin_token_valid(request, settings):
        raise ApiError(401, "unauthorized", "a valid admin token is required")


Admin = Annotated[None, Depends(require_admin)]


async def trusted_caller(request: Request) -> bool:
    """Whether this caller may see the detector's evidence (see the module docstring)."""
    settings = _settings(request)
    return settings.expose_scores or admin_token_valid(request, settings)


Trusted = Annotated[bool, Depends(trusted_caller)]


async def require_trusted(request: Request) -> None:
    if not await trusted_caller(request):
        raise ApiError(
            403,
            "not_trusted",
            "this needs a trusted caller: the admin token, or ADVGUARD_EXPOSE_SCORES=true",
        )


TrustedOnly = Annotated[None, Depends(require_trusted)]
