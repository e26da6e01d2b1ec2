"""Helpers of the deployment tests: the real tools, and every PromQL expression we ship."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def find_tool(name: str) -> str:
    """The tool's path: the running interpreter's bin folder first (pip-installed), then PATH.

    A missing tool fails the test: CI installs every one (docs/deploy.md, 'CI requirements').
    """
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"required tool {name!r} is not installed (see docs/deploy.md, 'CI requirements')",
            pytrace=False,
        )
    return found


# Grafana's interval variables, replaced by what they stand for when the expressions are checked
# outside Grafana (promtool, Prometheus' HTTP API).
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
}


def substitute_grafana_variables(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    return expr


def dashboard_files() -> list[Path]:
    return sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))


def promql_expressions() -> list[tuple[str, str]]:
    """(where, expression) for every dashboard panel target, annotation and alerting rule."""
    found: list[tuple[str, str]] = []
    for path in dashboard_files():
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                where = f"{path.name}: panel {panel['title']!r} {target['refId']}"
                found.append((where, substitute_grafana_variables(target["expr"])))
        for annotation in dashboard.get("annotations", {}).get("list", []):
            if "expr" in annotation:
                where = f"{path.name}: annotation {annotation['name']!r}"
                found.append((where, substitute_grafana_variables(annotation["expr"])))
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule["record"]
            found.append((f"alerts.yml: {name}", rule["expr"].strip()))
    return found


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def advguard_serve(
    port: int, log: Path, env: dict[str, str], *args: str, admin_port: int | None = None
) -> Iterator[Any]:
    """``advguard serve`` on 127.0.0.1:port with its admin listener on ``admin_port`` (default:
    a free port, never the shared 9000), ready (``/readyz`` 200) when yielded."""
    admin = admin_port or free_tcp_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                find_tool("advguard"),
                "serve",
                "--port",
                str(port),
                "--admin-port",
                str(admin),
                "--device",
                "cpu",
                *args,
            ],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_http_ok(f"http://127.0.0.1:{port}/readyz", process, log, 90)
            yield process
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(10)


def wait_http_ok(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} never answered 200:\n{log.read_text(errors='replace')}")
        time.sleep(0.2)
