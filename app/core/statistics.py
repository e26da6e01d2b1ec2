"""Per-layer statistics of a query's pooled features, all oriented "higher = more authentic".

- ``vote``: the paper's kNN vote for the predicted class among the k nearest training features
  (knn / wknn / dwknn, ``app.core.scoring``). A class *posterior*: blind to how far the query lies
  from the training data.
- ``mahalanobis``: minus the squared Mahalanobis distance to the predicted class's mean under a
  covariance shared by all classes (Lee et al. 2018). Fitted on the indexed training features.
- ``knn_distance``: minus the squared distance to the k-th nearest training feature *of the
  predicted class*, in the layer's processed (PCA-whitened) space (after Sun et al. 2022).
- ``margin``: the predicted class's logit minus the largest other logit, read from the output
  of the classifier's last linear layer (the logits: ``models.logits_layer``). Needs no fitting.
- ``doubt_margin``: the same margin on another layer's logits (the mirrored image's,
  ``flip.logits``), read only for the queries the classifier is in doubt about: those whose
  first-pass margin is below a gate fitted on held-out authentic images. The others have
  nothing to show it and get ``NOT_DOUBTED``, so the service runs the second pass only for them.

The two distances are density statistics: they grow when an attack pushes a feature past the
class's cluster, where the vote still looks confident. The margin sees the opposite failure:
minimal-perturbation attacks (L-BFGS, CW, DeepFool) stop just past the decision boundary, where
the features still look like the data but the classifier is barely decided.

Everything is numpy in, numpy out; the FAISS work goes through ``app.core.search``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from app.core import search
from app.core.processing import FeatureProcessing
from app.core.scoring import ScoreFunction, class_scores

StatisticKind = Literal[
    "vote", "mahalanobis", "knn_distance", "margin", "doubt_margin", "suspect_margin"
]
STATISTIC_KINDS: tuple[StatisticKind, ...] = (
    "vote",
    "mahalanobis",
    "knn_distance",
    "margin",
    "doubt_margin",
    "suspect_margin",
)
# Kinds that search the layer's index of processed training features.
INDEXED_KINDS: tuple[StatisticKind, ...] = ("vote", "knn_distance")
DEFAULT_CLASS_K = 50  # Sun et al. 2022's k for CIFAR-10
# Relative floor on the within-class covariance's eigenvalues (directions with no variance).
_EIGEN_FLOOR = 1e-8


@dataclass(frozen=True)
class LayerIndex:
    """A layer's fitted processing and its FAISS index over the processed training features."""

    name: str
    processing: FeatureProcessing
    index: Any  # a faiss index; only app.core.search touches it


@dataclass(frozen=True)
class KnnVote:
    """The paper's score s(x, c): the weighted share of class c among the k nearest neighbours."""

    layer: LayerIndex
    labels: np.ndarray  # (N,) int64, row i of the index
    k: int
    score_function: ScoreFunction
    kind: StatisticKind = "vote"

    @property
    def layer_name(self) -> str:
        return self.layer.name

    def neighbours(self, features: np.ndarray, k: int | None = None) -> search.Neighbours:
        """Ids, labels and squared distances of the k nearest training features."""
        processed = self.layer.processing.apply(features)
        found = search.search(self.layer.index, processed, k or self.k)
        return search.Neighbours.of(found, self.labels)

    def values(
        self,
        features: Mapping[str, np.ndarray],
        classes: np.ndarray,
        score_function: ScoreFunction | None = None,
    ) -> np.ndarray:
        found = self.neighbours(features[self.layer.name])
        return class_scores(
            found.labels, found.squared_distances, classes, score_function or self.score_function
        )


