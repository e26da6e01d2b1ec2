"""A multi-layer (Fisher) bundle through the real builder and the Guard."""

import json
from pathlib import Path

import numpy as np
import pytest

from app.core.detector import Detector
from app.core.errors import ConfigError
from app.core.guard import Guard
from app.core.images import decode_image
from index_builder.build import build_bundle
from tests.index_builder.test_build import cifar_config as _config


def test_fisher_bundle_round_trip(make_image_folder, cifar_weights, tmp_path):
    folder = make_image_folder(classes=3, per_class=12)
    config = _config(
        folder,
        cifar_weights(3),
        tmp_path / "m",
        layers=("layer1", "layer3"),
        combination="fisher",
    )
    manifest = build_bundle(config, progress=False).manifest
    assert manifest.detector.combination == "fisher"
    # explicit layers keep their names; the bundle names its statistics: one vote per layer
    assert [s.name for s in manifest.detector.layers] == ["layer1", "layer3"]
    assert manifest.detector.statistics is not None
    assert [(s.kind, s.layer) for s in manifest.detector.statistics] == [
        ("vote", "layer1"),
        ("vote", "layer3"),
    ]
    # the p-values' reference lives in one (n, S) file, not per layer
    calibration = manifest.calibration
    assert all(s.calibration_scores_file is None for s in manifest.detector.layers)
    assert calibration.reference_statistics_file in manifest.files
    assert calibration.threshold_statistics_file in manifest.files
    reference = np.load(tmp_path / "m" / calibration.reference_statistics_file)
    assert reference.shape == (calibration.n_reference, 2)
    guard = Guard.load(tmp_path / "m")
    assert isinstance(guard.detector, Detector)
    assert guard.detector.combination == "fisher"
    assert guard.detector.names == ["vote@layer1", "vote@layer3"]
    assert guard.layer == "layer1+layer3"
    files = sorted(folder.rglob("*.png"))[:6]
    verdicts = guard.classify_images([decode_image(f.read_bytes()) for f in files])
    for v in verdicts:
        assert 0.0 < v.score <= 1.0 and v.accepted == (v.score >= v.threshold)
    # the stored combined calibration scores are what the detector gives on the threshold part
    stored = np.load(tmp_path / "m" / "calibration_scores.npy")
    assert stored.size == calibration.n_correct
    assert calibration.threshold == pytest.approx(
        float(np.sort(stored)[int(np.floor(0.02 * stored.size + 1e-9))]), rel=1e-6
    )


def test_single_layer_manifest_still_loads(make_image_folder, cifar_weights, tmp_path):
    folder = make_image_folder(classes=3, per_class=12)
    build_bundle(
        _config(folder, cifar_weights(3), tmp_path / "s", layers=("layer3",)), progress=False
    )
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["detector"]["combination"] == "single"
    assert manifest["detector"]["statistics"] == [
        {"kind": "vote", "layer": "layer3", "k": None, "first_logits": None, "gate": None}
    ]
    guard = Guard.load(tmp_path / "s")
    assert guard.layer == "layer3" and guard.layers == ["layer3"]
    assert guard.detector.reference is None


def test_several_layers_default_to_fisher_and_refuse_single(
    make_image_folder, cifar_weights, tmp_path
):
    folder = make_image_folder(classes=3, per_class=12)
    weights = cifar_weights(3)
    manifest = build_bundle(
        _config(folder, weights, tmp_path / "x", layers=("layer1", "layer3")), progress=False
    ).manifest
    assert manifest.detector.combination == "fisher"
    with pytest.raises(ConfigError, match="single"):  # a user's error: one line, exit 2
        build_bundle(
            _config(
                folder, weights, tmp_path / "y", layers=("layer1", "layer3"), combination="single"
            ),
            progress=False,
        )
    assert not (tmp_path / "y").exists()


def test_demo_bundle_loads():
    bundle = Path(__file__).resolve().parents[2] / "bundles" / "cifar10-resnet20"
    assert bundle.is_dir(), "the demo bundle is committed with the repository"
    guard = Guard.load(bundle, device="cpu")
    # whichever detector the demo bundle holds (format-1 bundles: tests/core/test_format1.py)
    spec = guard.manifest.detector
    assert guard.detector.combination == spec.combination
    assert [(s.kind, s.layer_name) for s in guard.detector.statistics] == [
        (s.kind, s.layer) for s in spec.statistic_specs()
    ]
    assert spec.statistic_specs()[0].kind == "vote"  # the paper's vote is always there
