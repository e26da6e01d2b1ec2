"""Thresholds from held-out authentic images, never hand-picked.

The builder scores the correctly classified images of a held-out set; a threshold that "keeps r"
is the largest value such that at least a fraction r of those scores are at or above it.
A prediction is accepted when its score >= threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RETENTIONS: tuple[float, ...] = (0.90, 0.95, 0.98, 0.99)
DEFAULT_RETENTION = 0.98
QUANTILE_LEVELS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90)


def threshold_for_retention(scores: np.ndarray, retention: float) -> float:
    """Largest t with mean(scores >= t) >= retention (ties only raise the kept share)."""
    if not 0.0 < retention <= 1.0:
        raise ValueError(f"retention must be in (0, 1], got {retention}")
    if scores.size == 0:
        raise ValueError("cannot calibrate on an empty score set")
    ordered = np.sort(scores.astype(np.float64))
    drop = int(np.floor((1.0 - retention) * ordered.size + 1e-9))
    return float(ordered[drop])


@dataclass(frozen=True)
class Calibration:
    n_scores: int
    mean: float
    std: float
    quantiles: dict[str, float]  # level -> score
    thresholds: dict[str, float]  # retention -> threshold


def retention_key(retention: float) -> str:
    return f"{retention:.2f}"


def calibrate(scores: np.ndarray) -> Calibration:
    """Quantiles and retention thresholds of the authentic (correctly classified) scores."""
    scores = scores.astype(np.float64)
    return Calibration(
        n_scores=int(scores.size),
        mean=float(scores.mean()),
        std=float(scores.std()),
        quantiles={f"{q:g}": float(np.quantile(scores, q)) for q in QUANTILE_LEVELS},
        thresholds={retention_key(r): threshold_for_retention(scores, r) for r in RETENTIONS},
    )
