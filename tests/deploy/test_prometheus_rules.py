"""The Prometheus config and alert rules, checked and unit-tested by the real promtool."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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


# Each threshold and `for:` duration of alerts.yml moved past the value at which alerts_test.yml
# pins it: (alert, text in alerts.yml, what it becomes). The alert's unit tests must then fail,
# or the threshold is no longer tested from both sides.
_CLAMP = "clamp_min({factor} * advguard:rejection_ratio:rate1d, {floor})"
_P99 = "advguard:request_latency_seconds:p99_5m > {threshold}\n        for: {hold}"
_BACKLOG = "max by (job) (advguard_tracker_buffered_updates) {op}\n        for: {hold}"
_QUEUE = "min by (job, instance) (min_over_time(advguard_queue_depth[5m])) {op}"
_SHED = "            > {threshold}\n        for: {hold}"
_TRACKER = "increase(advguard_tracker_errors_total[5m])) {op}\n        for: {hold}"
_STORE = (
    'increase(advguard_stateful_queries_total{{outcome="error"}}[5m])) {op}\n        for: {hold}'
)
_DOWN = 'up{{job="advguard-api"}} == 0\n        for: {hold}'
MUTANTS: list[tuple[str, str, str]] = [
    *(
        (
            "AdvguardRejectionRatioAboveBaseline",
            _CLAMP.format(factor=2, floor="0.10"),
            _CLAMP.format(**m),
        )
        for m in (
            {"factor": 0, "floor": "0.10"},  # the "twice the 1-day baseline" half dropped
            {"factor": 1, "floor": "0.10"},  # above the baseline, not twice it
            {"factor": 2, "floor": "0.06"},
            {"factor": 2, "floor": "0.35"},
        )
    ),
    *(
        ("AdvguardHighLatencyP99", _P99.format(threshold=0.5, hold="10m"), _P99.format(**m))
        for m in (
            {"threshold": 0.1, "hold": "10m"},
            {"threshold": 0.9, "hold": "10m"},
            {"threshold": 0.5, "hold": "7m"},
            {"threshold": 0.5, "hold": "9m"},
            {"threshold": 0.5, "hold": "11m"},
        )
    ),
    *(
        ("AdvguardTrackerBacklog", _BACKLOG.format(op="> 1000", hold="5m"), _BACKLOG.format(**m))
        for m in (
            {"op": "> 100", "hold": "5m"},
            {"op": "> 1900", "hold": "5m"},
            {"op": ">= 1000", "hold": "5m"},
            {"op": "> 1000", "hold": "4m"},
            {"op": "> 1000", "hold": "6m"},
        )
    ),
    *(
        ("AdvguardQueueSaturated", _QUEUE.format(op=">= 64"), _QUEUE.format(op=op))
        for op in (">= 11", ">= 70", "> 64")
    ),
    *(
        ("AdvguardShedding", _SHED.format(threshold="0.01", hold="5m"), _SHED.format(**m))
        for m in (
            {"threshold": "0.05", "hold": "5m"},
            {"threshold": "0.09", "hold": "5m"},
            {"threshold": "0.009", "hold": "5m"},
            {"threshold": "0.01", "hold": "4m"},
            {"threshold": "0.01", "hold": "6m"},
        )
    ),
    *(
        (alert, text.format(op="> 0", hold="5m"), text.format(**m))
        for alert, text in (
            ("AdvguardTrackerErrors", _TRACKER),
            ("AdvguardStatefulStoreErrors", _STORE),
        )
        for m in (
            {"op": "> 3", "hold": "5m"},
            {"op": ">= 0", "hold": "5m"},
            {"op": "> 0", "hold": "4m"},
            {"op": "> 0", "hold": "6m"},
        )
    ),
    *(
        ("AdvguardApiDown", _DOWN.format(hold="2m"), _DOWN.format(hold=hold))
        for hold in ("1m", "3m")
    ),
    (
        "AdvguardClientsFlagged",
        "increase(advguard_clients_flagged_total[10m])) > 0",
        "increase(advguard_clients_flagged_total[10m])) > 1",
    ),
    (
        "AdvguardQueryAttackDetected",
        'increase(advguard_stateful_queries_total{outcome="detected"}[10m])\n          ) > 0',
        'increase(advguard_stateful_queries_total{outcome="detected"}[10m])\n          ) > 1',
    ),
]


def test_the_unit_tests_pin_every_threshold(tool: Callable[[str], str], tmp_path: Path) -> None:
    """Every mutant of alerts.yml above fails the unit tests of its alert.

    Each mutant runs only the test groups that check its alert (the day-long baselines of the
    rejection ratio make the whole file slow), in parallel.
    """
    assert {alert for alert, _, _ in MUTANTS} == _alert_names(), "an alert without mutants"
    promtool = tool("promtool")
    rules = (PROMETHEUS / "alerts.yml").read_text()
    unit_tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    assert unit_tests["rule_files"] == ["alerts.yml"]

    def killed(index: int, alert: str, old: str, new: str) -> str | None:
        """None if the mutant fails its alert's tests, else why it is not killed."""
        assert rules.count(old) == 1, f"{old!r} is not exactly once in alerts.yml"
        folder = tmp_path / f"mutant{index}"
        folder.mkdir()
        (folder / "alerts.yml").write_text(rules.replace(old, new))
        groups = [
            case
            for case in unit_tests["tests"]
            if any(check["alertname"] == alert for check in case.get("alert_rule_test", []))
        ]
        assert groups, f"no unit test checks {alert}"
        (folder / "alerts_test.yml").write_text(yaml.safe_dump({**unit_tests, "tests": groups}))
        done = subprocess.run(
            [promtool, "test", "rules", "alerts_test.yml"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=120,
        )
        output = done.stdout + done.stderr
        if done.returncode != 0 and f"alertname: {alert}," in output:
            return None
        return f"{old!r} -> {new!r}: promtool exit {done.returncode}\n{output[-2000:]}"

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda job: killed(*job), ((i, *m) for i, m in enumerate(MUTANTS))))
    survivors = [r for r in results if r is not None]
    assert survivors == [], "mutants of alerts.yml that the unit tests let pass:\n" + "\n".join(
        survivors
    )


def test_the_scrape_job_matches_the_alerts() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["advguard-api"]["metrics_path"] == "/metrics"
    # /metrics lives on the admin listener (ADVGUARD_ADMIN_PORT, 9000); the public 8000 is 404
    targets = [t for static in jobs["advguard-api"]["static_configs"] for t in static["targets"]]
    assert targets == ["api:9000"]
    assert 'job="advguard-api"' in (PROMETHEUS / "alerts.yml").read_text()
    assert config["rule_files"] == ["alerts.yml"]
