"""Grafana provisioning and dashboards: structure, stable uids, and every PromQL expression
(panels, annotations, alert rules) parsed by the real promtool."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from app.service.metrics import STATEFUL_OUTCOMES
from tests.deploy.helpers import DEPLOY, dashboard_files, promql_expressions

GRAFANA = DEPLOY / "grafana"
DATASOURCE_UID = "advguard-prometheus"
DASHBOARD_UIDS = {"advguard-overview.json": "advguard-overview"}

# The service's metrics (one module defines them); histograms expose _bucket/_sum/_count.
COUNTERS = {
    "advguard_requests_total",
    "advguard_http_responses_total",
    "advguard_clients_flagged_total",
    "advguard_tracker_errors_total",
    "advguard_stateful_queries_total",
}
GAUGES = {"advguard_queue_depth", "advguard_flagged_clients", "advguard_tracker_buffered_updates"}
HISTOGRAMS = {"advguard_score", "advguard_stage_seconds", "advguard_batch_size"}
INFOS = {"advguard_bundle_info"}
SERIES = (
    COUNTERS
    | GAUGES
    | INFOS
    | {f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "sum", "count")}
)
RECORDED = {
    "advguard:rejection_ratio:rate5m",
    "advguard:rejection_ratio:rate1d",
    "advguard:request_latency_seconds:p99_5m",
}

REQUIRED_PANELS = {
    "Requests by decision",
    "Rejection ratio",
    "Score distribution",
    "Stage latency p50",
    "Stage latency p99",
    "Batch size",
    "Queue depth",
    "Flagged clients",
    "Tracker errors",
    "Query attacks (stateful detection)",
}


def _load(path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads(path.read_text())
    return data


def test_the_datasource_is_provisioned_with_a_stable_uid() -> None:
    config = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = config["datasources"]
    assert source["uid"] == DATASOURCE_UID
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert source["isDefault"] is True


def test_the_dashboard_provider_points_at_the_mounted_folder(repo: Path) -> None:
    config = yaml.safe_load((GRAFANA / "provisioning/dashboards/advguard.yml").read_text())
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    mounted = provider["options"]["path"]
    compose = (repo / "docker-compose.yml").read_text()
    assert f"./deploy/grafana/dashboards:{mounted}:ro" in compose


def test_dashboards_have_stable_uids_and_well_formed_panels() -> None:
    files = dashboard_files()
    assert {p.name for p in files} == set(DASHBOARD_UIDS)
    for path in files:
        dashboard = _load(path)
        assert dashboard["uid"] == DASHBOARD_UIDS[path.name]
        assert isinstance(dashboard["title"], str) and dashboard["title"]
        assert isinstance(dashboard["schemaVersion"], int)
        panels = dashboard["panels"]
        assert isinstance(panels, list)
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), "panel ids must be unique"
        titles = {p["title"] for p in panels}
        assert titles >= REQUIRED_PANELS
        occupied: set[tuple[int, int]] = set()
        for panel in panels:
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
            cells = {
                (x, y)
                for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])
            }
            assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
            occupied |= cells
            assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}
            targets = panel["targets"]
            assert targets, panel["title"]
            ref_ids = [t["refId"] for t in targets]
            assert len(ref_ids) == len(set(ref_ids))
            for target in targets:
                assert target["datasource"]["uid"] == DATASOURCE_UID
                assert target["expr"].strip()
        heatmaps = [p for p in panels if p["type"] == "heatmap"]
        assert [p["title"] for p in heatmaps] == ["Score distribution"]
        (heatmap,) = heatmaps
        assert heatmap["targets"][0]["format"] == "heatmap"
        assert "advguard_score_bucket" in heatmap["targets"][0]["expr"]


def test_latency_panels_show_p50_and_p99_per_stage() -> None:
    panels = {
        p["title"]: p for p in _load(DEPLOY / "grafana/dashboards/advguard-overview.json")["panels"]
    }  # type: ignore[index]
    for title, quantile in (("Stage latency p50", "0.5"), ("Stage latency p99", "0.99")):
        expr = panels[title]["targets"][0]["expr"]
        assert expr.startswith(f"histogram_quantile({quantile},")
        assert "by (stage, le)" in expr and "advguard_stage_seconds_bucket" in expr


def test_expressions_use_only_the_services_metrics() -> None:
    expressions = promql_expressions()
    assert len(expressions) >= 20
    used: set[str] = set()
    for where, expr in expressions:
        names = set(re.findall(r"\badvguard(?:_[a-z0-9]+)+\b|\badvguard:[a-z0-9_:]+", expr))
        unknown = names - SERIES - RECORDED
        assert not unknown, f"{where}: unknown series {sorted(unknown)}"
        used |= names
    # Every metric of the service shows up somewhere (a panel or an alert).
    for metric in COUNTERS | GAUGES | INFOS:
        assert metric in used, metric
    for histogram in HISTOGRAMS:
        assert f"{histogram}_bucket" in used, histogram


def test_every_stateful_outcome_but_clear_is_on_a_panel() -> None:
    """What the stateful detector did to queries (detected, served their anchor's answer, not
    checked) is each drawn: an outcome added to the service must reach the dashboard."""
    panels = " ".join(expr for where, expr in promql_expressions() if ": panel " in where)
    for outcome in STATEFUL_OUTCOMES:
        if outcome != "clear":
            assert f'advguard_stateful_queries_total{{outcome="{outcome}"}}' in panels, outcome


def test_promtool_parses_every_expression(tool: Callable[[str], str], tmp_path: Path) -> None:
    """promtool has no bare-expression parser; each expression becomes a recording rule, which
    `promtool check rules` parses with Prometheus' own PromQL parser."""
    expressions = promql_expressions()
    rules = {
        "groups": [
            {
                "name": "every-expression",
                "rules": [
                    {"record": f"check:expr_{i}", "expr": expr}
                    for i, (_, expr) in enumerate(expressions)
                ],
            }
        ]
    }
    path = tmp_path / "expressions.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run(
        [tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(expressions)} rules found" in done.stdout


@pytest.mark.parametrize("broken", ["sum(rate(advguard_requests_total[1m])", "rate(x[5])"])
def test_promtool_rejects_a_broken_expression(
    broken: str, tool: Callable[[str], str], tmp_path: Path
) -> None:
    """The parsing check above is real: promtool fails on malformed PromQL."""
    path = tmp_path / "broken.yml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "r", "expr": broken}]}]})
    )
    done = subprocess.run(
        [tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
