"""The bundle's held-out honest classes: absent from older bundles, refused when they do not fit."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from app.core.bundle import load_honest_classes, load_honest_scores, read_manifest, write_manifest
from app.core.errors import BundleError
from app.core.flagging import HonestTraffic, calibrate_policy
from app.core.manifest import Manifest
from app.core.models import file_sha256

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "format1"
NAME = "calibration_honest_classes.npy"


def _bundle_with_classes(tmp_path: Path, classes: np.ndarray | None) -> tuple[Path, Manifest]:
    """The old single-layer fixture, with ``classes`` written and listed as its honest classes."""
    bundle = tmp_path / "b"
    shutil.copytree(FIXTURES / "single", bundle)
    manifest = read_manifest(bundle)
    if classes is None:
        return bundle, manifest
    np.save(bundle / NAME, classes)
    calibration = manifest.calibration.model_copy(update={"honest_classes_file": NAME})
    files = {**manifest.files, NAME: file_sha256(bundle / NAME)}
    changed = manifest.model_copy(update={"calibration": calibration, "files": files})
    write_manifest(bundle, Manifest.model_validate(changed.model_dump()))
    return bundle, read_manifest(bundle)


def test_an_older_bundle_has_no_classes_and_keeps_raw_scores(tmp_path: Path) -> None:
    bundle, manifest = _bundle_with_classes(tmp_path, None)
    assert manifest.calibration.honest_classes_file is None
    assert load_honest_classes(bundle, manifest) is None
    scores = load_honest_scores(bundle, manifest)
    policy = calibrate_policy("ewma", HonestTraffic(scores, manifest.calibration.threshold, None))
    assert policy.scale is None


def test_classes_that_fit_the_scores_load(tmp_path: Path) -> None:
    scores = np.load(FIXTURES / "single" / "calibration_honest_scores.npy")
    classes = (np.arange(scores.size) % 2).astype(np.int32)
    bundle, manifest = _bundle_with_classes(tmp_path, classes)
    loaded = load_honest_classes(bundle, manifest)
    assert loaded is not None and loaded.dtype == np.int64
    np.testing.assert_array_equal(loaded, classes)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda n: np.zeros(n + 1, dtype=np.int32), "one class index per honest score"),
        (lambda n: np.zeros(n, dtype=np.float32), "one class index per honest score"),
        (lambda n: np.full(n, 99, dtype=np.int32), "outside the bundle's classes"),
        (lambda n: np.full(n, -1, dtype=np.int32), "outside the bundle's classes"),
    ],
)
def test_classes_that_do_not_fit_are_refused(
    tmp_path: Path, make: Callable[[int], np.ndarray], message: str
) -> None:
    scores = np.load(FIXTURES / "single" / "calibration_honest_scores.npy")
    bundle, manifest = _bundle_with_classes(tmp_path, make(scores.size))
    with pytest.raises(BundleError, match=message):
        load_honest_classes(bundle, manifest)
