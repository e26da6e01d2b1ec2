"""The flag policies as pure functions: the window update, each decision rule, the calibration."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest

from app.core.flagging import (
    FLAG_POLICIES,
    ClassScale,
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

PARAMS = WindowParams(ewma_alpha=0.2, cusum_reference=0.4, anchor=0.5, shift_allowance=0.1)


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
    # shift: none at the first; 0 + (0.5 - 0.1 - 0.1) = 0.3; max(0, 0.3 + (0.3 - 0.1 - 0.3)) = 0.2
    assert window.shift == pytest.approx(0.2)


def test_cusum_resets_at_zero_and_forgets_good_traffic() -> None:
    assert _window([0.9] * 50).cusum == 0.0
    # high scores before an attack do not bank credit: the CUSUM starts from 0, not below
    assert _window([0.9] * 50 + [0.1] * 3).cusum == pytest.approx(3 * 0.3)


def test_array_update_equals_scalar_update() -> None:
    rng = np.random.default_rng(1)
    paths = rng.uniform(0, 1, size=(5, 12))
    state = (np.zeros(5),) * 5  # mean, ewma, rejected, cusum, shift
    for step in range(12):
        scores = paths[:, step]
        state = advance_arrays(step + 1, *state, scores, (scores < 0.2).astype(float), PARAMS)
    mean, ewma, rejected, cusum, shift = state
    for i in range(5):
        window = _window(list(paths[i]))
        assert (window.mean, window.ewma, window.cusum, window.shift) == pytest.approx(
            (mean[i], ewma[i], cusum[i], shift[i])
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
        ("ewma_anchored", 0.3, [0.1] * 5, [0.5] * 5),
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


def test_anchored_ewma_is_the_textbook_chart_started_at_the_anchor() -> None:
    """z_0 = anchor, z_n = (1 - alpha) z_{n-1} + alpha x_n, computed from the window's
    bias-corrected EWMA; and a window restarted (a cleared flag) starts at the anchor again."""
    rng = np.random.default_rng(5)
    params = WindowParams(ewma_alpha=0.07, anchor=0.62)
    policy = FlagPolicy("ewma_anchored", 0.0, min_requests=1, window=params)
    window, chart = ScoreWindow(), 0.62
    for value in rng.random(60):
        window = advance_window(window, float(value), True, params)
        chart = (1 - 0.07) * chart + 0.07 * float(value)
        assert policy.statistic(window) == pytest.approx(chart, rel=1e-12)
    assert policy.statistic(advance_window(ScoreWindow(), 0.2, True, params)) == pytest.approx(
        0.93 * 0.62 + 0.07 * 0.2
    )


def test_crossing_direction() -> None:
    assert crosses("mean", 0.1, 0.2) and not crosses("mean", 0.3, 0.2)
    assert crosses("ewma", 0.1, 0.2) and crosses("ewma_anchored", 0.1, 0.2)
    assert crosses("cusum", 0.3, 0.2) and not crosses("cusum", 0.1, 0.2)
    assert crosses("rejection_rate", 3.0, 2.0)
    assert crosses("shift", 3.0, 2.0) and not crosses("shift", 1.0, 2.0)


def test_the_shift_follows_the_clients_own_mean_by_brute_force() -> None:
    """S_n = max(0, S_{n-1} + (mean of the first n - 1 - k - x_n)), none at the first."""
    rng = np.random.default_rng(8)
    values = list(rng.random(40))
    expected = 0.0
    for n in range(2, len(values) + 1):
        earlier = sum(values[: n - 1]) / (n - 1)
        expected = max(0.0, expected + (earlier - PARAMS.shift_allowance - values[n - 1]))
    assert _window(values).shift == pytest.approx(expected, rel=1e-12)
    # a steady client, however low its level, banks nothing; a drop below its own level does
    assert _window([0.1] * 60).shift == 0.0
    assert _window([0.1] * 60 + [0.0] * 3).shift == 0.0  # within the allowance
    assert _window([0.6] * 60 + [0.1] * 3).shift > 3 * 0.35


def test_ewma_shift_flags_on_either_statistic() -> None:
    policy = FlagPolicy("ewma_shift", 0.3, min_requests=5, window=PARAMS, shift_threshold=1.0)
    assert policy.thresholds() == [("ewma", 0.3), ("shift", 1.0)]
    assert policy.should_flag(_window([0.1] * 5))  # the EWMA: low from the first request
    honest_then_low = [0.7] * 50 + [0.32] * 4  # the EWMA stays above 0.3; the shift does not
    assert _window(honest_then_low).ewma > 0.3
    assert _window(honest_then_low).shift > 1.0
    assert policy.should_flag(_window(honest_then_low))
    assert not policy.should_flag(_window([0.7] * 50 + [0.32] * 2))
    assert not policy.should_flag(_window([0.35] * 100))  # steady, above the EWMA's threshold
    assert policy.statistic(_window([0.1] * 5)) == pytest.approx(0.1)  # its first: the EWMA
    with pytest.raises(ValueError):
        FlagPolicy("ewma_shift", 0.3)  # no shift threshold
    with pytest.raises(ValueError):
        FlagPolicy("ewma", 0.3, shift_threshold=1.0)


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
    assert policy.window.anchor == pytest.approx(scores.mean())
    assert policy.null_rejection_rate == pytest.approx(np.mean(scores < 0.17))
    if kind == "ewma_shift":
        assert policy.window.shift_allowance == pytest.approx(scores.std() / 2)
    fresh = np.random.default_rng(99).choice(scores, size=(20_000, 100))
    assert 0.012 < _flagged_share(policy, fresh, 0.17) < 0.03
    # and a client whose scores all sit one honest std lower is flagged by every policy
    shifted = np.clip(fresh[:2000] - 0.18, 0.0, 1.0)
    assert _flagged_share(policy, shifted, 0.17) > 0.5


def _flagged_share(policy: FlagPolicy, paths: np.ndarray, service_threshold: float) -> float:
    """The share of clients (rows: their scores) that any of the policy's statistics flags."""
    flagged = np.zeros(len(paths), dtype=bool)
    for statistic, threshold in policy.thresholds():
        extremes = simulate_extremes(
            statistic,
            paths,
            paths < service_threshold,
            policy.min_requests,
            policy.window,
            policy.null_rejection_rate,
        )
        flagged |= [crosses(statistic, float(v), threshold) for v in extremes]
    return float(flagged.mean())


