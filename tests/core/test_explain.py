"""``app.core.explain``: the evidence of a decision is the decision's own."""

import numpy as np
import pytest
import torch

from app.core.detector import Evidence
from app.core.explain import NEAREST_SHOWN, class_histogram, explain, first_vote, statistics_of
from app.core.guard import Guard
from app.core.statistics import NOT_DOUBTED
from tests.conftest import DEMO_BUNDLE


def test_class_histogram_counts_labels_and_skips_missing():
    labels = np.array([[0, 2, 2, -1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(class_histogram(labels, 3), [[1, 0, 2], [0, 4, 0]])


@pytest.fixture(scope="module")
def guard():
    return Guard.load(DEMO_BUNDLE, device="cpu")


def test_explanations_match_the_batch_evidence_for_the_rows_asked(guard):
    torch.manual_seed(0)
    batch = guard.infer(torch.rand(5, 3, 32, 32))
    evidence = guard.evidence(batch)
    np.testing.assert_array_equal(evidence.scores, guard.score(batch))
    assert guard.explain(batch, evidence, []) == []
    explained = guard.explain(batch, evidence, [3, 1])
    vote = first_vote(guard.detector)
    assert vote is not None
    found = vote.neighbours(batch.features[vote.layer_name][[3, 1]])
    for position, (row, ex) in enumerate(zip([3, 1], explained, strict=True)):
        assert ex.score == evidence.scores[row] and ex.threshold == guard.threshold
        assert ex.predicted_class == batch.predictions[row]
        shown = [None if v == NOT_DOUBTED else v for v in evidence.values[row].tolist()]
        assert [s.value for s in ex.statistics] == shown
        assert [s.p_value for s in ex.statistics] == evidence.p_values[row].tolist()
        assert sum(ex.vote_histogram) == guard.manifest.detector.k
        assert [n.id for n in ex.nearest] == found.ids[position, :NEAREST_SHOWN].tolist()
        # the vote statistic is the DW-kNN share of the predicted class among these neighbours
        predicted = int(batch.predictions[row])
        assert ex.vote_histogram[predicted] == int((found.labels[position] == predicted).sum())


def test_a_detector_without_a_vote_explains_without_neighbours(guard):
    no_vote = guard.detector.subset([1, 2, 3])  # the three Mahalanobis statistics
    torch.manual_seed(1)
    batch = guard.infer(torch.rand(2, 3, 32, 32))
    evidence = no_vote.evidence(batch.features, batch.predictions)
    (ex,) = explain(no_vote, evidence, batch.features, batch.predictions, [0], 0.01, 10)
    assert ex.vote_statistic is None and ex.vote_histogram == [] and ex.nearest == []
    assert len(ex.statistics) == 3


def test_a_doubt_margin_that_did_not_read_the_query_shows_no_value():
    """``NOT_DOUBTED`` is a placeholder (no second look), not a measurement: shown as None, with
    its p-value of 1; a measured value is shown as it is."""
    evidence = Evidence(
        ["margin@linear", "doubt_margin@flip.logits"],
        np.array([[1.5, NOT_DOUBTED], [0.2, -3.0]]),
        np.array([[0.4, 1.0], [0.1, 0.01]]),
        np.array([0.5, 0.02]),
    )
    first, second = statistics_of(evidence, 0), statistics_of(evidence, 1)
    assert [(s.value, s.p_value) for s in first] == [(1.5, 0.4), (None, 1.0)]
    assert [(s.value, s.p_value) for s in second] == [(0.2, 0.1), (-3.0, 0.01)]
