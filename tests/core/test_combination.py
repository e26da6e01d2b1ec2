"""Multi-layer score: empirical p-values and Fisher's combination."""

import math

import numpy as np
import pytest

from app.core.detector import empirical_p_values, fisher_combination
from app.core.manifest import DetectorSpec, LayerSpec


def test_p_values_rank_against_calibration():
    calibration = np.array([0.1, 0.2, 0.3, 0.4])
    p = empirical_p_values(np.array([0.0, 0.2, 0.35, 1.0]), calibration)
    np.testing.assert_allclose(p, [1 / 5, 3 / 5, 4 / 5, 1.0])


def test_fisher_matches_chi2_survival_function():
    p = np.array([[0.5, 0.2], [1.0, 1.0], [0.01, 0.03], [1e-320, 0.5]])
    t = -2 * np.log(np.clip(p, 1e-300, 1)).sum(axis=1)
    # chi2 with 4 degrees of freedom: sf(t) = exp(-t/2) (1 + t/2)
    expected = np.exp(-t / 2) * (1 + t / 2)
    np.testing.assert_allclose(fisher_combination(p), expected, rtol=1e-12)
    assert fisher_combination(p)[1] == pytest.approx(1.0)


def test_fisher_is_monotone_in_each_layer():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 1, size=(100, 3))
    lower = p.copy()
    lower[:, 1] *= 0.5
    assert (fisher_combination(lower) < fisher_combination(p)).all()
    single = fisher_combination(np.array([[0.3]]))
    assert single[0] == pytest.approx(0.3)
    assert math.isfinite(float(fisher_combination(np.zeros((1, 3)))[0]))


def _layer(name, calibration=None):
    return LayerSpec(
        name=name, input_dim=4, processing="none", output_dim=4,
        processing_file=f"p_{name}.npz", index_file=f"i_{name}.faiss", index_type="flat",
        calibration_scores_file=calibration,
    )


def test_manifest_combination_rules():
    DetectorSpec(layers=[_layer("a")], k=5, score_function="dwknn", labels_file="l.npy")
    with pytest.raises(ValueError):
        DetectorSpec(layers=[_layer("a"), _layer("b")], k=5, score_function="dwknn",
                     labels_file="l.npy")
    with pytest.raises(ValueError):  # fisher needs per-layer calibration scores
        DetectorSpec(layers=[_layer("a"), _layer("b")], k=5, score_function="dwknn",
                     combination="fisher", labels_file="l.npy")
    with pytest.raises(ValueError):  # and two layers or more
        DetectorSpec(layers=[_layer("a", "c.npy")], k=5, score_function="dwknn",
                     combination="fisher", labels_file="l.npy")
    spec = DetectorSpec(layers=[_layer("a", "ca.npy"), _layer("b", "cb.npy")], k=5,
                        score_function="dwknn", combination="fisher", labels_file="l.npy")
    assert spec.combination == "fisher"