@dataclass(frozen=True)
class ClassDensity:
    """Class means and the whitener of the tied within-class covariance of one layer."""

    means: np.ndarray  # (C, d) float64
    whitener: np.ndarray  # (d, d) float64: ||(x - mu) @ W||^2 is the Mahalanobis distance

    def squared_distances(self, features: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """(n,) squared Mahalanobis distance of each row to the mean of its class."""
        centred = features.astype(np.float64) - self.means[classes]
        whitened = centred @ self.whitener
        distances: np.ndarray = np.einsum("ij,ij->i", whitened, whitened)
        return distances

    def save(self, path: Path) -> None:
        with path.open("wb") as handle:
            np.savez(handle, means=self.means, whitener=self.whitener)

    @classmethod
    def load(cls, path: Path) -> ClassDensity:
        with np.load(path, allow_pickle=False) as data:
            return cls(np.asarray(data["means"]), np.asarray(data["whitener"]))


def fit_class_density(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]], num_classes: int, dim: int
) -> ClassDensity:
    """Streaming fit over (features, labels) chunks: per-class sums and one Gram matrix, so the
    tied covariance sum_c sum_{i in c} (x_i - mu_c)(x_i - mu_c)^T / N never needs all rows."""
    counts = np.zeros(num_classes, dtype=np.float64)
    sums = np.zeros((num_classes, dim), dtype=np.float64)
    gram = np.zeros((dim, dim), dtype=np.float64)
    for rows, labels in chunks:
        x = np.asarray(rows, dtype=np.float64)
        counts += np.bincount(labels, minlength=num_classes)
        np.add.at(sums, labels, x)
        gram += x.T @ x
    if (counts == 0).any():
        raise ValueError(f"classes without training features: {np.flatnonzero(counts == 0)}")
    total = counts.sum()
    if total <= num_classes:
        raise ValueError("too few training features for a class-conditional covariance")
    means = sums / counts[:, None]
    covariance = (gram - (means * counts[:, None]).T @ means) / total
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    floor = _EIGEN_FLOOR * max(float(eigenvalues.max()), 1e-30)
    whitener = eigenvectors / np.sqrt(np.maximum(eigenvalues, floor))
    return ClassDensity(means, whitener)


@dataclass(frozen=True)
class Mahalanobis:
    """Minus the squared Mahalanobis distance to the predicted class's mean (tied covariance)."""

    layer_name: str
    density: ClassDensity
    kind: StatisticKind = "mahalanobis"

    def values(self, features: Mapping[str, np.ndarray], classes: np.ndarray) -> np.ndarray:
        distances = self.density.squared_distances(features[self.layer_name], classes)
        return -distances


@dataclass(frozen=True)
class ClassKnnDistance:
    """Minus the squared distance to the k-th nearest processed training feature of the
    predicted class: one exact FAISS index per class, queries grouped by predicted class."""

    layer: LayerIndex
    class_indexes: search.ClassIndexes
    k: int
    kind: StatisticKind = "knn_distance"

    @property
    def layer_name(self) -> str:
        return self.layer.name

    def values(self, features: Mapping[str, np.ndarray], classes: np.ndarray) -> np.ndarray:
        processed = self.layer.processing.apply(features[self.layer.name])
        distances = self.class_indexes.kth_squared_distance(processed, classes, self.k)
        return -distances.astype(np.float64)


def logit_margins(logits: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(n,) logit of ``classes[i]`` minus the largest logit of any other class, for row i."""
    rows = np.arange(logits.shape[0])
    others = logits.astype(np.float64)  # a copy: the predicted class is masked in it below
    own = others[rows, classes]  # fancy indexing: a copy, taken before the masking
    others[rows, classes] = -np.inf
    margins: np.ndarray = own - others.max(axis=1)
    return margins


@dataclass(frozen=True)
class Margin:
    """The classifier's logit margin of the predicted class (Carlini & Wagner's f_6 quantity,
    oriented higher = more authentic): authentic images are classified with room to spare."""

    layer_name: str  # the layer whose output is the logits
    kind: StatisticKind = "margin"

    def values(self, features: Mapping[str, np.ndarray], classes: np.ndarray) -> np.ndarray:
        logits = features[self.layer_name]
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise ValueError(f"{self.layer_name} does not output logits: shape {logits.shape}")
        return logit_margins(logits, classes)


# ``doubt_margin``'s value where the first pass was not in doubt: finite (a non-finite value
# reads as unmeasured, ``app.core.detector.empirical_p_values``) and above any margin, so such a
# query's p-value is 1: the statistic has no evidence against it.
NOT_DOUBTED = float(np.finfo(np.float32).max)
# Share of the reference part's authentic images whose first-pass margin falls below the gate:
# the second pass's budget (a fifth of authentic queries), fixed with selection round 8's rule.
DOUBTED_SHARE = 0.2


def top_margins(logits: np.ndarray) -> np.ndarray:
    """(n,) how far each row's top logit leads the runner-up: the margin of the predicted class."""
    return logit_margins(logits, logits.argmax(axis=1))


