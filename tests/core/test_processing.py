from pathlib import Path

import numpy as np
import pytest

from app.core.processing import FeatureProcessing, fit_processing


def correlated(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * rng.uniform(0.1, 5.0, d)
    return (rng.normal(size=(n, d)) @ mixing + 3.0).astype(np.float32)


def test_pca_whitening_gives_unit_variance_on_fitted_data():
    x = correlated(4000, 64)
    chunks = np.array_split(x, 7)  # fitted chunk by chunk, as the builder streams them
    proc = fit_processing("pca_whiten", chunks, 64, pca_dims=32)
    y = proc.apply(x).astype(np.float64)
    assert y.shape == (4000, 32)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(np.cov(y, rowvar=False, bias=True), np.eye(32), atol=2e-3)


def test_pca_dims_capped_at_feature_and_sample_rank():
    assert fit_processing("pca_whiten", [correlated(500, 16)], 16, pca_dims=256).output_dim == 16
    # 40 vectors span at most 39 directions around their mean: whitening more would blow up noise.
    assert fit_processing("pca_whiten", [correlated(40, 64)], 64, pca_dims=256).output_dim == 39


def test_l2_and_none():
    x = correlated(10, 8)
    np.testing.assert_allclose(
        np.linalg.norm(fit_processing("l2", [x], 8).apply(x), axis=1), 1.0, rtol=1e-6
    )
    np.testing.assert_array_equal(fit_processing("none", [x], 8).apply(x), x)


def test_save_load_round_trip(tmp_path: Path):
    x = correlated(300, 12)
    proc = fit_processing("pca_whiten", [x], 12, pca_dims=5)
    proc.save(tmp_path / "p.npz")
    loaded = FeatureProcessing.load(tmp_path / "p.npz")
    np.testing.assert_array_equal(loaded.apply(x), proc.apply(x))
    with pytest.raises(ValueError):
        loaded.apply(x[:, :5])
