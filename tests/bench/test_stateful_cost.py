"""``bench.stateful_cost``'s report, from the committed results file of a real run."""

import argparse
import copy
import json
from pathlib import Path

import pytest

from bench.common import interval_verdict, paired_ratio
from bench.stateful_cost import table

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "stateful_cost.json"


@pytest.fixture
def results() -> dict:
    return json.loads(RESULTS.read_text())


def _service_rows(report: str) -> dict[str, str]:
    return {
        line.split(" |")[0].strip("| "): line
        for line in report.splitlines()
        if line.startswith(("| memory tracker", "| redis tracker"))
    }


def test_the_report_gives_each_store_its_ratio_by_round_with_an_interval(results: dict) -> None:
    args = argparse.Namespace(**results["settings"])
    runs = results["throughput"]["runs"]
    results["throughput"]["on_over_off_by_round"] = {
        backend: paired_ratio(
            run["on"]["per_round_images_per_s"], run["off"]["per_round_images_per_s"]
        ).as_dict()
        for backend, run in runs.items()
    }
    rows = _service_rows(table(results, args))
    assert set(rows) == {"memory tracker and store", "redis tracker and store"}
    for backend in ("memory", "redis"):
        row = rows[f"{backend} tracker and store"]
        found = results["throughput"]["on_over_off_by_round"][backend]
        cells = [cell.strip() for cell in row.split("|")]
        assert cells[4] == f"{results['throughput']['on_over_off'][backend]:.0%}"
        verdict = interval_verdict(found, 0.90)
        assert cells[5] == (
            f"{found['ratio']:.1%} ({found['low']:.1%}-{found['high']:.1%}) "
            f"(target 90%: **{verdict}**)"
        )
        assert found["low"] < found["ratio"] < found["high"]
        assert "target" not in cells[6]  # the CPU ratio is shown, not judged


def test_a_results_file_from_before_the_interval_still_renders(results: dict) -> None:
    older = copy.deepcopy(results)
    older["throughput"].pop("on_over_off_by_round", None)
    rows = _service_rows(table(older, argparse.Namespace(**older["settings"])))
    assert set(rows) == {"memory tracker and store", "redis tracker and store"}
    assert all(
        row.split("|")[5].strip() == "- (target 90%: **not measured**)" for row in rows.values()
    )


def test_the_report_says_whether_the_stores_were_filled_first(results: dict) -> None:
    """A run without ``--fill`` says its stores held only its own queries; one with it says how
    many training photos each screened service was sent first."""
    args = argparse.Namespace(**{**results["settings"], "fill": 0})
    assert "held only the run's own queries" in table(results, args)
    filled = copy.deepcopy(results)
    for run in filled["throughput"]["runs"].values():
        run["on"]["filled"] = {"sent": 52_000, "answered": 52_000, "seconds": 190.0}
    report = table(filled, argparse.Namespace(**{**results["settings"], "fill": 50_000}))
    assert "first sent 50,000 distinct CIFAR-10 training photos" in report
    assert "52,000, 52,000 sent in all" in report
