"""``bench.demo_accuracy``'s share of images the mirrored pass runs for, on real test photos."""

import tarfile
from pathlib import Path

import numpy as np
import torch

from app.core.guard import Guard
from app.core.images import decode_image
from app.core.statistics import NOT_DOUBTED
from bench.demo_accuracy import mirrored_rows
from tests.conftest import CIFAR_TAR, DEMO_BUNDLE


def test_the_mirrored_rows_are_those_the_doubted_flip_margin_reads(tmp_path: Path) -> None:
    """On 60 CIFAR-10 test photos through the demo bundle (whose v2 reads the mirror in doubt):
    the images the network mirrors are exactly those the statistic gives a value other than
    ``NOT_DOUBTED``, and some but not all of them are."""
    with tarfile.open(CIFAR_TAR) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith("test/") and m.isfile()]
        chosen = sorted(members, key=lambda m: m.name)[::167][:60]
        archive.extractall(tmp_path, members=chosen, filter="data")
    files = sorted(tmp_path.rglob("*.jpg"))
    mirrored = mirrored_rows(DEMO_BUNDLE, files)
    assert mirrored is not None and mirrored.shape == (len(files),)
    guard = Guard.load(DEMO_BUNDLE, device="cpu", use_gpu_index=False)
    column = guard.detector.names.index("doubt_margin@flip.logits")
    pixels = torch.stack([guard.pixels(decode_image(f.read_bytes())) for f in files])
    read = guard.evidence(guard.infer(pixels)).values[:, column] != NOT_DOUBTED
    np.testing.assert_array_equal(mirrored, read)
    assert 0 < mirrored.sum() < len(files)
