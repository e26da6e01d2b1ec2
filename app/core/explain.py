"""Why the detector decided what it did, for one query: the evidence a trusted caller may see.

The figures come from the computations the decision itself used (``Detector.evidence``: each
statistic's value and p-value, the combined score) plus one more search of the vote's index for
the neighbours it counted. Nothing here recomputes a statistic another way, so the explanation
cannot disagree with the verdict. Exposing it to an attacker would hand them the gradient-free
signal they need to tune an adversarial, which is why the service shows it to trusted callers only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from app.core.detector import Detector, Evidence
from app.core.search import Neighbours
from app.core.statistics import NOT_DOUBTED, KnnVote

NEAREST_SHOWN = 8  # nearest training images listed per explained query


@dataclass(frozen=True)
class StatisticEvidence:
    """One statistic of the predicted class: its value (higher = more authentic) and, for a
    combined detector, its empirical p-value against held-out authentic images."""

    name: str  # kind@layer
    value: float | None  # None: a doubt_margin that did not read this query (not in doubt)
    p_value: float | None


@dataclass(frozen=True)
class Neighbour:
    """One of the nearest indexed training images: its index row (the bundle's id) and label."""

    id: int
    label: int
    squared_distance: float


@dataclass(frozen=True)
class Explanation:
    predicted_class: int  # the class every statistic is of (withheld from the public if rejected)
    score: float  # what the threshold applies to
    threshold: float
    statistics: list[StatisticEvidence]
    vote_statistic: str | None  # the vote whose neighbours are shown; None without a vote
    vote_histogram: list[int]  # per class: how many of the vote's k neighbours have that label
    nearest: list[Neighbour]  # the NEAREST_SHOWN closest of those neighbours, nearest first


def first_vote(detector: Detector) -> KnnVote | None:
    """The vote statistic whose neighbours an explanation shows (the first one; v2 has one)."""
    return next((s for s in detector.statistics if isinstance(s, KnnVote)), None)


def class_histogram(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(n, k) neighbour labels (-1 where missing) -> (n, classes) counts per class."""
    counts = np.zeros((labels.shape[0], num_classes), dtype=np.int64)
    for row, row_labels in enumerate(labels):
        valid = row_labels[row_labels >= 0]
        counts[row] = np.bincount(valid, minlength=num_classes)[:num_classes]
    return counts


def _shown(value: float) -> float | None:
    """A statistic's value as explanations show it: ``NOT_DOUBTED`` (a placeholder for "no
    second look", not a measurement) as None."""
    return None if value == NOT_DOUBTED else value


def statistics_of(evidence: Evidence, row: int) -> list[StatisticEvidence]:
    """Row ``row``'s value (and p-value, when combined) of every statistic."""
    p_values = evidence.p_values
    return [
        StatisticEvidence(
            name=name,
            value=_shown(float(evidence.values[row, column])),
            p_value=None if p_values is None else float(p_values[row, column]),
        )
        for column, name in enumerate(evidence.names)
    ]


def nearest_of(found: Neighbours, position: int, nearest: int) -> list[Neighbour]:
    """The ``nearest`` closest of one searched row's neighbours, nearest first (missing ones
    left out)."""
    return [
        Neighbour(int(i), int(label), float(d))
        for i, label, d in zip(
            found.ids[position, :nearest],
            found.labels[position, :nearest],
            found.squared_distances[position, :nearest],
            strict=True,
        )
        if i >= 0
    ]


def explain(
    detector: Detector,
    evidence: Evidence,
    features: Mapping[str, np.ndarray],
    predictions: np.ndarray,
    rows: Sequence[int],
    threshold: float,
    num_classes: int,
    nearest: int = NEAREST_SHOWN,
) -> list[Explanation]:
    """Explanations of the batch rows ``rows``: ``evidence`` is the batch's own (the decision's),
    ``features`` and ``predictions`` the batch's; the vote's index is searched again for these
    rows only."""
    if not rows:
        return []
    selected = list(rows)
    vote = first_vote(detector)
    found = None if vote is None else vote.neighbours(features[vote.layer_name][selected])
    histograms = None if found is None else class_histogram(found.labels, num_classes)
    return [
        Explanation(
            predicted_class=int(predictions[row]),
            score=float(evidence.scores[row]),
            threshold=threshold,
            statistics=statistics_of(evidence, row),
            vote_statistic=None if vote is None else f"vote@{vote.layer_name}",
            vote_histogram=[] if histograms is None else histograms[position].tolist(),
            nearest=[] if found is None else nearest_of(found, position, nearest),
        )
        for position, row in enumerate(selected)
    ]
