"""The parity check's bound on each statistic: 1e-3 of its spread, and for the kNN vote also
two steps of its k-th neighbour's weight (a swap at the boundary of the k nearest)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.core.guard import Guard
from app.core.images import decode_image
from app.core.scoring import class_scores
from app.core.statistics import NOT_DOUBTED, KnnVote
from app.service.settings import DEFAULT_BUNDLE
from bench.gpu import parity
from bench.load_service import test_jpegs as cifar_test_jpegs

IMAGES = 256


@pytest.fixture(scope="module")
def demo() -> tuple[Guard, torch.Tensor, parity.Answers]:
    guard = Guard.load(DEFAULT_BUNDLE, device="cpu", use_gpu_index=False)
    pixels = torch.stack([guard.pixels(decode_image(data)) for data in cifar_test_jpegs(IMAGES)])
    return guard, pixels, parity.answers(guard, pixels)


def test_a_vote_step_is_what_swapping_the_kth_neighbour_moves_the_vote_by(
    demo: tuple[Guard, torch.Tensor, parity.Answers],
) -> None:
    """Recomputing each vote with the k-th neighbour replaced by the (k+1)-th (a float32
    nudge can do that, however small) moves it by at most one step, and the step is what
    dwarfs the fixed 1e-3 of the spread."""
    guard, pixels, reference = demo
    steps = parity.vote_steps(guard, pixels)
    (column,) = [i for i, s in enumerate(guard.detector.statistics) if isinstance(s, KnnVote)]
    vote = guard.detector.statistics[column]
    assert isinstance(vote, KnnVote)
    assert np.all(steps[:, [i for i in range(steps.shape[1]) if i != column]] == 0)
    features = guard.infer(pixels).features[vote.layer_name]
    found = vote.neighbours(features, vote.k + 1)
    labels, distances = found.labels, found.squared_distances
    swapped_labels = np.concatenate([labels[:, : vote.k - 1], labels[:, vote.k :]], axis=1)
    swapped_distances = np.concatenate([distances[:, : vote.k - 1], distances[:, vote.k :]], axis=1)
    classes = reference.predictions
    kept = class_scores(labels[:, : vote.k], distances[:, : vote.k], classes, vote.score_function)
    assert np.allclose(kept, reference.values[:, column])
    swapped = class_scores(swapped_labels, swapped_distances, classes, vote.score_function)
    assert np.all(np.abs(swapped - kept) <= steps[:, column] * (1 + 1e-6))
    spread = parity.spreads(guard, reference)[column]
    assert steps[:, column].max() / spread > parity.STATISTIC_TOLERANCE


def test_compare_passes_the_same_answers_and_bounds_each_statistic(
    demo: tuple[Guard, torch.Tensor, parity.Answers],
) -> None:
    guard, _, reference = demo
    names = guard.detector.names
    steps = np.zeros((IMAGES, len(names)))
    same = parity.compare(guard, reference, reference, steps)
    assert same["passed"] and same["statistics_within_tolerance"]
    spread = parity.spreads(guard, reference)
    values = reference.values.copy()
    row = int(np.flatnonzero(values[:, -1] < NOT_DOUBTED)[0])  # a query the gated margin read
    values[row, -1] += 2 * parity.STATISTIC_TOLERANCE * spread[-1]  # one statistic, one image
    moved = parity.Answers(
        reference.predictions, reference.accepted, values, reference.p_values, reference.scores
    )
    found = parity.compare(guard, reference, moved, steps)
    assert found["all_decisions_identical"] and not found["statistics_within_tolerance"]
    assert not found["passed"]
    steps[row, -1] = parity.STATISTIC_TOLERANCE * spread[-1]  # two such steps allow the move
    assert parity.compare(guard, reference, moved, steps)["passed"]
    steps[row, -1] = 0.0
    steps[row + 1, -1] = parity.STATISTIC_TOLERANCE * spread[-1]  # another image's step does not
    assert not parity.compare(guard, reference, moved, steps)["passed"]


def test_a_gated_statistic_is_compared_where_both_read_it_and_its_disagreements_counted(
    demo: tuple[Guard, torch.Tensor, parity.Answers],
) -> None:
    """The demo's suspect JPEG margin reads some queries only: its spread is that of the values
    read (not of ``NOT_DOUBTED``'s), and a query one configuration reads and the other does not
    is counted as a gate disagreement, not as a move."""
    guard, _, reference = demo
    read = reference.values[:, -1] < NOT_DOUBTED
    assert 0 < read.sum() < IMAGES
    spread = parity.spreads(guard, reference)[-1]
    held_out = guard.detector.reference
    assert held_out is not None
    assert spread == pytest.approx(held_out[held_out[:, -1] < NOT_DOUBTED, -1].std())
    values = reference.values.copy()
    values[int(np.flatnonzero(read)[0]), -1] = NOT_DOUBTED  # read by the reference only
    values[int(np.flatnonzero(~read)[0]), -1] = 0.0  # read by the other only
    other = parity.Answers(
        reference.predictions, reference.accepted, values, reference.p_values, reference.scores
    )
    found = parity.compare(guard, reference, other, np.zeros((IMAGES, len(guard.detector.names))))
    assert found["gate_disagreements"][guard.detector.names[-1]] == 2
    assert sum(found["gate_disagreements"].values()) == 2
    assert found["statistics_within_tolerance"] and found["passed"]