def doubted(first_logits: np.ndarray, gate: float) -> np.ndarray:
    """(n,) bool: rows whose top logit leads the runner-up by less than ``gate``: the queries a
    ``doubt_margin`` statistic reads (the feature network mirrors these, ``FeatureNetwork``)."""
    in_doubt: np.ndarray = top_margins(first_logits) < gate
    return in_doubt


def fit_doubt_gate(first_logits: np.ndarray, share: float = DOUBTED_SHARE) -> float:
    """The gate below which ``share`` of these (held-out, authentic) first-pass margins fall."""
    if first_logits.shape[0] == 0:
        raise ValueError("no held-out images to fit a doubt gate on")
    return float(np.quantile(top_margins(first_logits), share))


@dataclass(frozen=True)
class DoubtMargin:
    """The logit margin of the predicted class on ``layer_name``'s logits (the mirrored image's)
    where the first pass doubts (its margin below ``gate``), else ``NOT_DOUBTED``.

    Why: minimal-perturbation attacks (L-BFGS, CW, DeepFool) stop just past the boundary, where
    the first pass is in doubt, and their perturbation is not mirror-symmetric, so the mirrored
    image often falls back to the true class; a confidently classified query costs no second
    pass (the plain ``margin@flip.logits`` mirrors every query)."""

    layer_name: str  # the logits the margin is read on: flip.logits
    first_logits: str  # the first pass's logits layer, which the gate reads
    gate: float
    kind: StatisticKind = "doubt_margin"

    def values(self, features: Mapping[str, np.ndarray], classes: np.ndarray) -> np.ndarray:
        rows = np.flatnonzero(doubted(features[self.first_logits], self.gate))
        out = np.full(classes.shape[0], NOT_DOUBTED, dtype=np.float64)
        if rows.size:  # rows the network did not mirror hold NaN: read as unmeasured
            out[rows] = logit_margins(features[self.layer_name][rows], classes[rows])
        return out


@dataclass(frozen=True)
class SuspectMargin:
    """The logit margin of the predicted class on ``layer_name``'s logits (the JPEG-squeezed
    image's), which the detector reads only for *suspect* queries: those whose combination of
    its other statistics falls below the ``DOUBTED_SHARE`` quantile of its reference part's
    (``app.core.detector.Detector``; p = 1 for the others). The values here are the plain
    margins (NaN where the layer was not computed); the gate is the detector's, since it
    depends on which other statistics the detector combines.

    Why (selection round 13): a dense adversarial stored as a JPEG is confident, so round 8's
    gate on the first pass's own margin reads few of them; the detector's other statistics
    doubt most of those they still accept, and the JPEG squeeze moves most of those off the
    adversarial class, at a second pass for a fifth of authentic queries."""

    layer_name: str  # the logits the margin is read on: jpeg.logits
    kind: StatisticKind = "suspect_margin"

    def values(self, features: Mapping[str, np.ndarray], classes: np.ndarray) -> np.ndarray:
        return logit_margins(features[self.layer_name], classes)


Statistic = KnnVote | Mahalanobis | ClassKnnDistance | Margin | DoubtMargin | SuspectMargin


def statistic_name(statistic: Statistic) -> str:
    """A stable label: ``kind@layer`` (``knn_distance`` adds its k)."""
    if isinstance(statistic, ClassKnnDistance):
        return f"knn_distance{statistic.k}@{statistic.layer_name}"
    return f"{statistic.kind}@{statistic.layer_name}"