def test_ewma_shift_splits_the_budget_and_sees_a_drop_after_history() -> None:
    """Each of its thresholds is its statistic's alone at half the rate; a client that turns
    from honest to one honest std lower after 50 requests is flagged by the shift, while a
    steady client one honest std lower than the calibration's (raw scores: one class) is
    flagged no more often by it than designed, and far less often than by the CUSUM."""
    rng = np.random.default_rng(12)
    scores = np.clip(rng.normal(0.45, 0.18, 3000), 0.0, 1.0)
    honest = HonestTraffic(scores, service_threshold=0.17)
    kwargs = {"false_flag_rate": 0.02, "horizon": 100, "clients": 20_000, "seed": 3}
    both = calibrate_policy("ewma_shift", honest, **kwargs)  # type: ignore[arg-type]
    half = {"false_flag_rate": 0.01, "horizon": 100, "clients": 20_000, "seed": 3}
    assert both.threshold == calibrate_policy("ewma", honest, **half).threshold  # type: ignore[arg-type]
    assert both.shift_threshold is not None and both.shift_threshold > 0
    paths = np.random.default_rng(98).choice(scores, size=(2000, 100))
    turned = paths.copy()
    turned[:, 50:] = np.clip(turned[:, 50:] - 0.18, 0.0, 1.0)
    shift_only = replace(both, threshold=-np.inf)
    assert _flagged_share(shift_only, turned, 0.17) > 0.5
    steady_low = np.clip(paths - 0.18, 0.0, 1.0)
    cusum = calibrate_policy("cusum", honest, **kwargs)  # type: ignore[arg-type]
    assert _flagged_share(shift_only, steady_low, 0.17) < 0.03
    assert _flagged_share(cusum, steady_low, 0.17) > 0.5


# --------------------------------------------------------------------------- per-class values


def _brute_p(value: float, reference: list[float]) -> float:
    if not math.isfinite(value):
        return 1 / (1 + len(reference))
    return (1 + sum(r <= value for r in reference)) / (1 + len(reference))


