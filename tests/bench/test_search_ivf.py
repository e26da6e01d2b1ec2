"""bench.search_ivf on tiny synthetic features: the verdict comparison, recall and the pipeline.

No timing is asserted; the real benchmark (1.28M rows) is run by hand.
"""

from __future__ import annotations

import numpy as np
import pytest

from app.core import search
from app.core.statistics import KnnVote, LayerIndex
from bench.search_ivf import (
    Config,
    RealFeatures,
    ScaledSet,
    Settings,
    benchmark,
    compare_verdicts,
    measure,
    processed_base,
    recall_at_k,
    render_table,
    time_configs,
)


def tiny_features(seed: int = 0) -> RealFeatures:
    """10 classes of non-negative 16-d features; a fifth of the predictions are wrong."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.0, 3.0, (10, 16))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, n)
        rows = np.maximum(centres[labels] + rng.normal(0.0, 0.6, (n, 16)), 0.0)
        return rows.astype(np.float32), labels.astype(np.int64)

    train, train_labels = draw(600)
    queries, query_labels = draw(160)
    predictions = query_labels.copy()
    wrong = rng.random(160) < 0.2
    predictions[wrong] = (predictions[wrong] + 1 + rng.integers(0, 9, int(wrong.sum()))) % 10
    return RealFeatures(train, train_labels, queries, predictions, query_labels, "synthetic")


def test_identical_scores_never_disagree() -> None:
    scores = np.array([0.9, 0.1, 0.5, 0.49])
    result = compare_verdicts(scores, scores.copy(), threshold=0.5)
    assert result.disagreement == 0.0
    assert result.newly_rejected == result.newly_accepted == 0
    assert result.mean_abs_score_difference == result.max_abs_score_difference == 0.0


def test_changed_verdicts_are_counted_both_ways() -> None:
    exact = np.array([0.9, 0.1, 0.5, 0.7])
    approx = np.array([0.9, 0.6, 0.4, 0.8])  # 0.1 -> 0.6 accepted; 0.5 -> 0.4 rejected
    result = compare_verdicts(exact, approx, threshold=0.5)
    assert result.disagreement == pytest.approx(2 / 4)
    assert result.newly_accepted == 1
    assert result.newly_rejected == 1
    assert result.mean_abs_score_difference == pytest.approx((0 + 0.5 + 0.1 + 0.1) / 4)
    assert result.max_abs_score_difference == pytest.approx(0.5)


def test_a_score_at_the_threshold_is_accepted() -> None:
    result = compare_verdicts(np.array([0.5]), np.array([0.5 - 1e-9]), threshold=0.5)
    assert result.disagreement == 1.0 and result.newly_rejected == 1


def test_compare_verdicts_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError):
        compare_verdicts(np.zeros(3), np.zeros(4), 0.5)


def test_recall_counts_shared_neighbours_and_ignores_missing() -> None:
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[4, 3, 2, 1], [5, 9, -1, -1]])
    assert recall_at_k(exact, approx) == pytest.approx((1.0 + 0.25) / 2)


def test_tiles_are_reproducible_and_cover_n_rows() -> None:
    scaled = ScaledSet.make(tiny_features(), n=1500, dim=32, noise=0.15, seed=0)
    first = list(scaled.chunks())
    second = list(scaled.chunks())
    assert [c.shape for c in first] == [(600, 32), (600, 32), (300, 32)]
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not np.array_equal(first[0], first[1])  # tiles differ by their jitter
    assert scaled.labels.shape == (1500,)
    assert np.array_equal(scaled.labels[:600], scaled.labels[600:1200])
    assert (np.concatenate(first) >= 0).all()  # ReLU features


def test_two_flat_indexes_give_identical_verdicts() -> None:
    real = tiny_features()
    scaled = ScaledSet.make(real, n=1200, dim=32, noise=0.15, seed=0)
    processing, base = processed_base(scaled, 32)
    queries = scaled.lift.apply(real.queries)
    measured = []
    for _ in range(2):
        index = search.new_index(processing.output_dim, "flat")
        search.add_vectors(index, [base])
        detector = KnnVote(LayerIndex("layer3", processing, index), scaled.labels, 50, "dwknn")
        config = Config("flat", detector)
        measured.append(measure(config, queries, real.query_predictions, 16, 40))
    assert np.array_equal(measured[0].scores, measured[1].scores)
    result = compare_verdicts(
        measured[0].scores, measured[1].scores, float(np.median(measured[0].scores))
    )
    assert result.disagreement == 0.0
    assert recall_at_k(measured[0].ids, measured[1].ids) == 1.0
    # the scores are the detector's own, batch by batch
    expected = detector.values({"layer3": queries}, real.query_predictions)
    np.testing.assert_allclose(measured[1].scores, expected, rtol=1e-5)


def test_timing_visits_every_config_in_every_round() -> None:
    real = tiny_features()
    scaled = ScaledSet.make(real, n=1200, dim=32, noise=0.15, seed=0)
    processing, base = processed_base(scaled, 32)
    flat = search.new_index(processing.output_dim, "flat")
    search.add_vectors(flat, [base])
    sample = base[:256]
    ivf = search.new_index(processing.output_dim, "ivf", 4, sample)
    search.add_vectors(ivf, [base])
    layer = LayerIndex("layer3", processing, ivf)
    configs = [
        Config("flat", KnnVote(LayerIndex("layer3", processing, flat), scaled.labels, 20, "dwknn")),
        Config("ivf4,nprobe=1", KnnVote(layer, scaled.labels, 20, "dwknn"), 4, 1),
        Config("ivf4,nprobe=4", KnnVote(layer, scaled.labels, 20, "dwknn"), 4, 4),
    ]
    queries = scaled.lift.apply(real.queries)
    seconds = time_configs(configs, queries, real.query_predictions, 16, 3, 2)
    assert {name: len(s) for name, s in seconds.items()} == {c.name: 6 for c in configs}
    assert all(t > 0 for s in seconds.values() for t in s)
    assert ivf.nprobe in (1, 4)  # activate() set it for the config it timed
    with pytest.raises(ValueError):
        time_configs(configs, queries[:8], real.query_predictions[:8], 16, 1, 1)


def test_benchmark_rows_and_recommendation() -> None:
    settings = Settings(
        n=1500, dim=32, k=50, nlists=(8,), nprobes=(1, 8, 16), batch=16, recall_queries=40
    )
    logged: list[str] = []
    results = benchmark(tiny_features(), settings, logged.append)
    rows = {r["config"]: r for r in results["rows"]}
    assert list(rows) == ["flat", "ivf8,nprobe=1", "ivf8,nprobe=8"]  # nprobe > nlist skipped
    flat = rows["flat"]
    assert flat["disagreement"] == 0.0 and flat["recall_at_50"] == 1.0
    assert flat["speedup_vs_flat"] == pytest.approx(1.0)
    exhaustive = rows["ivf8,nprobe=8"]  # every list probed: the exact neighbours
    assert exhaustive["recall_at_50"] == pytest.approx(1.0)
    assert exhaustive["mean_abs_score_difference"] < 1e-5
    assert exhaustive["disagreement"] <= 1 / 160  # at most the query sitting on the threshold
    assert rows["ivf8,nprobe=1"]["recall_at_50"] < 1.0
    assert set(flat["disagreement_by_retention"]) == {"0.90", "0.95", "0.98", "0.99"}
    threshold = results["threshold"]
    assert threshold == results["thresholds"]["0.98"]
    eligible = [r for r in results["rows"][1:] if r["disagreement"] <= 0.005]
    if eligible:
        best = min(eligible, key=lambda r: r["ms_per_query_median"])
        assert results["recommended"] == best["config"]
    else:
        assert results["recommended"] is None
    table = render_table(results)
    assert "| flat |" in table and "Recommended default" in table
    assert results["data"]["indexed"] == 1500 and results["data"]["queries"] == 160


def test_recommendation_is_flat_when_no_ivf_config_qualifies() -> None:
    settings = Settings(
        n=1500,
        dim=32,
        k=50,
        nlists=(8,),
        nprobes=(1,),
        batch=16,
        recall_queries=40,
        max_disagreement=-1.0,
    )
    results = benchmark(tiny_features(), settings, lambda _: None)
    assert results["recommended"] is None
    assert "Recommended default: exact flat" in render_table(results)
