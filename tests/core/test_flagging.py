"""The flag policies as pure functions: the window update, each decision rule, the calibration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from app.core.flagging import (
    FLAG_POLICIES,
    FlagPolicy,
    HonestTraffic,
    ScoreWindow,
    WindowParams,
    advance_arrays,
    advance_window,
    calibrate_policy,
    crosses,
    rejection_glr,
    simulate_extremes,
)

PARAMS = WindowParams(ewma_alpha=0.2, cusum_reference=0.4)


def _window(scores: list[float], threshold: float = 0.2) -> ScoreWindow:
    window = ScoreWindow()
    for score in scores:
        window = advance_window(window, score, score >= threshold, PARAMS)
    return window


def test_window_statistics_by_hand() -> None:
    window = _window([0.5, 0.1, 0.3])
    assert window.scored == 3
    assert window.mean == pytest.approx(0.3)
    assert window.rejected == 1  # 0.1 < 0.2
    # CUSUM: max(0, 0 + 0.4 - 0.5) = 0; 0 + 0.3 = 0.3; 0.3 + 0.1 = 0.4
    assert window.cusum == pytest.approx(0.4)
    # bias-corrected EWMA: the first score exactly, then weights alpha / (1 - (1 - alpha)^n)
    ewma = 0.5
    for n, score in ((2, 0.1), (3, 0.3)):
        ewma += 0.2 / (1 - 0.8**n) * (score - ewma)
    assert window.ewma == pytest.approx(ewma)


def test_cusum_resets_at_zero_and_forgets_good_traffic() -> None:
    assert _window([0.9] * 50).cusum == 0.0
    # high scores before an attack do not bank credit: the CUSUM starts from 0, not below
    assert _window([0.9] * 50 + [0.1] * 3).cusum == pytest.approx(3 * 0.3)


def test_array_update_equals_scalar_update() -> None:
    rng = np.random.default_rng(1)
    paths = rng.uniform(0, 1, size=(5, 12))
    mean = ewma = rejected = cusum = np.zeros(5)
    for step in range(12):
        scores = paths[:, step]
        mean, ewma, rejected, cusum = advance_arrays(
            step + 1, mean, ewma, rejected, cusum, scores, (scores < 0.2).astype(float), PARAMS
        )
    for i in range(5):
        window = _window(list(paths[i]))
        assert (window.mean, window.ewma, window.cusum) == pytest.approx(
            (mean[i], ewma[i], cusum[i])
        )
        assert window.rejected == rejected[i]


def test_rejection_glr_is_n_times_kl_above_the_null_rate() -> None:
    n, r, p0 = 40, 10, 0.05
    q = r / n
    kl = q * math.log(q / p0) + (1 - q) * math.log((1 - q) / (1 - p0))
    assert rejection_glr(n, float(r), p0) == pytest.approx(n * kl)
    assert rejection_glr(n, 2.0, p0) == 0.0  # at the null rate: no evidence
    assert rejection_glr(n, 0.0, p0) == 0.0
    assert rejection_glr(n, float(n), p0) == pytest.approx(n * math.log(1 / p0))
    values = [rejection_glr(n, float(k), p0) for k in range(3, n + 1)]
    assert all(a < b for a, b in itertools.pairwise(values))  # monotone in r
    array = rejection_glr(n, np.array([0.0, 10.0]), p0)
    assert array == pytest.approx([0.0, n * kl])


@pytest.mark.parametrize(
    ("kind", "threshold", "suspicious", "innocent"),
    [
        ("mean", 0.3, [0.2] * 5, [0.4] * 5),
        ("ewma", 0.3, [0.5] * 3 + [0.1] * 2, [0.1] * 3 + [0.5] * 2),
        ("rejection_rate", 2.0, [0.1] * 5, [0.5] * 5),
        ("cusum", 0.5, [0.1] * 5, [0.5] * 5),
    ],
)
def test_each_policy_flags_only_past_its_threshold_after_min_requests(
    kind: str, threshold: float, suspicious: list[float], innocent: list[float]
) -> None:
    policy = FlagPolicy(kind, threshold, min_requests=5, window=PARAMS, null_rejection_rate=0.05)  # type: ignore[arg-type]
    assert policy.should_flag(_window(suspicious))
    assert not policy.should_flag(_window(innocent))
    assert not policy.should_flag(_window(suspicious[:4]))  # below min_requests
    # the boundary itself is not a crossing
    value = policy.statistic(_window(suspicious))
    assert not FlagPolicy(kind, value, 5, PARAMS, 0.05).should_flag(_window(suspicious))  # type: ignore[arg-type]


def test_crossing_direction() -> None:
    assert crosses("mean", 0.1, 0.2) and not crosses("mean", 0.3, 0.2)
    assert crosses("ewma", 0.1, 0.2)
    assert crosses("cusum", 0.3, 0.2) and not crosses("cusum", 0.1, 0.2)
    assert crosses("rejection_rate", 3.0, 2.0)


def test_invalid_policies_are_refused() -> None:
    with pytest.raises(ValueError):
        FlagPolicy("median", 0.3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FlagPolicy("mean", 0.3, min_requests=0)
    with pytest.raises(ValueError):
        WindowParams(ewma_alpha=0.0)
    honest = HonestTraffic(np.array([0.5, 0.6]), 0.2)
    with pytest.raises(ValueError):
        calibrate_policy("mean", honest, false_flag_rate=0.0)
    with pytest.raises(ValueError):
        calibrate_policy("mean", HonestTraffic(np.array([]), 0.2))


@pytest.mark.parametrize("kind", FLAG_POLICIES)
def test_calibration_hits_the_design_false_flag_rate_on_fresh_clients(kind: str) -> None:
    """Calibrated on one bootstrap of the honest scores, checked on an independent one."""
    rng = np.random.default_rng(7)
    scores = np.clip(rng.normal(0.45, 0.18, 3000), 0.0, 1.0)
    honest = HonestTraffic(scores, service_threshold=0.17)
    policy = calibrate_policy(
        kind, honest, false_flag_rate=0.02, horizon=100, clients=20_000, seed=1
    )  # type: ignore[arg-type]
    assert policy == calibrate_policy(
        kind, honest, false_flag_rate=0.02, horizon=100, clients=20_000, seed=1
    )  # type: ignore[arg-type]
    assert policy.window.cusum_reference == pytest.approx(scores.mean() - scores.std() / 2)
    assert policy.null_rejection_rate == pytest.approx(np.mean(scores < 0.17))
    fresh = np.random.default_rng(99).choice(scores, size=(20_000, 100))
    extremes = simulate_extremes(
        policy.kind, fresh, 0.17, policy.min_requests, policy.window, policy.null_rejection_rate
    )
    flagged = np.mean([crosses(policy.kind, float(v), policy.threshold) for v in extremes])
    assert 0.012 < flagged < 0.03
    # and a client whose scores all sit one honest std lower is flagged by every policy
    shifted = np.clip(fresh[:2000] - 0.18, 0.0, 1.0)
    extremes = simulate_extremes(
        policy.kind, shifted, 0.17, policy.min_requests, policy.window, policy.null_rejection_rate
    )
    assert np.mean([crosses(policy.kind, float(v), policy.threshold) for v in extremes]) > 0.5
