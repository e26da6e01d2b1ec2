"""bench.switch_interval's services and report, from made-up rounds (the load itself is the
shared ``interleaved``, tested with service_vs_bare)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.switch_interval import main, ratios, service_envs, table


def test_every_interval_runs_stateful_off_and_on() -> None:
    envs = service_envs(["default", "0.5"])
    assert list(envs) == ["default/off", "default/on", "0.5/off", "0.5/on"]
    assert "ADVGUARD_SWITCH_INTERVAL_MS" not in envs["default/on"]
    assert envs["0.5/on"]["ADVGUARD_SWITCH_INTERVAL_MS"] == "0.5"
    assert envs["0.5/off"]["ADVGUARD_STATEFUL_ENABLED"] == "false"
    assert envs["0.5/on"]["ADVGUARD_STATEFUL_ENABLED"] == "true"


def _run(rounds: list[float]) -> dict[str, Any]:
    return {
        "per_round_images_per_s": rounds,
        "throughput_images_per_s": sum(rounds) / 3,
        "cpu_ms_per_request": 3.0,
    }


def test_ratios_against_the_default_off_service_and_on_over_off() -> None:
    runs = {
        "default/off": _run([400.0, 200.0, 300.0]),
        "default/on": _run([360.0, 180.0, 270.0]),
        "1/off": _run([440.0, 220.0, 330.0]),
        "1/on": _run([400.0, 200.0, 300.0]),
    }
    found = ratios(runs, ["default", "1"])
    assert found["base"] == "default/off"
    assert found["over_base"]["1/off"]["ratio"] == pytest.approx(1.1)
    assert found["on_over_off"]["default"]["ratio"] == pytest.approx(0.9)
    assert found["on_over_off"]["1"]["ratio"] == pytest.approx(400 / 440, abs=1e-4)
    results = {
        "runs": runs,
        "ratios": found,
        "settings": {"rounds": 3, "slice": 5.0, "concurrency": 32, "clients": 1000},
        "loadavg_before": [0.5, 0, 0],
        "loadavg_after": [1.5, 0, 0],
    }
    report = table(results)
    assert "| 1 | on | 300 | 100.0% (100.0%-100.0%) | 3.00 | 90.9% (90.9%-90.9%) |" in report


def test_a_bad_interval_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["--intervals", "default", "-2"])
    assert "neither 'default' nor a positive ms value" in capsys.readouterr().err
