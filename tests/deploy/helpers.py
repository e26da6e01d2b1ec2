"""Helpers of the deployment tests: the real tools, and every PromQL expression we ship."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

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
