"""Feature processing fitted on the indexed features (paper Table 2): none, L2, PCA + whitening.

Fitting PCA streams over chunks (sum and X^T X in float64), so features that do not fit in memory
(ILSVRC: 1.28M x 2048) are fitted from memory-mapped chunks. Applying it is one affine map.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

ProcessingKind = Literal["none", "l2", "pca_whiten"]
PROCESSING_KINDS: tuple[ProcessingKind, ...] = ("none", "l2", "pca_whiten")
DEFAULT_PCA_DIMS = 256
_L2_FLOOR = 1e-12
# Relative floor on eigenvalues: directions with (numerically) no variance are not blown up.
_EIGEN_FLOOR = 1e-10


@dataclass(frozen=True)
class FeatureProcessing:
    """A fitted processing step. ``mean``/``projection`` are set for ``pca_whiten`` only."""

    kind: ProcessingKind
    input_dim: int
    output_dim: int
    mean: np.ndarray | None = None  # (input_dim,) float64
    projection: np.ndarray | None = None  # (input_dim, output_dim) float64

    def apply(self, features: np.ndarray) -> np.ndarray:
        """(n, input_dim) -> (n, output_dim) float32, ready for the index."""
        if features.ndim != 2 or features.shape[1] != self.input_dim:
            raise ValueError(f"expected (n, {self.input_dim}) features, got {features.shape}")
        if self.kind == "none":
            return np.ascontiguousarray(features, dtype=np.float32)
        if self.kind == "l2":
            x = features.astype(np.float64)
            norms = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _L2_FLOOR)
            return np.ascontiguousarray(x / norms, dtype=np.float32)
        assert self.mean is not None and self.projection is not None
        projected = (features.astype(np.float64) - self.mean) @ self.projection
        return np.ascontiguousarray(projected, dtype=np.float32)

    def save(self, path: Path) -> None:
        arrays: dict[str, np.ndarray] = {
            "kind": np.array(self.kind),
            "dims": np.array([self.input_dim, self.output_dim]),
        }
        if self.mean is not None and self.projection is not None:
            arrays["mean"] = self.mean
            arrays["projection"] = self.projection
        with path.open("wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path) -> FeatureProcessing:
        with np.load(path, allow_pickle=False) as data:
            kind = str(data["kind"])
            if kind not in PROCESSING_KINDS:
                raise ValueError(f"unknown processing kind {kind!r} in {path}")
            input_dim, output_dim = (int(v) for v in data["dims"])
            mean = data.get("mean")
            projection = data.get("projection")
        return cls(kind, input_dim, output_dim, mean, projection)


def fit_processing(
    kind: ProcessingKind,
    chunks: Iterable[np.ndarray],
    input_dim: int,
    pca_dims: int = DEFAULT_PCA_DIMS,
) -> FeatureProcessing:
    """Fit ``kind`` on the features yielded chunk by chunk; PCA dims are capped at input_dim."""
    if kind == "none" or kind == "l2":
        return FeatureProcessing(kind, input_dim, input_dim)
    if kind != "pca_whiten":
        raise ValueError(f"unknown processing {kind!r}; use one of {PROCESSING_KINDS}")
    count = 0
    total = np.zeros(input_dim, dtype=np.float64)
    gram = np.zeros((input_dim, input_dim), dtype=np.float64)
    for chunk in chunks:
        x = np.asarray(chunk, dtype=np.float64)
        count += x.shape[0]
        total += x.sum(axis=0)
        gram += x.T @ x
    if count < 2:
        raise ValueError("PCA needs at least two feature vectors")
    # Capped at the feature dimension and at the rank of the centred data (count - 1): whitening
    # a direction the data do not span would only amplify numerical noise.
    output_dim = min(pca_dims, input_dim, count - 1)
    mean = total / count
    # Population covariance, so the fitted data come out with variance exactly 1 per component.
    covariance = gram / count - np.outer(mean, mean)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1][:output_dim]
    top_values = np.maximum(eigenvalues[order], _EIGEN_FLOOR * max(eigenvalues.max(), 1e-30))
    projection = eigenvectors[:, order] / np.sqrt(top_values)
    return FeatureProcessing("pca_whiten", input_dim, output_dim, mean, projection)
