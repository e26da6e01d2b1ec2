"""The close-copy keys' measurement: its pair counts against a brute-force count, and its
figures on a few real training photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.core.stateful.close_copies import CloseKeyShape
from app.core.stateful.index import MIN_SHARED_KEYS
from evaluation import close_keys
from evaluation.honest_traffic import train_photos
from tests.conftest import CIFAR_TAR


def test_shared_pairs_counts_common_buckets() -> None:
    rng = np.random.default_rng(0)
    buckets = [np.unique(rng.integers(0, 40, 12)) for _ in range(25)]
    shared = close_keys.shared_pairs(buckets)
    for i in range(25):
        for j in range(25):
            expected = 0 if i == j else len(np.intersect1d(buckets[i], buckets[j]))
            assert shared[i, j] == expected


def test_figures_and_report_on_training_photos(tmp_path: Path) -> None:
    """Every change is a close copy (the function asserts it); Square's first probe keeps far
    more than ``MIN_SHARED_KEYS`` keys; a shape of one key can never reach the count."""
    photos = train_photos(CIFAR_TAR, 40)
    figures = close_keys.figures(photos, CloseKeyShape(), None)
    probe = {m.change: m for m in figures.misses}["Square's first probe"]
    assert probe.missed == 0.0 and probe.fewest_keys >= MIN_SHARED_KEYS
    single = close_keys.figures(photos, CloseKeyShape(tables=1), None)
    assert all(m.missed == 1.0 for m in single.misses) and single.unrelated_per_photo == 0.0
    assert (
        close_keys.main(["--photos", "30", "--source", str(CIFAR_TAR), "--out", str(tmp_path)]) == 0
    )
    text = (tmp_path / "close_keys.md").read_text()
    assert "| 64 | 8 | 64 |" in text and "python -m evaluation.close_keys --photos 30" in text
