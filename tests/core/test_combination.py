"""Multi-layer score: empirical p-values, Fisher's combination, the manifest's detector rules."""

import math

import numpy as np
import pytest

from app.core.detector import empirical_p_values, fisher_combination
from app.core.manifest import DetectorSpec, LayerSpec, StatisticSpec


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
        name=name,
        input_dim=4,
        processing="none",
        output_dim=4,
        processing_file=f"p_{name}.npz",
        index_file=f"i_{name}.faiss",
        index_type="flat",
        calibration_scores_file=calibration,
    )


def test_manifest_combination_rules():
    DetectorSpec(layers=[_layer("a")], k=5, score_function="dwknn", labels_file="l.npy")
    with pytest.raises(ValueError):
        DetectorSpec(
            layers=[_layer("a"), _layer("b")], k=5, score_function="dwknn", labels_file="l.npy"
        )
    with pytest.raises(ValueError):  # fisher needs per-layer calibration scores
        DetectorSpec(
            layers=[_layer("a"), _layer("b")],
            k=5,
            score_function="dwknn",
            combination="fisher",
            labels_file="l.npy",
        )
    with pytest.raises(ValueError):  # and two layers or more
        DetectorSpec(
            layers=[_layer("a", "c.npy")],
            k=5,
            score_function="dwknn",
            combination="fisher",
            labels_file="l.npy",
        )
    spec = _fisher_spec()
    assert spec.combination == "fisher"


def _fisher_spec() -> DetectorSpec:
    """A format-1 Fisher detector over two layers, each with its calibration scores."""
    return DetectorSpec(
        layers=[_layer("a", "ca.npy"), _layer("b", "cb.npy")],
        k=5,
        score_function="dwknn",
        combination="fisher",
        labels_file="l.npy",
    )


def _v2_layer(name, index=True, density=False):
    return LayerSpec(
        name=name,
        input_dim=4,
        processing="pca_whiten" if index else "none",
        output_dim=4,
        processing_file=f"p_{name}.npz" if index else None,
        index_file=f"i_{name}.faiss" if index else None,
        index_type="flat",
        class_density_file=f"d_{name}.npz" if density else None,
    )


def _v2_spec(layers, statistics, combination="hmp"):
    return DetectorSpec(
        layers=layers,
        k=5,
        score_function="dwknn",
        combination=combination,
        labels_file="l.npy",
        statistics=[StatisticSpec(**s) for s in statistics],
    )


VOTE = {"kind": "vote", "layer": "b"}
MAHA_A = {"kind": "mahalanobis", "layer": "a"}
KNN_B = {"kind": "knn_distance", "layer": "b", "k": 3}


def test_manifest_statistics_rules():
    layers = [_v2_layer("a", index=False, density=True), _v2_layer("b")]
    spec = _v2_spec(layers, [VOTE, MAHA_A, KNN_B])
    assert [(s.kind, s.layer, s.k) for s in spec.statistic_specs()] == [
        ("vote", "b", None),
        ("mahalanobis", "a", None),
        ("knn_distance", "b", 3),
    ]
    assert _v2_spec([_v2_layer("b")], [VOTE], "single").combination == "single"
    with pytest.raises(ValueError, match="class density"):  # mahalanobis where there is none
        _v2_spec([_v2_layer("a"), _v2_layer("b")], [VOTE, MAHA_A])
    with pytest.raises(ValueError, match="index"):  # a vote where there is no index
        _v2_spec(
            [_v2_layer("a", index=False, density=True)], [{"kind": "vote", "layer": "a"}, MAHA_A]
        )
    with pytest.raises(ValueError, match="unknown layer"):
        _v2_spec(layers, [VOTE, {"kind": "mahalanobis", "layer": "c"}])
    with pytest.raises(ValueError, match="k is set"):  # knn_distance needs its k ...
        _v2_spec(layers, [VOTE, {"kind": "knn_distance", "layer": "b"}])
    with pytest.raises(ValueError, match="k is set"):  # ... and only it has one
        _v2_spec(layers, [{"kind": "vote", "layer": "b", "k": 3}, MAHA_A])
    with pytest.raises(ValueError, match="single"):
        _v2_spec(layers, [VOTE, MAHA_A], "single")
    with pytest.raises(ValueError, match="single"):
        _v2_spec(layers, [VOTE], "fisher")
    with pytest.raises(ValueError, match="twice"):
        _v2_spec([*layers, _v2_layer("b")], [VOTE, MAHA_A])
    with pytest.raises(ValueError):
        _v2_spec(layers, [])


def test_format1_specs_read_as_one_vote_per_layer():
    spec = _fisher_spec()
    assert spec.statistics is None
    assert [(s.kind, s.layer, s.k) for s in spec.statistic_specs()] == [
        ("vote", "a", None),
        ("vote", "b", None),
    ]
