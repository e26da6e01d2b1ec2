"""The kNN detector: processed features -> nearest training features -> score of a class."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.core import search
from app.core.processing import FeatureProcessing
from app.core.scoring import ScoreFunction, class_scores


@dataclass(frozen=True)
class LayerIndex:
    name: str
    processing: FeatureProcessing
    index: Any  # a faiss index; only app.core.search touches it


class Detector:
    """Scores the CNN's predicted class among the k nearest training features.

    Not thread-safe when the index lives on a GPU: one thread must own a Detector.
    """

    def __init__(
        self,
        layer: LayerIndex,
        labels: np.ndarray,
        k: int,
        score_function: ScoreFunction,
    ) -> None:
        if search.index_size(layer.index) != labels.shape[0]:
            raise ValueError("index size and label count differ")
        self.layer = layer
        self.labels = labels.astype(np.int64)
        self.k = k
        self.score_function = score_function

    def neighbours(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels, squared distances) of the k nearest training features; label -1 if missing."""
        processed = self.layer.processing.apply(features)
        found = search.search(self.layer.index, processed, self.k)
        neighbour_labels = np.where(found.ids >= 0, self.labels[np.maximum(found.ids, 0)], -1)
        return neighbour_labels, found.squared_distances

    def score(
        self,
        features: np.ndarray,
        classes: np.ndarray,
        score_function: ScoreFunction | None = None,
    ) -> np.ndarray:
        """(n,) score of ``classes[i]`` for query i."""
        neighbour_labels, squared_distances = self.neighbours(features)
        return class_scores(
            neighbour_labels, squared_distances, classes, score_function or self.score_function
        )


def empirical_p_values(scores: np.ndarray, calibration: np.ndarray) -> np.ndarray:
    """(n,) p-value of each score against authentic calibration scores: low scores are unusual.

    p = (1 + #{calibration <= score}) / (1 + #calibration), in (0, 1].
    """
    ordered = np.sort(calibration.astype(np.float64))
    at_or_below = np.searchsorted(ordered, scores.astype(np.float64), side="right")
    p_values: np.ndarray = (1.0 + at_or_below) / (1.0 + ordered.size)
    return p_values


def fisher_combination(p_values: np.ndarray) -> np.ndarray:
    """(n, L) p-values -> (n,) combined p-value by Fisher's method.

    T = -2 sum_l log p_l follows chi2 with 2L degrees of freedom when the p-values are
    independent and uniform; its survival function has the closed form
    exp(-T/2) sum_{j<L} (T/2)^j / j!. Layers of one network are not independent, so the result
    is used as a monotone combined score (thresholded on held-out images), not as a probability.
    """
    half = -np.log(np.clip(p_values.astype(np.float64), 1e-300, 1.0)).sum(axis=1)
    term = np.ones_like(half)
    total = np.ones_like(half)
    for j in range(1, p_values.shape[1]):
        term = term * half / j
        total = total + term
    combined: np.ndarray = np.clip(np.exp(-half) * total, 0.0, 1.0)
    return combined


class MultiLayerDetector:
    """Scores from several layers' detectors, each turned into a p-value against its own
    held-out authentic scores, combined into one score in [0, 1] (higher: more authentic)."""

    def __init__(
        self,
        detectors: Sequence[Detector],
        calibration: Sequence[np.ndarray],
        combination: str = "fisher",
    ) -> None:
        if len(detectors) < 2 or len(detectors) != len(calibration):
            raise ValueError("need two layers or more, each with its calibration scores")
        if combination != "fisher":
            raise ValueError(f"unknown combination {combination!r}")
        if any(c.size == 0 for c in calibration):
            raise ValueError("empty calibration scores")
        self.layer_detectors = list(detectors)
        self.calibration = [np.sort(c.astype(np.float64)) for c in calibration]
        self.combination = combination

    @property
    def layer_names(self) -> list[str]:
        return [d.layer.name for d in self.layer_detectors]

    def layer_scores(self, features: Mapping[str, np.ndarray], classes: np.ndarray) -> np.ndarray:
        """(n, L) each layer's own score of ``classes``."""
        return np.stack(
            [d.score(features[d.layer.name], classes) for d in self.layer_detectors], axis=1
        )

    def combine(self, layer_scores: np.ndarray) -> np.ndarray:
        p_values = np.stack(
            [
                empirical_p_values(layer_scores[:, i], calibration)
                for i, calibration in enumerate(self.calibration)
            ],
            axis=1,
        )
        return fisher_combination(p_values)

    def score(self, features: Mapping[str, np.ndarray], classes: np.ndarray) -> np.ndarray:
        """(n,) combined score of ``classes[i]`` for query i."""
        return self.combine(self.layer_scores(features, classes))
