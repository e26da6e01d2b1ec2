"""Bundles written before detector v2 (format 1) load unchanged and answer exactly as before.

The fixtures in tests/fixtures/format1/ were built by the OLD builder (commit 36e7728, see
make_fixtures.py there), with the OLD Guard's verdicts on nine fixed images stored beside them.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from app.core.guard import Guard
from app.core.images import decode_image

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "format1"


def _bundle(name: str, tmp_path: Path) -> Path:
    """The stored bundle, with the model file both fixtures share put back in."""
    bundle = tmp_path / name
    shutil.copytree(FIXTURES / name, bundle)
    shutil.copyfile(FIXTURES / "model.pth", bundle / "model.pth")
    return bundle


def _expected(name: str, what: str) -> np.ndarray:
    return np.load(FIXTURES / f"{name}_{what}.npy", allow_pickle=False)


@pytest.mark.parametrize(
    ("name", "layers", "combination"),
    [("single", ["layer3"], "single"), ("fisher", ["layer1", "layer3"], "fisher")],
)
def test_old_bundle_gives_the_old_verdicts(tmp_path, name, layers, combination):
    bundle = _bundle(name, tmp_path)
    raw = json.loads((bundle / "manifest.json").read_text())
    assert raw["format_version"] == 1
    assert "statistics" not in raw["detector"]
    assert "reference_statistics_file" not in raw["calibration"]

    guard = Guard.load(bundle, device="cpu", use_gpu_index=False)
    assert guard.manifest.detector.statistics is None
    assert guard.detector.combination == combination
    assert guard.layers == layers
    assert guard.detector.names == [f"vote@{layer}" for layer in layers]
    assert guard.threshold == raw["calibration"]["threshold"]

    images = [decode_image(p.read_bytes()) for p in sorted((FIXTURES / "images").glob("*.png"))]
    assert len(images) == 9
    verdicts = guard.classify_images(images)
    np.testing.assert_array_equal(
        [v.predicted_class for v in verdicts], _expected(name, "predictions")
    )
    np.testing.assert_allclose(
        [v.probability for v in verdicts], _expected(name, "probabilities"), rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(
        [v.score for v in verdicts], _expected(name, "scores"), rtol=0, atol=1e-6
    )
    accepted = np.array([v.accepted for v in verdicts])
    np.testing.assert_array_equal(accepted, _expected(name, "accepted"))
    assert accepted.any() and not accepted.all()  # the fixture exercises both verdicts


def test_old_fisher_bundle_references_its_per_layer_calibration(tmp_path):
    """The p-values' reference of a format-1 Fisher bundle is its per-layer score files."""
    bundle = _bundle("fisher", tmp_path)
    guard = Guard.load(bundle, device="cpu", use_gpu_index=False)
    layers = guard.manifest.detector.layers
    columns = [np.load(bundle / str(layer.calibration_scores_file)) for layer in layers]
    assert guard.detector.reference is not None
    np.testing.assert_array_equal(
        guard.detector.reference, np.sort(np.stack(columns, axis=1).astype(np.float64), axis=0)
    )
    # the stored combined calibration scores are the detector's combination of those columns
    stored = np.load(bundle / guard.manifest.calibration.scores_file)
    np.testing.assert_allclose(guard.detector.combine(np.stack(columns, axis=1)), stored, rtol=1e-6)


def test_a_manifest_that_is_not_utf8_or_not_a_manifest_is_refused_in_one_line(
    tmp_path: Path,
) -> None:
    """A binary manifest was a UnicodeDecodeError traceback; a schema-invalid one a 30-line
    pydantic message."""
    from app.core.bundle import read_manifest
    from app.core.errors import BundleError

    (tmp_path / "manifest.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(BundleError, match=r"manifest\.json: not UTF-8 text"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(BundleError) as refused:
        read_manifest(tmp_path)
    assert "\n" not in str(refused.value) and "more)" in str(refused.value)