def test_class_scale_ranks_a_score_among_its_predicted_class() -> None:
    rng = np.random.default_rng(3)
    scores = np.round(rng.random(90), 2)  # rounded: ties
    classes = np.repeat(np.array([0, 1, 2]), [40, 45, 5])
    scale = ClassScale.fit(scores, classes, min_class=20)
    assert sorted(scale.by_class) == [0, 1]  # class 2 has 5 < 20: pooled
    fresh = np.array([0.0, 0.31, 0.5, 0.99, 1.5, np.nan, -np.inf, 0.5])
    predicted = np.array([0, 0, 1, 1, 2, 0, 1, 7])  # 7: never predicted, pooled
    reference = {0: scores[:40], 1: scores[40:85]}
    want = [
        _brute_p(float(v), list(reference.get(int(c), scores)))
        for v, c in zip(fresh, predicted, strict=True)
    ]
    np.testing.assert_allclose(scale.values(fresh, predicted), want)
    assert scale.value(0.5, 1) == pytest.approx(want[2])


def test_held_out_values_leave_the_score_itself_out() -> None:
    rng = np.random.default_rng(4)
    scores = np.round(rng.random(70), 1)  # many ties
    scores[5] = np.nan  # an unmeasured honest score: in no reference, smallest p-value
    classes = np.repeat(np.array([0, 1, 2]), [30, 30, 10])
    scale = ClassScale.fit(scores, classes, min_class=20)
    want = []
    for i, (value, predicted) in enumerate(zip(scores, classes, strict=True)):
        members = (classes == predicted) if predicted in (0, 1) else np.ones(70, dtype=bool)
        members &= np.isfinite(scores)
        if math.isfinite(value):
            members[i] = False
        want.append(_brute_p(float(value), list(scores[members])))
    np.testing.assert_allclose(scale.held_out_values(scores, classes), want)


def test_class_scale_refuses_what_it_cannot_fit() -> None:
    with pytest.raises(ValueError):
        ClassScale.fit(np.array([0.1, 0.2]), np.array([0]))
    with pytest.raises(ValueError):
        ClassScale.fit(np.array([np.nan]), np.array([0]))


def test_flag_value_is_the_score_without_a_scale() -> None:
    assert FlagPolicy("ewma", 0.1).flag_value(0.37, 4) == 0.37
    scale = ClassScale.fit(np.array([0.1, 0.2, 0.3, 0.4]), np.array([1, 1, 1, 1]), min_class=1)
    assert FlagPolicy("ewma", 0.1, scale=scale).flag_value(0.25, 1) == pytest.approx(3 / 5)


def test_per_class_values_hold_the_false_flag_rate_for_one_class_clients() -> None:
    """Two classes score differently. Calibrated on one sample, judged on a fresh one: a raw-score
    EWMA flags far more honest clients of the low class than designed, per-class values hold the
    design rate for either class, and a client whose scores fall well below its class's is still
    flagged."""
    rng = np.random.default_rng(11)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        classes = rng.integers(0, 2, n)
        scores = np.where(classes == 0, rng.normal(0.6, 0.1, n), rng.normal(0.35, 0.1, n))
        return np.clip(scores, 0.0, 1.0), classes

    scores, classes = sample(4000)
    rate, horizon = 0.02, 60
    kwargs = {"false_flag_rate": rate, "horizon": horizon, "clients": 20_000, "seed": 2}
    raw = calibrate_policy("ewma", HonestTraffic(scores, 0.1), **kwargs)  # type: ignore[arg-type]
    per_class = calibrate_policy(
        "ewma",
        HonestTraffic(scores, 0.1, classes),
        **kwargs,  # type: ignore[arg-type]
    )
    assert raw.scale is None and per_class.scale is not None
    fresh, fresh_classes = sample(4000)

    def flagged(policy: FlagPolicy, values: np.ndarray) -> float:
        paths = rng.choice(values, size=(5000, horizon))
        extremes = simulate_extremes(
            "ewma", paths, paths < -1.0, policy.min_requests, policy.window, 0.05
        )
        return float(np.mean(extremes < policy.threshold))

    low = fresh[fresh_classes == 1]
    assert flagged(raw, low) > 0.5
    for label in (0, 1):
        own = fresh[fresh_classes == label]
        assert per_class.scale is not None
        values = per_class.scale.values(own, np.full(own.size, label))
        assert 0.005 < flagged(per_class, values) < 0.04
    assert per_class.scale is not None
    lowered = per_class.scale.values(low - 0.15, np.ones(low.size, dtype=np.int64))
    assert flagged(per_class, lowered) > 0.9
