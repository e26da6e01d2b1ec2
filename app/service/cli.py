"""``advguard serve``: the guard service under uvicorn (one process: the worker owns the model)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from app.core.bundle import read_manifest, verify_files
    from app.core.errors import AdvguardError
    from app.service.main import create_app
    from app.service.settings import Settings

    overrides: dict[str, Any] = {}
    if args.bundle is not None:
        overrides["bundle"] = args.bundle
    if args.device is not None:
        overrides["device"] = args.device
    if args.redis_url is not None:
        overrides["redis_url"] = args.redis_url
    try:
        settings = Settings(**overrides)
        # refuse a missing, corrupted or tampered bundle with one clear line before uvicorn
        # starts (the lifespan loads and verifies it again, and refuses it there too)
        verify_files(settings.bundle, read_manifest(settings.bundle))
        app = create_app(settings)  # refuses empty API keys or bad proxy networks
    except (AdvguardError, ValidationError, ValueError) as exc:
        print(f"advguard serve: refusing to start: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=args.graceful_shutdown_s,
    )
    return 0


def register(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the guard service (settings from ADVGUARD_* environment variables)",
        description="Serve POST /classify with per-client tracking and Prometheus metrics. "
        "Every setting is an ADVGUARD_* environment variable; the options below override them.",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--bundle", type=Path, help="bundle directory (ADVGUARD_BUNDLE)")
    serve.add_argument("--device", help="cuda / cpu (ADVGUARD_DEVICE)")
    serve.add_argument("--redis-url", help="Redis URL for client tracking (ADVGUARD_REDIS_URL)")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument("--graceful-shutdown-s", type=float, default=30.0)
    serve.set_defaults(run=_serve)
