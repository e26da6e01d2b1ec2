"""The Prometheus config and alert rules, checked and unit-tested by the real promtool."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import yaml

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def _run(args: list[str], cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def test_promtool_checks_the_config(tool: Callable[[str], str]) -> None:
    output = _run([tool("promtool"), "check", "config", "prometheus.yml"], PROMETHEUS)
    assert "is valid prometheus config file syntax" in output
    assert "1 rule files found" in output


def test_promtool_checks_the_rules(tool: Callable[[str], str]) -> None:
    output = _run([tool("promtool"), "check", "rules", "alerts.yml"], PROMETHEUS)
    assert "SUCCESS" in output


def test_promtool_unit_tests_pass(tool: Callable[[str], str]) -> None:
    output = _run([tool("promtool"), "test", "rules", "alerts_test.yml"], PROMETHEUS)
    assert "SUCCESS" in output


def _alert_names() -> set[str]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
    alerts = _alert_names()
    assert alerts >= {
        "AdvguardRejectionRatioAboveBaseline",
        "AdvguardClientsFlagged",
        "AdvguardTrackerErrors",
        "AdvguardHighLatencyP99",
        "AdvguardQueueSaturated",
    }
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - silent == set(), "alerts never tested silent"
    assert (firing | silent) - alerts == set(), "tests name alerts that do not exist"


def test_the_scrape_job_matches_the_alerts() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["advguard-api"]["metrics_path"] == "/metrics"
    # /metrics lives on the admin listener (ADVGUARD_ADMIN_PORT, 9000); the public 8000 is 404
    targets = [t for static in jobs["advguard-api"]["static_configs"] for t in static["targets"]]
    assert targets == ["api:9000"]
    assert 'job="advguard-api"' in (PROMETHEUS / "alerts.yml").read_text()
    assert config["rule_files"] == ["alerts.yml"]
