"""``suspect_margin``: the JPEG margin read only for the queries the detector's other statistics
doubt (selection round 13), against brute-force numpy; and the network's JPEG pass run for those
queries alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.core.detector import Detector, harmonic_mean_p
from app.core.features import JPEG_LOGITS, FeatureNetwork, infer_batch
from app.core.models import PRESETS, build_model
from app.core.statistics import DOUBTED_SHARE, NOT_DOUBTED, Margin, SuspectMargin

FIRST, OTHER = "linear", "other.logits"


def _statistics() -> list[Margin | SuspectMargin]:
    return [Margin(FIRST), Margin(OTHER), SuspectMargin(JPEG_LOGITS)]


def _features(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {
        layer: rng.normal(0.0, 2.0, size=(n, 5)).astype(np.float32)
        for layer in (FIRST, OTHER, JPEG_LOGITS)
    }


def _made(seed: int, references: int, queries: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Random logits: the reference rows' statistics (the three of ``_statistics``, in order,
    each of its own logits' top class) and the queries' features."""
    rng = np.random.default_rng(seed)
    reference_features, query_features = _features(rng, references), _features(rng, queries)
    classes = reference_features[FIRST].argmax(axis=1)
    reference = np.stack([s.values(reference_features, classes) for s in _statistics()], 1)
    return reference, query_features


def _margin(row: np.ndarray, c: int) -> float:
    return float(row[c]) - max(float(v) for j, v in enumerate(row) if j != c)


def _brute_p(value: float, reference: list[float]) -> float:
    if not np.isfinite(value):
        return 1.0 / (1 + len(reference))
    return (1 + sum(r <= value for r in reference)) / (1 + len(reference))


def _brute_scores(
    reference: np.ndarray, values: np.ndarray, plain: list[int], suspect: int
) -> tuple[float, np.ndarray, np.ndarray]:
    """The gate, each query's suspicion and its harmonic-mean score, by loops: the plain
    statistics' p-values against the reference, their harmonic mean, the gate at the reference
    rows' ``DOUBTED_SHARE`` quantile of it, the suspect column gated likewise in the reference
    and read only for suspect queries."""

    def first_stage(row: np.ndarray) -> float:
        p = [_brute_p(float(row[i]), list(reference[:, i])) for i in plain]
        return len(p) / sum(1.0 / x for x in p)

    reference_first = [first_stage(row) for row in reference]
    gate = float(np.quantile(reference_first, DOUBTED_SHARE))
    gated = [
        float(row[suspect]) if f < gate else NOT_DOUBTED
        for row, f in zip(reference, reference_first, strict=True)
    ]
    suspects, scores = [], []
    for row in values:
        p = [_brute_p(float(row[i]), list(reference[:, i])) for i in plain]
        is_suspect = len(p) / sum(1.0 / x for x in p) < gate
        p.append(_brute_p(float(row[suspect]), gated) if is_suspect else 1.0)
        suspects.append(is_suspect)
        scores.append(len(p) / sum(1.0 / x for x in p))
    return gate, np.array(suspects), np.array(scores)


def test_the_suspect_margin_is_read_only_below_the_other_statistics_gate() -> None:
    """The gate, the suspects, every p-value and the score against loops; the others' p-value
    for the suspect margin is 1 whatever their JPEG logits hold, and the evidence shows them as
    not read."""
    reference, query_features = _made(3, 300, 200)
    detector = Detector(_statistics(), "hmp", reference)
    classes = query_features[FIRST].argmax(axis=1)
    values = detector.values(query_features, classes)
    for i, row in enumerate(query_features[JPEG_LOGITS]):  # plain margins, ungated
        assert values[i, 2] == pytest.approx(_margin(row.astype(np.float64), int(classes[i])))
    gate, suspects, scores = _brute_scores(reference, values, [0, 1], 2)
    assert detector.suspect_gate == pytest.approx(gate)
    np.testing.assert_array_equal(detector.suspects(values), suspects)
    assert 0.1 < suspects.mean() < 0.4  # both kinds of query are there
    np.testing.assert_allclose(detector.combine(values), scores, rtol=1e-12)
    p_values = detector.p_values(values)
    assert (p_values[~suspects, 2] == 1.0).all() and (p_values[suspects, 2] < 1.0).any()
    np.testing.assert_allclose(harmonic_mean_p(p_values), scores, rtol=1e-12)
    evidence = detector.evidence(query_features, classes)
    assert (evidence.values[~suspects, 2] == NOT_DOUBTED).all()
    np.testing.assert_array_equal(evidence.values[suspects, 2], values[suspects, 2])
    np.testing.assert_allclose(evidence.scores, scores, rtol=1e-12)


