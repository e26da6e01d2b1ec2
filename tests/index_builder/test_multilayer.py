"""A multi-layer (Fisher) bundle through the real builder and the Guard."""

import json
from pathlib import Path

import numpy as np
import pytest

from app.core.detector import MultiLayerDetector
from app.core.guard import Guard
from app.core.images import decode_image
from index_builder.build import BuildConfig, build_bundle


def _config(source: Path, weights: Path, out: Path, **overrides) -> BuildConfig:
    options = dict(
        source=source, arch="resnet20", weights=weights, out=out, k=20, holdout_fraction=0.25,
        num_workers=0, batch_size=16, chunk_size=8,
    )
    options.update(overrides)
    return BuildConfig(**options)


def test_fisher_bundle_round_trip(make_image_folder, cifar_weights, tmp_path):
    folder = make_image_folder(classes=3, per_class=12)
    config = _config(
        folder, cifar_weights(3), tmp_path / "m", layers=("layer1", "layer3"),
        combination="fisher",
    )
    manifest = build_bundle(config, progress=False).manifest
    assert manifest.detector.combination == "fisher"
    assert [s.name for s in manifest.detector.layers] == ["layer1", "layer3"]
    assert all(s.calibration_scores_file in manifest.files for s in manifest.detector.layers)
    guard = Guard.load(tmp_path / "m")
    assert isinstance(guard.detector, MultiLayerDetector)
    assert guard.layer == "layer1+layer3"
    files = sorted(folder.rglob("*.png"))[:6]
    verdicts = guard.classify_images([decode_image(f.read_bytes()) for f in files])
    for v in verdicts:
        assert 0.0 < v.score <= 1.0 and v.accepted == (v.score >= v.threshold)
    # the stored combined calibration scores are what the detector gives on the holdout
    stored = np.load(tmp_path / "m" / "calibration_scores.npy")
    assert stored.size == manifest.calibration.n_correct
    assert manifest.calibration.threshold == pytest.approx(
        float(np.sort(stored)[int(np.floor(0.02 * stored.size + 1e-9))]), rel=1e-6
    )


def test_single_layer_manifest_still_loads(make_image_folder, cifar_weights, tmp_path):
    folder = make_image_folder(classes=3, per_class=12)
    build_bundle(_config(folder, cifar_weights(3), tmp_path / "s"), progress=False)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["detector"]["combination"] == "single"
    guard = Guard.load(tmp_path / "s")
    assert guard.layer == "layer3" and guard.layers == ["layer3"]


def test_several_layers_need_a_combination(make_image_folder, cifar_weights, tmp_path):
    folder = make_image_folder(classes=3, per_class=12)
    with pytest.raises(ValueError):
        build_bundle(
            _config(folder, cifar_weights(3), tmp_path / "x", layers=("layer1", "layer3")),
            progress=False,
        )


def test_demo_bundle_loads():
    bundle = Path(__file__).resolve().parents[2] / "bundles" / "cifar10-resnet20"
    if not bundle.is_dir():
        pytest.skip("no demo bundle")
    guard = Guard.load(bundle, device="cpu")
    assert guard.manifest.detector.combination == "single"
