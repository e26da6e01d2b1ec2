import numpy as np
import pytest

from app.core.calibration import RETENTIONS, calibrate, threshold_for_retention


@pytest.mark.parametrize("retention", RETENTIONS)
def test_threshold_keeps_at_least_the_retention(retention):
    scores = np.random.default_rng(3).beta(2, 5, 1234)
    t = threshold_for_retention(scores, retention)
    kept = np.mean(scores >= t)
    assert kept >= retention
    assert kept < retention + 2 / scores.size  # and not much more: the largest such threshold


def test_threshold_is_the_largest_that_keeps_the_retention_by_brute_force():
    """Every score is a candidate threshold: the chosen one keeps at least the retention, and
    the next larger score does not (one order statistic too high or too low fails here)."""
    rng = np.random.default_rng(11)
    for trial in range(300):
        n = int(rng.integers(1, 60))
        scores = rng.integers(0, 8, n) / 8.0 if trial % 2 else rng.normal(size=n)  # ties, none
        retention = float(rng.choice([0.5, 0.9, 0.95, 0.98, 0.99, 1.0, rng.uniform(0.01, 1)]))
        keeps = [c for c in np.unique(scores) if np.mean(scores >= c) >= retention]
        assert threshold_for_retention(scores, retention) == max(keeps), (scores, retention)


def test_ties_and_calibration_summary():
    scores = np.array([0.1] * 50 + [0.9] * 50)
    assert threshold_for_retention(scores, 0.98) == pytest.approx(0.1)
    cal = calibrate(scores)
    assert cal.n_scores == 100 and cal.thresholds["0.98"] == pytest.approx(0.1)
    assert cal.quantiles["0.5"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        threshold_for_retention(np.array([]), 0.9)
