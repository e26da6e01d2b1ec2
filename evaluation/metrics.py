"""Binary 'trustful' / 'spurious' metrics on detector scores (paper Section 5.1).

Positives are correctly classified authentic images, negatives are the images of one set
(adversarials, or authentic errors); a prediction is accepted when score >= threshold.
TPR = share of positives accepted, FPR = share of negatives accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Roc:
    thresholds: np.ndarray  # descending; accept when score >= threshold
    tpr: np.ndarray
    fpr: np.ndarray


def roc_curve(positive: np.ndarray, negative: np.ndarray) -> Roc:
    """TPR and FPR at every distinct score, from accepting nothing to accepting everything."""
    if positive.size == 0 or negative.size == 0:
        raise ValueError("both score sets must be non-empty")
    values = np.unique(np.concatenate([positive, negative]))[::-1]
    pos = np.sort(positive)
    neg = np.sort(negative)
    # count of scores >= t is n - searchsorted(sorted, t, side="left")
    tpr = (pos.size - np.searchsorted(pos, values, side="left")) / pos.size
    fpr = (neg.size - np.searchsorted(neg, values, side="left")) / neg.size
    thresholds = np.concatenate([[np.inf], values])
    return Roc(thresholds, np.concatenate([[0.0], tpr]), np.concatenate([[0.0], fpr]))


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted one half (Mann-Whitney)."""
    scores = np.concatenate([positive, negative]).astype(np.float64)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    rank_sum = ranks[: positive.size].sum()
    u = rank_sum - positive.size * (positive.size + 1) / 2.0
    return float(u / (positive.size * negative.size))


def eer_accuracy(positive: np.ndarray, negative: np.ndarray) -> tuple[float, float]:
    """(accuracy at the equal error rate, its threshold): the threshold where the false negative
    rate (positives rejected) equals the false positive rate, linearly interpolated between the
    two ROC points that bracket FNR = FPR; accuracy = 1 - EER."""
    roc = roc_curve(positive, negative)
    fnr = 1.0 - roc.tpr
    gap = fnr - roc.fpr  # decreasing from 1 to -1 along the curve
    crossing = int(np.argmax(gap <= 0))
    if crossing == 0:
        return 1.0 - float(fnr[0]), float(roc.thresholds[0])
    g0, g1 = gap[crossing - 1], gap[crossing]
    w = g0 / (g0 - g1) if g0 != g1 else 0.0
    eer = (1 - w) * roc.fpr[crossing - 1] + w * roc.fpr[crossing]
    return 1.0 - float(eer), float(roc.thresholds[crossing])


def tpr_at_fpr(positive: np.ndarray, negative: np.ndarray, max_fpr: float = 0.05) -> float:
    """Largest share of authentic images kept while accepting at most ``max_fpr`` of the set."""
    roc = roc_curve(positive, negative)
    allowed = roc.fpr <= max_fpr + 1e-12
    return float(roc.tpr[allowed].max())


@dataclass(frozen=True)
class SetMetrics:
    n: int
    eer_accuracy: float
    eer_threshold: float
    auroc: float
    tpr_at_5_fpr: float
    mean_score: float

    def as_dict(self) -> dict[str, float]:
        return {
            "n": self.n,
            "eer_accuracy": round(self.eer_accuracy, 4),
            "eer_threshold": float(f"{self.eer_threshold:.6g}"),
            "auroc": round(self.auroc, 4),
            "tpr_at_5_fpr": round(self.tpr_at_5_fpr, 4),
            "mean_score": round(self.mean_score, 4),
        }


def set_metrics(positive: np.ndarray, negative: np.ndarray) -> SetMetrics:
    accuracy, threshold = eer_accuracy(positive, negative)
    return SetMetrics(
        n=int(negative.size),
        eer_accuracy=accuracy,
        eer_threshold=threshold,
        auroc=auroc(positive, negative),
        tpr_at_5_fpr=tpr_at_fpr(positive, negative, 0.05),
        mean_score=float(negative.mean()),
    )
