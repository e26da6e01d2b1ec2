"""kNN scores of a class among a query's nearest training features (paper Eq. 2, Table 1).

    s(q, c) = sum_i w_i [c_i == c] / sum_i w_i
    knn: w_i = 1     wknn: w_i = 1 / i (rank, from 1)     dwknn: w_i = 1 / d(q, x_i)^2

Everything here is numpy in, numpy out, vectorised over a batch of queries.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

ScoreFunction = Literal["knn", "wknn", "dwknn"]
SCORE_FUNCTIONS: tuple[ScoreFunction, ...] = ("knn", "wknn", "dwknn")

# Squared distances are floored here before 1/d^2: a query identical to a training image (d = 0)
# then gets a huge but finite weight, so it dominates the score instead of producing inf/NaN.
MIN_SQUARED_DISTANCE = 1e-12


def neighbour_weights(
    squared_distances: np.ndarray, valid: np.ndarray, score_function: ScoreFunction
) -> np.ndarray:
    """(n, k) weights; neighbours marked invalid (missing results) weigh 0."""
    n, k = squared_distances.shape
    if score_function == "knn":
        weights = np.ones((n, k), dtype=np.float64)
    elif score_function == "wknn":
        weights = np.broadcast_to(1.0 / np.arange(1, k + 1, dtype=np.float64), (n, k)).copy()
    elif score_function == "dwknn":
        # faiss L2 indexes return squared distances already: 1/d^2 needs no extra square.
        floored = np.maximum(squared_distances.astype(np.float64), MIN_SQUARED_DISTANCE)
        weights = 1.0 / floored
    else:
        raise ValueError(f"unknown score function {score_function!r}; use one of {SCORE_FUNCTIONS}")
    weights[~valid] = 0.0
    return weights


def class_scores(
    neighbour_labels: np.ndarray,
    squared_distances: np.ndarray,
    classes: np.ndarray,
    score_function: ScoreFunction,
) -> np.ndarray:
    """Score s(q, c) of one class per query.

    neighbour_labels: (n, k) int, -1 where the search returned no neighbour;
    squared_distances: (n, k) squared L2 distances, ascending per row;
    classes: (n,) the class to score for each query (the CNN's prediction).
    Returns (n,) float64 in [0, 1]; a query with no valid neighbour scores 0.
    """
    if neighbour_labels.shape != squared_distances.shape or neighbour_labels.ndim != 2:
        raise ValueError("labels and distances must both be (n, k)")
    if classes.shape != (neighbour_labels.shape[0],):
        raise ValueError("need one class per query")
    valid = (neighbour_labels >= 0) & np.isfinite(squared_distances)
    weights = neighbour_weights(squared_distances, valid, score_function)
    matches = neighbour_labels == classes[:, None]
    total = weights.sum(axis=1)
    matched = (weights * matches).sum(axis=1)
    safe_total = np.where(total > 0, total, 1.0)
    scores: np.ndarray = np.where(total > 0, matched / safe_total, 0.0)
    return scores
