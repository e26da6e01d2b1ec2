"""``bench.demo_accuracy``'s share of images a gated second pass runs for, on real test photos."""

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from app.core.guard import Guard
from app.core.images import decode_image
from app.core.statistics import NOT_DOUBTED
from bench.demo_accuracy import gated_pass_rows
from index_builder.build import build_bundle
from index_builder.config import BuildConfig
from tests.conftest import CIFAR_TAR, DEMO_BUNDLE


@pytest.fixture(scope="module")
def test_photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """60 CIFAR-10 test photos, every 167th of the test split."""
    root = tmp_path_factory.mktemp("photos")
    with tarfile.open(CIFAR_TAR) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith("test/") and m.isfile()]
        chosen = sorted(members, key=lambda m: m.name)[::167][:60]
        archive.extractall(root, members=chosen, filter="data")
    return sorted(root.rglob("*.jpg"))


def _read_rows(bundle: Path, files: list[Path], statistic: str) -> np.ndarray:
    """(n,) bool: the images ``statistic`` (a gated second pass's margin) has a value for."""
    guard = Guard.load(bundle, device="cpu", use_gpu_index=False)
    column = guard.detector.names.index(statistic)
    pixels = torch.stack([guard.pixels(decode_image(f.read_bytes())) for f in files])
    read: np.ndarray = guard.evidence(guard.infer(pixels)).values[:, column] != NOT_DOUBTED
    return read


def test_the_gated_rows_are_those_the_suspect_jpeg_margin_reads(test_photos: list[Path]) -> None:
    """Through the demo bundle (whose v2 reads the JPEG margin of its suspects): the images the
    JPEG pass runs for are exactly those the statistic gives a value other than
    ``NOT_DOUBTED``, and some but not all of them are."""
    gated = gated_pass_rows(DEMO_BUNDLE, test_photos)
    assert gated is not None and gated.name == "the JPEG pass (suspect gate)"
    assert gated.rows.shape == (len(test_photos),)
    read = _read_rows(DEMO_BUNDLE, test_photos, "suspect_margin@jpeg.logits")
    np.testing.assert_array_equal(gated.rows, read)
    assert 0 < gated.rows.sum() < len(test_photos)


def _small_bundle(tmp_path: Path, detector: str) -> Path:
    """A bundle of ``detector`` from the demo's weights on 600 training photos."""
    config = BuildConfig(
        source=CIFAR_TAR, split="train", arch="resnet20", weights=DEMO_BUNDLE / "model.pth",
        out=tmp_path / detector, detector=detector, k=20, per_class_limit=60,
        num_workers=0, batch_size=100, work_dir=tmp_path / f"{detector}.work", device="cpu",
    )  # fmt: skip
    build_bundle(config, progress=False)
    return config.out


def test_the_gated_rows_are_those_the_doubted_flip_margin_reads(
    test_photos: list[Path], tmp_path: Path
) -> None:
    """Through a bundle with round 11's ``v2-dflip`` (built from the demo's weights on 600
    training photos): the images the network mirrors are exactly those the doubted flip margin
    reads, some but not all; a bundle without a gated pass has none."""
    dflip = _small_bundle(tmp_path, "v2-dflip")
    gated = gated_pass_rows(dflip, test_photos)
    assert gated is not None and gated.name == "the mirrored pass (doubt gate)"
    read = _read_rows(dflip, test_photos, "doubt_margin@flip.logits")
    np.testing.assert_array_equal(gated.rows, read)
    assert 0 < gated.rows.sum() < len(test_photos)
    assert gated_pass_rows(_small_bundle(tmp_path, "paper"), test_photos) is None