def test_a_query_the_gate_does_not_read_scores_at_least_the_closed_form_floor() -> None:
    """k plain statistics combining to at least the gate g, and a p-value of 1 for the unread
    margin: the harmonic mean of the k + 1 is at least (k + 1) / (k / g + 1), reached when the
    k combine to g exactly. A bundle whose threshold lies below that floor accepts every query
    its gate lets by (``evaluation.gate_reach``)."""
    reference, query_features = _made(5, 300, 400)
    detector = Detector(_statistics(), "hmp", reference)
    classes = query_features[FIRST].argmax(axis=1)
    values = detector.values(query_features, classes)
    unread = ~detector.suspects(values)
    assert detector.suspect_gate is not None and unread.any()
    k, gate = len(detector.plain_columns), detector.suspect_gate
    floor = (k + 1) / (k / gate + 1)
    scores = detector.combine(values)
    assert (scores[unread] >= floor * (1 - 1e-12)).all()
    # the floor is tight: the closest unread query to the gate scores within a hair of it
    plain = harmonic_mean_p(detector.p_values(values)[:, detector.plain_columns])
    nearest = np.argmin(np.where(unread, plain, np.inf))
    assert scores[nearest] == pytest.approx((k + 1) / (k / plain[nearest] + 1))


def test_a_subset_fits_its_own_gate() -> None:
    """A candidate made of some of the statistics (the selection's views of one bundle) gates
    on its own other statistics, as a bundle built with just them would."""
    reference, query_features = _made(4, 250, 150)
    statistics = _statistics()
    whole = Detector(statistics, "hmp", reference)
    part = whole.subset([1, 2])
    alone = Detector(statistics[1:], "hmp", reference[:, 1:])
    query_classes = query_features[FIRST].argmax(axis=1)
    values = whole.values(query_features, query_classes)
    assert part.suspect_gate == alone.suspect_gate != whole.suspect_gate
    np.testing.assert_array_equal(part.combine(values[:, 1:]), alone.combine(values[:, 1:]))
    _, _, scores = _brute_scores(reference[:, 1:], values[:, 1:], [0], 1)
    np.testing.assert_allclose(part.combine(values[:, 1:]), scores, rtol=1e-12)


def test_a_deferred_layer_is_computed_for_the_suspects_alone() -> None:
    """Without the JPEG logits, the detector asks for them once, for exactly its suspects, and
    scores as it does with every row's; without a way to compute them it refuses."""
    reference, query_features = _made(5, 200, 120)
    detector = Detector(_statistics(), "hmp", reference)
    assert detector.deferred_layers == [JPEG_LOGITS]
    query_classes = query_features[FIRST].argmax(axis=1)
    everything = detector.score(query_features, query_classes)
    suspects = detector.suspects(detector.values(query_features, query_classes))
    asked: list[np.ndarray] = []

    def look_again(rows: np.ndarray) -> dict[str, np.ndarray]:
        asked.append(rows)
        jpeg = np.full_like(query_features[JPEG_LOGITS], np.nan)
        jpeg[rows] = query_features[JPEG_LOGITS][rows]
        return {JPEG_LOGITS: jpeg}

    without = {k: v for k, v in query_features.items() if k != JPEG_LOGITS}
    np.testing.assert_array_equal(detector.score(without, query_classes, look_again), everything)
    assert len(asked) == 1
    np.testing.assert_array_equal(asked[0], suspects)
    with pytest.raises(ValueError, match=r"jpeg\.logits"):
        detector.score(without, query_classes)


def test_a_suspect_margin_needs_other_statistics_and_a_combination() -> None:
    reference = np.zeros((10, 1))
    with pytest.raises(ValueError, match="suspect_margin"):
        Detector([SuspectMargin(JPEG_LOGITS)], "hmp", reference)
    with pytest.raises(ValueError, match="suspect_margin"):
        Detector([SuspectMargin(JPEG_LOGITS)])
    # a statistic read by another kind is not deferred: the network computes it for everyone
    both = Detector(
        [Margin(FIRST), Margin(JPEG_LOGITS), SuspectMargin(JPEG_LOGITS)], "hmp", np.zeros((10, 3))
    )
    assert both.deferred_layers == []


def test_the_networks_deferred_pass_is_its_jpeg_pass_on_the_rows_asked_for() -> None:
    """A network that defers the JPEG pass leaves it out of ``forward`` and keeps the batch's
    pixels; ``second_pass`` gives the JPEG logits of the rows asked for (those of a network
    that runs the pass for every image) and NaN elsewhere, with no pass for no row."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    network = FeatureNetwork(model, ["linear", JPEG_LOGITS], PRESETS["cifar"]).eval()
    pixels = torch.rand(6, 3, 32, 32)
    everyone = infer_batch(network, pixels)
    assert everyone.pixels is None
    network.deferred = (JPEG_LOGITS,)
    deferred = infer_batch(network, pixels)
    assert JPEG_LOGITS not in deferred.features and deferred.pixels is not None
    rows = torch.tensor([True, False, True, False, False, True])
    jpeg = network.second_pass(JPEG_LOGITS, deferred.pixels, rows, 10).numpy()
    np.testing.assert_allclose(
        jpeg[rows.numpy()], everyone.features[JPEG_LOGITS][rows.numpy()], rtol=1e-5, atol=1e-5
    )
    assert np.isnan(jpeg[~rows.numpy()]).all()
    none = network.second_pass(JPEG_LOGITS, deferred.pixels, torch.zeros(6, dtype=torch.bool), 10)
    assert none.shape == (6, 10) and bool(torch.isnan(none).all())
    with torch.no_grad():  # named, a deferred pass runs (the adaptive attack's surrogate)
        named = network(pixels, second_passes={JPEG_LOGITS}).features[JPEG_LOGITS].numpy()
    np.testing.assert_allclose(named, everyone.features[JPEG_LOGITS], rtol=1e-5, atol=1e-5)
