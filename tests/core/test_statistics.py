"""Each statistic of app.core.statistics against a brute-force numpy reference."""

from itertools import pairwise

import numpy as np
import pytest

from app.core import search
from app.core.guard import make_statistics
from app.core.manifest import StatisticSpec
from app.core.processing import fit_processing
from app.core.statistics import (
    ClassDensity,
    ClassKnnDistance,
    KnnVote,
    LayerIndex,
    Mahalanobis,
    Margin,
    fit_class_density,
    statistic_name,
)

CLASSES = 4
DIM = 6


def _draw(rng: np.random.Generator, n: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    """(n, DIM) rows of CLASSES shifted, correlated Gaussian clusters (fixed), and their labels."""
    shape = np.random.default_rng(100)
    centres = shape.normal(0.0, 3.0, (CLASSES, DIM))
    mixing = shape.normal(0.0, 1.0, (DIM, DIM))
    labels = rng.integers(0, CLASSES, n).astype(np.int64)
    return centres[labels] + spread * rng.normal(0.0, 1.0, (n, DIM)) @ mixing, labels


def _training(seed: int = 0, n: int = 240) -> tuple[np.ndarray, np.ndarray]:
    return _draw(np.random.default_rng(seed), n, 1.0)


def _queries(seed: int = 1, n: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Wider draws from the same clusters, each with a random "predicted" class."""
    rng = np.random.default_rng(seed)
    rows, _ = _draw(rng, n, 1.5)
    return rows, rng.integers(0, CLASSES, n).astype(np.int64)


def _brute_tied_covariance(rows: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """Class means and sum_c n_c cov_c / N with np.cov per class (biased: divides by n_c)."""
    means = np.stack([rows[labels == c].mean(axis=0) for c in range(CLASSES)])
    total = np.zeros((DIM, DIM))
    for c in range(CLASSES):
        members = rows[labels == c]
        total += members.shape[0] * np.cov(members, rowvar=False, bias=True)
    return means, total / rows.shape[0]


def _brute_mahalanobis(
    queries: np.ndarray, classes: np.ndarray, means: np.ndarray, precision: np.ndarray
) -> np.ndarray:
    out = np.empty(queries.shape[0])
    for i, (x, c) in enumerate(zip(queries, classes, strict=True)):
        delta = x - means[c]
        out[i] = delta @ precision @ delta
    return out


def test_mahalanobis_matches_brute_force():
    rows, labels = _training()
    queries, classes = _queries()
    means, covariance = _brute_tied_covariance(rows, labels)
    expected = _brute_mahalanobis(queries, classes, means, np.linalg.inv(covariance))
    density = fit_class_density([(rows, labels)], CLASSES, DIM)
    np.testing.assert_allclose(density.means, means, rtol=1e-10, atol=1e-12)
    values = Mahalanobis("layer", density).values({"layer": queries}, classes)
    assert values.shape == (50,) and values.dtype == np.float64
    np.testing.assert_allclose(values, -expected, rtol=1e-8)
    assert (values < 0).all()


def test_mahalanobis_on_rank_deficient_features_matches_the_pseudo_inverse():
    """Features spanning 4 of 6 dimensions: the floored whitener ignores the null directions,
    as the pseudo-inverse does, for queries in the features' span."""
    rng = np.random.default_rng(3)
    basis = rng.normal(size=(4, DIM))
    labels = rng.integers(0, CLASSES, 300).astype(np.int64)
    codes = rng.normal(0.0, 2.0, (CLASSES, 4))[labels] + rng.normal(size=(300, 4))
    rows = codes @ basis
    queries = rng.normal(0.0, 2.0, (40, 4)) @ basis
    classes = rng.integers(0, CLASSES, 40).astype(np.int64)
    means, covariance = _brute_tied_covariance(rows, labels)
    assert np.linalg.matrix_rank(covariance) == 4
    precision = np.linalg.pinv(covariance, rcond=1e-10, hermitian=True)
    expected = _brute_mahalanobis(queries, classes, means, precision)
    values = Mahalanobis("l", fit_class_density([(rows, labels)], CLASSES, DIM)).values(
        {"l": queries}, classes
    )
    np.testing.assert_allclose(values, -expected, rtol=1e-6)


def test_class_density_streamed_over_chunks_equals_one_shot_fit(tmp_path):
    rows, labels = _training(n=300)
    once = fit_class_density([(rows, labels)], CLASSES, DIM)
    bounds = [0, 7, 8, 90, 91, 200, 300]  # uneven chunks, some without every class
    chunks = [(rows[a:b], labels[a:b]) for a, b in pairwise(bounds)]
    assert any(len(np.unique(chunk_labels)) < CLASSES for _, chunk_labels in chunks)
    streamed = fit_class_density(iter(chunks), CLASSES, DIM)
    np.testing.assert_allclose(streamed.means, once.means, rtol=1e-12, atol=1e-12)
    # the whitener is unique up to a rotation: compare the precision it stands for
    np.testing.assert_allclose(
        streamed.whitener @ streamed.whitener.T, once.whitener @ once.whitener.T, rtol=1e-8
    )
    queries, classes = _queries()
    np.testing.assert_allclose(
        streamed.squared_distances(queries, classes),
        once.squared_distances(queries, classes),
        rtol=1e-9,
    )
    # and it survives the bundle's file format
    once.save(tmp_path / "density.npz")
    loaded = ClassDensity.load(tmp_path / "density.npz")
    np.testing.assert_array_equal(loaded.means, once.means)
    np.testing.assert_array_equal(loaded.whitener, once.whitener)


def test_class_density_refuses_a_class_without_features():
    rows, labels = _training()
    labels = np.where(labels == 2, 1, labels)
    with pytest.raises(ValueError, match="without training features"):
        fit_class_density([(rows, labels)], CLASSES, DIM)


def _indexed_layer(rows: np.ndarray, name: str = "layer") -> LayerIndex:
    processing = fit_processing("pca_whiten", [rows], rows.shape[1])
    index = search.new_index(processing.output_dim, "flat")
    search.add_vectors(index, [processing.apply(rows)])
    return LayerIndex(name, processing, index)


def _brute_kth(processed_rows, labels, processed_queries, classes, k) -> np.ndarray:
    out = np.empty(processed_queries.shape[0])
    for i, (q, c) in enumerate(zip(processed_queries, classes, strict=True)):
        members = processed_rows[labels == c].astype(np.float64)
        distances = np.sort(((members - q.astype(np.float64)) ** 2).sum(axis=1))
        out[i] = distances[min(k, distances.size) - 1]
    return out


def test_class_knn_distance_matches_brute_force():
    rows, labels = _training()
    queries, classes = _queries()
    assert len(np.unique(classes)) == CLASSES  # one batch mixes every predicted class
    layer = _indexed_layer(rows)
    k = 5
    # the construction the builder and the service share (from the index's stored vectors)
    (statistic,) = make_statistics(
        [StatisticSpec(kind="knn_distance", layer="layer", k=k)],
        lambda name: layer,
        lambda name: pytest.fail("no class density is needed"),
        labels,
        k=50,
        score_function="dwknn",
        num_classes=CLASSES,
    )
    assert isinstance(statistic, ClassKnnDistance)
    assert statistic_name(statistic) == "knn_distance5@layer"
    expected = _brute_kth(
        layer.processing.apply(rows), labels, layer.processing.apply(queries), classes, k
    )
    values = statistic.values({"layer": queries}, classes)
    np.testing.assert_allclose(values, -expected, rtol=1e-4, atol=1e-4)
    # a shuffled batch gives each query the same value: the grouping by class is only internal
    order = np.random.default_rng(0).permutation(classes.size)
    np.testing.assert_allclose(
        statistic.values({"layer": queries[order]}, classes[order]), values[order], rtol=1e-6
    )


def test_class_knn_distance_with_fewer_vectors_than_k_takes_the_farthest():
    rows, labels = _training()
    keep = (labels != 3) | (np.cumsum(labels == 3) <= 3)  # class 3 keeps 3 vectors
    rows, labels = rows[keep], labels[keep]
    assert (labels == 3).sum() == 3
    queries, classes = _queries()
    layer = _indexed_layer(rows)
    processed = layer.processing.apply(rows)
    indexes = search.ClassIndexes.from_vectors(processed, labels, CLASSES)
    statistic = ClassKnnDistance(layer, indexes, k=8)
    expected = _brute_kth(processed, labels, layer.processing.apply(queries), classes, 8)
    values = statistic.values({"layer": queries}, classes)
    np.testing.assert_allclose(values, -expected, rtol=1e-4, atol=1e-4)
    # for class 3 (3 vectors), the 8th neighbour is the farthest of the three
    in_three = classes == 3
    assert in_three.any()
    farthest = np.array(
        [
            ((processed[labels == 3] - q) ** 2).sum(axis=1).max()
            for q in layer.processing.apply(queries[in_three])
        ]
    )
    np.testing.assert_allclose(values[in_three], -farthest, rtol=1e-4, atol=1e-4)


def _brute_vote(processed_rows, labels, processed_queries, classes, k, function) -> np.ndarray:
    out = np.empty(processed_queries.shape[0])
    for i, (q, c) in enumerate(zip(processed_queries, classes, strict=True)):
        distances = ((processed_rows.astype(np.float64) - q) ** 2).sum(axis=1)
        nearest = np.argsort(distances)[:k]
        if function == "dwknn":
            weights = 1.0 / distances[nearest]
        elif function == "wknn":
            weights = 1.0 / np.arange(1, k + 1)
        else:
            weights = np.ones(k)
        out[i] = weights[labels[nearest] == c].sum() / weights.sum()
    return out


@pytest.mark.parametrize("function", ["dwknn", "wknn", "knn"])
def test_knn_vote_matches_a_brute_force_vote(function):
    rows, labels = _training()
    queries, classes = _queries()
    layer = _indexed_layer(rows)
    k = 25
    vote = KnnVote(layer, labels, k, "dwknn")
    expected = _brute_vote(
        layer.processing.apply(rows).astype(np.float64),
        labels,
        layer.processing.apply(queries).astype(np.float64),
        classes,
        k,
        function,
    )
    override = None if function == "dwknn" else function
    values = vote.values({"layer": queries, "other": np.zeros((50, 3))}, classes, override)
    assert values.shape == (50,) and ((values >= 0) & (values <= 1)).all()
    np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-6)
    assert 0.05 < float(values.mean()) < 0.95  # neither degenerate all-in nor all-out


def _brute_margins(logits: np.ndarray, classes: np.ndarray) -> np.ndarray:
    out = []
    for row, c in zip(logits.tolist(), classes.tolist(), strict=True):
        out.append(row[c] - max(v for j, v in enumerate(row) if j != c))
    return np.array(out)


def test_margin_matches_brute_force():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(40, 10)).astype(np.float32)
    logits[3] = 2.0  # ties: the margin of any class is 0
    predicted = logits.argmax(axis=1)
    other = (predicted + 1 + rng.integers(0, 9, size=40)) % 10
    statistic = Margin("linear")
    for classes in (predicted, other):
        values = statistic.values({"linear": logits}, classes)
        np.testing.assert_allclose(values, _brute_margins(logits, classes), rtol=1e-12)
    assert (statistic.values({"linear": logits}, predicted) >= 0).all()
    assert (statistic.values({"linear": logits}, other) <= 0).all()
    assert statistic_name(statistic) == "margin@linear"


def test_margin_refuses_a_layer_that_is_not_logits():
    with pytest.raises(ValueError, match="does not output logits"):
        Margin("layer3.2").values({"layer3.2": np.zeros((2, 1))}, np.zeros(2, dtype=np.int64))


def test_margin_spec_needs_no_fitted_file():
    (statistic,) = make_statistics(
        [StatisticSpec(kind="margin", layer="linear")],
        lambda name: pytest.fail(f"margin read the index of {name}"),
        lambda name: pytest.fail(f"margin read the class density of {name}"),
        np.zeros(0, dtype=np.int64),
        k=5,
        score_function="dwknn",
        num_classes=10,
    )
    assert isinstance(statistic, Margin)
