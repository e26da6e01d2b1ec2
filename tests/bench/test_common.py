"""``bench.common.paired_ratio``: the ratio of two services loaded in turn, round by round."""

import math

import numpy as np
import pytest

from bench.common import interval_verdict, paired_ratio, ratio_by_round, ratio_cell


def test_rounds_with_one_ratio_give_that_ratio_and_no_spread() -> None:
    found = paired_ratio([90.0, 45.0, 180.0], [100.0, 50.0, 200.0])
    assert found.ratio == pytest.approx(0.9)
    assert found.low == pytest.approx(0.9) and found.high == pytest.approx(0.9)
    assert found.rounds == 3 and found.level == 0.95


def test_the_ratio_is_the_geometric_mean_of_the_rounds_not_of_the_totals() -> None:
    # a fast round and a slow one: totals would weigh the fast round 10x
    found = paired_ratio([800.0, 125.0], [1000.0, 100.0])
    assert found.ratio == pytest.approx(math.sqrt(0.8 * 1.25))
    assert pytest.approx(found.ratio) != (800.0 + 125.0) / (1000.0 + 100.0)
    assert 0.8 <= found.low <= found.ratio <= found.high <= 1.25


def test_the_interval_narrows_when_the_rounds_agree() -> None:
    rng = np.random.default_rng(1)
    off = rng.uniform(300, 600, size=10)
    noisy = paired_ratio(off * rng.normal(0.88, 0.05, size=10), off)
    steady = paired_ratio(off * rng.normal(0.88, 0.005, size=10), off)
    assert steady.high - steady.low < (noisy.high - noisy.low) / 3
    assert steady.low <= steady.ratio <= steady.high
    assert steady.low > 0.85 and steady.high < 0.91


def test_the_interval_is_repeatable_and_covers_the_truth_most_of_the_time() -> None:
    rng = np.random.default_rng(2)
    covered = 0
    for trial in range(200):
        off = rng.uniform(300, 600, size=10)
        on = off * np.exp(rng.normal(math.log(0.9), 0.04, size=10))
        found = paired_ratio(on, off, resamples=2000, seed=trial)
        assert found == paired_ratio(on, off, resamples=2000, seed=trial)
        covered += found.low <= 0.9 <= found.high
    # a bootstrap interval of 10 rounds is a little narrow: near, not at, 95%
    assert 0.85 <= covered / 200 <= 0.99


@pytest.mark.parametrize(
    ("on", "off", "level"),
    [
        ([1.0, 2.0], [1.0], 0.95),  # rounds missing on one side
        ([], [], 0.95),  # no rounds
        ([1.0, 0.0], [1.0, 1.0], 0.95),  # a round that answered nothing
        ([1.0], [1.0], 1.0),  # no interval at 100%
    ],
)
def test_bad_rounds_are_refused(on: list[float], off: list[float], level: float) -> None:
    with pytest.raises(ValueError):
        paired_ratio(on, off, level=level)


def test_as_dict_rounds_for_the_results_file() -> None:
    found = paired_ratio([88.123456, 90.0], [100.0, 100.0]).as_dict()
    assert set(found) == {"ratio", "low", "high", "rounds", "level"}
    assert found["rounds"] == 2 and found["ratio"] == round(found["ratio"], 4)


def test_a_report_survives_a_round_that_answered_nothing() -> None:
    assert ratio_by_round([100.0, 0.0], [100.0, 90.0]) is None
    assert ratio_cell(None) == "-"
    found = ratio_by_round([90.0, 90.0], [100.0, 100.0])
    assert found is not None and ratio_cell(found) == "90.0% (90.0%-90.0%)"


def test_a_target_is_met_or_missed_only_by_the_whole_interval() -> None:
    def found(low: float, high: float) -> dict[str, float | int]:
        return {"ratio": (low + high) / 2, "low": low, "high": high, "rounds": 10, "level": 0.95}

    assert interval_verdict(found(0.90, 0.95), 0.90) == "met"
    assert interval_verdict(found(0.80, 0.899), 0.90) == "missed"
    assert interval_verdict(found(0.874, 0.925), 0.90) == "not shown either way"
    assert interval_verdict(found(0.82, 0.864), 0.85) == "not shown either way"
    assert interval_verdict(None, 0.90) == "not measured"


def test_a_service_that_refuses_its_settings_is_said_in_one_line(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The benchmarks start ``advguard serve``: one that refuses its settings (here a batch size
    of 0) used to end the benchmark in a RuntimeError traceback after its one-line reason."""
    from app.cli import said_in_one_line
    from bench.common import serve

    def start() -> int:
        with serve({"ADVGUARD_MAX_BATCH_SIZE": "0"}):
            return 0

    assert said_in_one_line(start, "advguard bench load_service") == 2
    err = capfd.readouterr().err
    assert "advguard serve: refusing to start:" in err
    assert err.endswith(
        "advguard bench load_service: error: advguard serve exited with code 2 before it was "
        "ready (its reason is printed above)\n"
    )
