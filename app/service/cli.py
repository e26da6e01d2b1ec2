"""``advguard serve``: the guard service under uvicorn (one process: the worker owns the model)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

if TYPE_CHECKING:
    from fastapi import FastAPI
    from pydantic import ValidationError

    from app.service.settings import EventLoop, Settings


class _Listener(uvicorn.Server):
    """A uvicorn server that leaves the signals to ``serve_listeners`` (uvicorn's own handlers
    would let one server's handler replace the other's)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_listeners(
    public: uvicorn.Server,
    admin: uvicorn.Server,
    sockets: tuple[socket.socket, socket.socket] | None = None,
) -> None:
    """Run the public and the admin listener in one event loop. SIGTERM/SIGINT stop the public
    one first (refuse new work, finish in-flight requests, drain the batcher in its lifespan),
    so that /metrics stays scrapable during the drain; the admin listener stops after it. A
    second SIGINT forces the exit, as with plain uvicorn."""
    loop = asyncio.get_running_loop()
    captured: list[signal.Signals] = []

    def stop(sig: signal.Signals) -> None:
        captured.append(sig)
        if public.should_exit and sig == signal.SIGINT:
            public.force_exit = True
        public.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)
    public_sockets, admin_sockets = ([sockets[0]], [sockets[1]]) if sockets else (None, None)
    admin_task = asyncio.create_task(admin.serve(sockets=admin_sockets))
    try:
        await public.serve(sockets=public_sockets)
    finally:
        admin.should_exit = True
        await admin_task
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    # as uvicorn does: once shut down, exit by the signal received (code -SIGTERM), without
    # waiting for idle worker threads at interpreter exit
    for sig in reversed(captured):
        signal.raise_signal(sig)


_OVERRIDDEN = ("bundle", "device", "redis_url", "admin_port", "admin_host")


class _RefusedError(Exception):
    """``advguard serve`` does not start: the reason, printed on one line."""


def _settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line; everything else comes from the environment."""
    return {name: getattr(args, name) for name in _OVERRIDDEN if getattr(args, name) is not None}


def _configured_app(args: argparse.Namespace) -> tuple[Settings, FastAPI]:
    """(settings, app), or a refusal: one clear line (``_RefusedError``) before uvicorn starts, for
    a missing, corrupted or tampered bundle (the lifespan loads and verifies it again, and
    refuses it there too), bad settings, a misspelt setting's name, or the admin port on the
    public port."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from app.core.bundle import read_manifest, verify_files
    from app.core.errors import AdvguardError
    from app.core.features import pick_device
    from app.core.guard import threshold_for
    from app.service.main import create_app
    from app.service.settings import Settings, misspelt_settings

    misspelt = misspelt_settings(os.environ)
    if misspelt:
        raise _RefusedError(
            "; ".join(
                f"{name} is not a setting (did you mean {meant}?)" for name, meant in misspelt
            )
        )
    try:
        settings = Settings(**_settings_overrides(args))
        pick_device(settings.device)  # a device it lacks: refused here, not in a traceback
        manifest = read_manifest(settings.bundle)
        verify_files(settings.bundle, manifest)
        threshold_for(manifest, settings.retention)  # a retention the bundle was not calibrated for
        source = settings.neighbour_source
        if source is not None and not (source.is_dir() or source.is_file()):
            raise _RefusedError(f"ADVGUARD_NEIGHBOUR_SOURCE {source} does not exist")
        app = create_app(settings)  # refuses empty API keys or bad proxy networks
    except SettingsError as exc:  # pydantic-settings names the field, not the variable
        field = re.search(r'field "(\w+)"', str(exc))
        name = f"ADVGUARD_{field.group(1).upper()}" if field else "a setting"
        raise _RefusedError(
            f"{name} cannot be parsed: lists and mappings are JSON, e.g. "
            """ADVGUARD_API_KEYS='{"alice": "her-key"}' or """
            """ADVGUARD_TRUSTED_PROXIES='["10.0.0.0/8"]'"""
        ) from exc
    except ValidationError as exc:  # its own text quotes the input, secrets included
        raise _RefusedError(_problems(exc)) from exc
    except (AdvguardError, ValueError) as exc:
        raise _RefusedError(str(exc)) from exc
    if settings.admin_port == args.port:
        raise _RefusedError("the admin port is the public port")
    return settings, app


