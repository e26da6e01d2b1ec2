"""The kNN detector: processed features -> nearest training features -> score of a class."""

from __future__ import annotations

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
