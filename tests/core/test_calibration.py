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


def test_ties_and_calibration_summary():
    scores = np.array([0.1] * 50 + [0.9] * 50)
    assert threshold_for_retention(scores, 0.98) == pytest.approx(0.1)
    cal = calibrate(scores)
    assert cal.n_scores == 100 and cal.thresholds["0.98"] == pytest.approx(0.1)
    assert cal.quantiles["0.5"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        threshold_for_retention(np.array([]), 0.9)