def _problems(exc: ValidationError) -> str:
    """A pydantic ValidationError as "where: what; ..." without the input values: its str()
    quotes the raw settings, so a refused start printed parts of the admin token, the stateful
    secret, API keys and a Redis URL's password into the logs."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        where = ".".join(str(part) for part in error["loc"])
        problems.append(f"{where}: {error['msg']}" if where else str(error["msg"]))
    return "; ".join(problems)


LISTEN_BACKLOG = 2048  # uvicorn's default


def _bound(host: str, port: int, what: str) -> socket.socket:
    """A socket listening on (host, port) for a listener, or a refusal naming it: opened here,
    before either listener starts, because uvicorn reports a failed bind by exiting its own
    task, which left the other listener (and the process) running without the admin one,
    silently. It listens at once: two sockets with SO_REUSEADDR may both bind a port until one
    listens, so a second service started during the first one's model load would pass a bind
    alone. The address family is chosen as uvicorn chooses it (IPv6 for a host with ':')."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except (OSError, OverflowError, UnicodeError) as exc:
        sock.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise _RefusedError(f"cannot listen on {host}:{port} ({what}): {reason}") from exc
    sock.set_inheritable(True)
    return sock


def _listeners(
    args: argparse.Namespace, settings: Settings, app: FastAPI
) -> tuple[_Listener, _Listener]:
    """The public listener and the admin one (metrics, client state) on its own port."""
    public = _Listener(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=args.access_log,
            proxy_headers=False,  # X-Forwarded-For: the app's own, ADVGUARD_TRUSTED_PROXIES only
            timeout_graceful_shutdown=args.graceful_shutdown_s,
        )
    )
    admin = _Listener(
        uvicorn.Config(
            app.state.admin_app,
            host=settings.admin_host or args.host,
            port=settings.admin_port,
            log_level=args.log_level,
            access_log=args.access_log,
            lifespan="off",  # the public app's lifespan loads and stops the shared service
            proxy_headers=False,
            timeout_graceful_shutdown=5,
        )
    )
    return public, admin


LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def event_loop_factory(choice: EventLoop) -> tuple[str, LoopFactory]:
    """The listeners' event loop, (its name, a factory): uvloop when asked for or, with
    ``auto``, when it is importable; else asyncio's own. uvloop asked for but not installed is
    a refusal, not a silently slower service."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise _RefusedError(
                    "ADVGUARD_EVENT_LOOP=uvloop, but uvloop is not installed: pip install "
                    "uvloop, or set ADVGUARD_EVENT_LOOP=auto (asyncio's loop without it)"
                ) from None
        else:
            return "uvloop", uvloop.new_event_loop
    return "asyncio", asyncio.new_event_loop


def _serve(args: argparse.Namespace) -> int:
    """Settings and app (or a refusal, exit 2) -> the two listeners -> serve until a signal."""
    try:
        settings, app = _configured_app(args)
        loop_name, new_loop = event_loop_factory(settings.event_loop)
        public_socket = _bound(args.host, args.port, "the public port")
        admin_host = settings.admin_host or args.host
        try:
            admin_socket = _bound(admin_host, settings.admin_port, "the admin port")
        except _RefusedError:
            public_socket.close()
            raise
    except _RefusedError as refused:
        print(f"advguard serve: refusing to start: {refused}", file=sys.stderr)
        return 2
    public, admin = _listeners(args, settings, app)
    # uvicorn says where it listens only when it opens the sockets itself
    log = logging.getLogger("uvicorn.error")
    log.info("public listener on http://%s:%d", args.host, args.port)
    log.info(
        "admin listener (metrics, admin routes) on http://%s:%d", admin_host, settings.admin_port
    )
    log.info("event loop: %s", loop_name)
    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(serve_listeners(public, admin, (public_socket, admin_socket)))
    finally:  # uvicorn closes them only after a started server's shutdown
        public_socket.close()
        admin_socket.close()
    # the lifespan refused to start (e.g. a neighbour source the bundle cannot use): uvicorn's
    # startup-failure code, not a clean exit
    return 0 if public.started else 3


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1-65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {value}")
    return value


def register(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the guard service (settings from ADVGUARD_* environment variables)",
        description="Serve POST /classify with per-client tracking and Prometheus metrics. "
        "Every setting is an ADVGUARD_* environment variable; the options below override them.",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="public listener's address (default: 127.0.0.1, this machine only; 0.0.0.0: all)",
    )
    serve.add_argument(
        "--port", type=port_number, default=8000, help="public listener's port (default: 8000)"
    )
    serve.add_argument("--bundle", type=Path, help="bundle directory (ADVGUARD_BUNDLE)")
    serve.add_argument("--device", help="cuda / cpu (ADVGUARD_DEVICE)")
    serve.add_argument("--redis-url", help="Redis URL for client tracking (ADVGUARD_REDIS_URL)")
    serve.add_argument(
        "--admin-port",
        type=port_number,
        help="private port of /metrics and the admin routes (ADVGUARD_ADMIN_PORT, default 9000)",
    )
    serve.add_argument(
        "--admin-host", help="address of the admin port (ADVGUARD_ADMIN_HOST; default --host)"
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=sorted(uvicorn.config.LOG_LEVELS),
        help="uvicorn's log level (default: info)",
    )
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument(
        "--graceful-shutdown-s",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds the requests in flight get to finish (default: 30)",
    )
    serve.set_defaults(run=_serve)
