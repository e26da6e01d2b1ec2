"""The detector's p-value combinations against closed forms, and its calibration on fresh data."""

from dataclasses import dataclass

import numpy as np
import pytest
from scipy import stats

from app.core.calibration import threshold_for_retention
from app.core.detector import (
    Detector,
    combine_p_values,
    empirical_p_values,
    fisher_combination,
    harmonic_mean_p,
    tippett_combination,
)


@dataclass(frozen=True)
class Column:
    """A stand-in statistic: one column of a layer's "features" (higher = more authentic)."""

    layer_name: str
    column: int
    kind: str = "vote"

    def values(self, features, classes):
        assert classes.shape == (features[self.layer_name].shape[0],)
        return features[self.layer_name][:, self.column]


def _p_values(seed: int, n: int = 200, layers: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).uniform(1e-6, 1.0, (n, layers))


@pytest.mark.parametrize("layers", [1, 2, 3, 7])
def test_fisher_equals_scipy_for_independent_p_values(layers):
    p = _p_values(0, layers=layers)
    expected = stats.combine_pvalues(p, method="fisher", axis=1).pvalue
    np.testing.assert_allclose(fisher_combination(p), expected, rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(combine_p_values(p, "fisher"), expected, rtol=1e-10)


def test_fisher_of_independent_uniform_p_values_is_uniform():
    """Under its own assumption (independent uniform p-values) Fisher's p is uniform."""
    combined = fisher_combination(np.random.default_rng(1).uniform(size=(20_000, 3)))
    assert stats.kstest(combined, "uniform").pvalue > 0.001
    assert abs(float((combined <= 0.05).mean()) - 0.05) < 0.006


@pytest.mark.parametrize("layers", [1, 2, 5])
def test_harmonic_mean_p_is_l_over_the_sum_of_reciprocals(layers):
    p = _p_values(2, layers=layers)
    expected = np.array([layers / sum(1.0 / v for v in row) for row in p])
    np.testing.assert_allclose(harmonic_mean_p(p), expected, rtol=1e-12)
    np.testing.assert_allclose(combine_p_values(p, "hmp"), expected, rtol=1e-12)
    # it lies between the smallest p and the arithmetic mean
    assert (harmonic_mean_p(p) >= p.min(axis=1) - 1e-15).all()
    assert (harmonic_mean_p(p) <= p.mean(axis=1) + 1e-15).all()


@pytest.mark.parametrize("layers", [1, 2, 6])
def test_tippett_equals_the_closed_form_and_scipy(layers):
    p = _p_values(3, layers=layers)
    closed = 1.0 - (1.0 - p.min(axis=1)) ** layers
    np.testing.assert_allclose(tippett_combination(p), closed, rtol=1e-10)
    scipy_p = stats.combine_pvalues(p, method="tippett", axis=1).pvalue
    np.testing.assert_allclose(tippett_combination(p), scipy_p, rtol=1e-10)
    np.testing.assert_allclose(combine_p_values(p, "min_p"), closed, rtol=1e-10)
    # tiny minima keep their precision (expm1/log1p): about L * min p
    tiny = np.full((1, layers), 0.5)
    tiny[0, 0] = 1e-17
    assert tippett_combination(tiny)[0] == pytest.approx(layers * 1e-17, rel=1e-9)


def test_lowering_any_p_value_lowers_every_combination():
    p = _p_values(4, n=300, layers=3)
    for column in range(3):
        lower = p.copy()
        lower[:, column] *= 0.5
        assert (fisher_combination(lower) < fisher_combination(p)).all()
        assert (harmonic_mean_p(lower) < harmonic_mean_p(p)).all()
        # Tippett reads the minimum only: never higher, strictly lower where it is the minimum
        tippett, before = tippett_combination(lower), tippett_combination(p)
        assert (tippett <= before).all()
        is_min = p.argmin(axis=1) == column
        assert is_min.any() and (tippett[is_min] < before[is_min]).all()
    for combination in ("fisher", "hmp", "min_p"):
        values = combine_p_values(p, combination)
        assert ((values > 0) & (values <= 1)).all()
        assert combine_p_values(np.ones((1, 3)), combination)[0] == pytest.approx(1.0)


def test_single_is_not_a_p_value_combination():
    with pytest.raises(ValueError):
        combine_p_values(_p_values(0), "single")


def test_empirical_p_values_exact_on_a_tiny_example():
    reference = np.array([0.3, 0.1, 0.2, 0.2])  # unsorted, with a tie
    values = np.array([0.05, 0.1, 0.2, 0.25, 0.3, 0.9])
    # p = (1 + #{reference <= value}) / (1 + 4)
    expected = np.array([1, 2, 4, 4, 5, 5]) / 5
    np.testing.assert_array_equal(empirical_p_values(values, reference), expected)
    assert empirical_p_values(np.array([-np.inf]), reference)[0] == 1 / 5  # never 0


def test_a_statistic_that_is_not_finite_gets_the_smallest_p_value():
    """NaN and +inf (an overflow) sort above every reference value: they must not read as the
    most authentic values there are."""
    reference = np.array([0.3, 0.1, 0.2, 0.2])
    values = np.array([np.nan, np.inf, -np.inf, 0.25])
    np.testing.assert_array_equal(empirical_p_values(values, reference), [0.2, 0.2, 0.2, 0.8])
    detector = Detector(STATISTICS, "fisher", np.random.default_rng(8).normal(size=(50, 3)))
    unmeasured = np.full((2, 3), np.nan)
    unmeasured[1, 1] = np.inf
    scores = detector.score(_features(unmeasured), np.zeros(2, dtype=np.int64))
    np.testing.assert_allclose(scores, fisher_combination(np.full((2, 3), 1 / 51)), rtol=1e-12)


def _features(values: np.ndarray) -> dict[str, np.ndarray]:
    return {"a": values[:, :2], "b": values[:, 2:]}


STATISTICS = [Column("a", 0), Column("a", 1), Column("b", 0)]


def test_detector_scores_are_the_combination_of_empirical_p_values():
    rng = np.random.default_rng(5)
    reference = rng.normal(size=(50, 3))
    detector = Detector(STATISTICS, "hmp", reference)
    assert detector.names == ["vote@a", "vote@a", "vote@b"]
    assert detector.layers == ["a", "b"]
    queries = rng.normal(size=(20, 3))
    classes = np.zeros(20, dtype=np.int64)
    evidence = detector.evidence(_features(queries), classes)
    np.testing.assert_array_equal(evidence.values, queries)
    expected_p = np.stack(
        [empirical_p_values(queries[:, i], reference[:, i]) for i in range(3)], axis=1
    )
    assert evidence.p_values is not None
    np.testing.assert_array_equal(evidence.p_values, expected_p)
    np.testing.assert_allclose(evidence.scores, harmonic_mean_p(expected_p), rtol=1e-12)
    np.testing.assert_array_equal(detector.score(_features(queries), classes), evidence.scores)
    # ablation: the first and last statistics, Fisher-combined, against the same reference rows
    pair = detector.subset([0, 2], "fisher")
    np.testing.assert_allclose(
        pair.combine(queries[:, [0, 2]]), fisher_combination(expected_p[:, [0, 2]]), rtol=1e-12
    )
    alone = detector.subset([1])
    assert alone.combination == "single" and alone.reference is None
    np.testing.assert_array_equal(alone.combine(queries[:, [1]]), queries[:, 1])


def test_single_detector_score_is_the_raw_statistic():
    detector = Detector([Column("a", 1)])
    values = np.random.default_rng(6).normal(size=(10, 3))
    evidence = detector.evidence(_features(values), np.zeros(10, dtype=np.int64))
    assert evidence.p_values is None
    np.testing.assert_array_equal(evidence.scores, values[:, 1])


def test_detector_construction_rules():
    reference = np.zeros((5, 3))
    with pytest.raises(ValueError):
        Detector([])
    with pytest.raises(ValueError):
        Detector(STATISTICS)  # single takes one statistic
    with pytest.raises(ValueError):
        Detector(STATISTICS, "fisher")  # a combination needs a reference
    with pytest.raises(ValueError):
        Detector(STATISTICS, "fisher", reference[:, :2])  # one column per statistic
    with pytest.raises(ValueError):
        Detector(STATISTICS, "fisher", np.zeros((0, 3)))
    with pytest.raises(ValueError):
        Detector(STATISTICS, "mean", reference)  # type: ignore[arg-type]


def _authentic(rng: np.random.Generator, n: int) -> np.ndarray:
    """Correlated Gaussian statistics of authentic images (layers of one network correlate)."""
    covariance = np.array([[1.0, 0.6, 0.3], [0.6, 1.0, 0.5], [0.3, 0.5, 1.0]])
    means = np.array([0.0, 2.0, -1.0])
    return rng.multivariate_normal(means, covariance, size=n)


@pytest.mark.parametrize("combination", ["fisher", "hmp", "min_p"])
def test_calibration_holds_its_retention_on_a_fresh_split(combination):
    """Reference part -> p-values; a separate threshold part -> the threshold keeping 98%; a
    fresh sample of the same authentic distribution keeps 98% too, up to sampling error.

    The threshold is an order statistic of the m threshold-part scores: the share of fresh
    scores at or above it has mean 1 - (floor(0.02 m) + 1) / (m + 1) (slightly under 0.98) and
    standard error about sqrt(0.98 * 0.02 / m). Several independent splits are checked one by
    one at 4 standard errors and on average at 3 standard errors of their mean.
    """
    rng = np.random.default_rng(7)
    retention, m, splits = 0.98, 4000, 5
    fresh = _authentic(rng, 200_000)
    classes = np.zeros(fresh.shape[0], dtype=np.int64)
    order_bias = 1.0 / (m + 1)
    error = np.sqrt(retention * (1 - retention) / m)
    kept = []
    for _ in range(splits):
        reference, threshold_part = _authentic(rng, 1000), _authentic(rng, m)
        detector = Detector(STATISTICS, combination, reference)
        threshold = threshold_for_retention(detector.combine(threshold_part), retention)
        assert (detector.combine(threshold_part) >= threshold).mean() >= retention
        kept.append(float((detector.score(_features(fresh), classes) >= threshold).mean()))
        assert retention - order_bias - 4 * error <= kept[-1] <= retention + 4 * error, kept
    mean = float(np.mean(kept))
    assert mean >= retention - order_bias - 3 * error / np.sqrt(splits), kept
    # and not far above it: ties at the threshold (discrete p-values) only add a little
    assert mean <= retention + 3 * error / np.sqrt(splits) + 2 / 1000, kept
