"""``python -m evaluation.gate_reach``: which successful adversarials the demo bundle's suspect
gate reads, on real CIFAR-10 photos and real FGSM adversarials of them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from app.core.guard import Guard
from evaluation import attacks, gate_reach
from evaluation.data import eight_bit, load_split
from evaluation.sets import Selection, export_attack_sets
from index_builder.build import build_bundle
from index_builder.config import BuildConfig
from tests.conftest import CIFAR_TAR, DEMO_BUNDLE


def test_judge_splits_the_bundles_decisions_by_what_the_gate_read(
    guard: Guard, labelled: tuple[np.ndarray, np.ndarray]
) -> None:
    """Photos and their FGSM adversarials: the accepted count is the service path's
    (``classify_pixels``), and the read and unread parts add up to it; the photos' pass unread
    (they are accepted, and the gate reads only a fifth of authentic photos), the adversarials'
    are read."""
    pixels, labels = labelled
    photos = torch.from_numpy(pixels.astype(np.float32) / 255.0)
    fgsm = attacks.fgsm_untargeted(
        attacks.LogitsModel(guard.network).eval(), photos, torch.from_numpy(labels), 8 / 255
    ).adversarial
    both = torch.cat([photos, torch.from_numpy(fgsm)])
    reach = gate_reach.judge(guard, "mixed", both)
    verdicts = guard.classify_pixels(both)
    assert reach.images == len(both)
    assert reach.accepted == sum(v.accepted for v in verdicts)
    assert reach.accepted == reach.accepted_read + reach.accepted_unread
    assert reach.accepted_unread <= reach.images - reach.read
    suspects = guard.detector.suspects(guard.evidence(guard.infer(both)).values)
    assert reach.read == int(suspects.sum())
    assert suspects[len(photos) :].mean() > suspects[: len(photos)].mean()


@pytest.fixture(scope="module")
def sets_file(tmp_path_factory: pytest.TempPathFactory, guard: Guard) -> tuple[Path, int, int]:
    """A sets file as ``advguard evaluate`` exports it: the first 20 test photos and their FGSM
    adversarials; two "adversarials" are copies of their photos (they fool nothing). Returns
    (path, photos the model gets right, adversarials that fool it from such photos); the
    decoded split is cached beside it, in ``cache``."""
    tmp_path = tmp_path_factory.mktemp("sets")
    split = load_split(CIFAR_TAR, "test", guard.preset, tmp_path / "cache")  # as main loads it
    rows = np.arange(20)
    photos = torch.from_numpy(split.pixels[rows].astype(np.float32) / 255.0)
    model = attacks.LogitsModel(guard.network).eval()
    labels = split.labels[rows]
    adversarial = attacks.fgsm_untargeted(model, photos, torch.from_numpy(labels), 8 / 255)
    images = adversarial.adversarial.copy()
    images[:2] = photos[:2].numpy()  # no perturbation: fools the model only where it errs
    as_uploaded = torch.from_numpy(eight_bit(images).astype(np.float32) / 255.0)
    right = attacks.predict(model, photos) == labels
    fooled = int((right & (attacks.predict(model, as_uploaded) != labels)).sum())
    path = tmp_path / "sets.npz"
    selection = Selection(rows, np.zeros(0, dtype=np.int64), (labels + 1) % 10)
    export_attack_sets(path, selection, {"fgsm": images}, {"fgsm": np.arange(20)}, "test")
    return path, int(right.sum()), fooled


def test_the_command_counts_what_fools_the_judged_model(
    tmp_path: Path, sets_file: tuple[Path, int, int]
) -> None:
    sets, right, fooled = sets_file
    out = tmp_path / "out"
    common = ["--bundle", str(DEMO_BUNDLE), "--sets", str(sets), "--source", str(CIFAR_TAR),
              "--cache-dir", str(sets.parent / "cache")]  # fmt: skip
    assert gate_reach.main([*common, "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    authentic, fgsm = result["rows"]
    assert (authentic["name"], authentic["images"]) == ("authentic", right)
    assert (fgsm["name"], fgsm["images"]) == ("fgsm", fooled)
    assert 0 < fooled < 20
    assert result["stored_as"] == "8-bit pixels"
    assert "| fgsm |" in (out / "table.md").read_text()
    # as JPEG files: the same photos, and adversarials that still fool the model
    assert gate_reach.main([*common, "--stored", "95", "--out", str(tmp_path / "j")]) == 0
    stored = json.loads((tmp_path / "j" / "results.json").read_text())
    assert stored["stored_as"] == "JPEG 95"
    assert stored["rows"][0]["images"] == right and stored["rows"][1]["images"] <= 20


def test_bad_options_are_refused(tmp_path: Path, sets_file: tuple[Path, int, int]) -> None:
    sets = sets_file[0]
    argv = ["--bundle", str(DEMO_BUNDLE), "--sets", str(sets), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        gate_reach.main([*argv, "--stored", "0"])
    older = tmp_path / "older.npz"  # an export from before the rows were kept
    with np.load(sets) as data:
        np.savez(older, **{k: data[k] for k in data.files if not k.startswith("rows_")})
    with pytest.raises(SystemExit):
        gate_reach.main([*argv[:2], "--sets", str(older), *argv[4:]])
    with pytest.raises(FileNotFoundError, match="no exported attack sets"):
        gate_reach.main([*argv[:2], "--sets", str(tmp_path / "none.npz"), *argv[4:]])
    assert not (tmp_path / "o").exists()


def test_a_bundle_without_a_suspect_gate_is_refused(
    tmp_path: Path, sets_file: tuple[Path, int, int]
) -> None:
    """The paper's detector reads every statistic for every query: nothing to split."""
    config = BuildConfig(
        source=CIFAR_TAR, split="train", arch="resnet20", weights=DEMO_BUNDLE / "model.pth",
        out=tmp_path / "paper", detector="paper", k=5, per_class_limit=10,
        num_workers=0, batch_size=100, work_dir=tmp_path / "work", device="cpu",
    )  # fmt: skip
    build_bundle(config, progress=False)
    sets = sets_file[0]
    argv = ["--bundle", str(config.out), "--sets", str(sets), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        gate_reach.main(argv)
    assert not (tmp_path / "o").exists()


def test_the_demo_bundle_accepts_every_query_its_gate_lets_by(guard: Guard) -> None:
    """What the README says of the default: its threshold lies below the lowest score a query
    the gate does not read can have, (k + 1) / (k / gate + 1) for k other statistics."""
    detector = guard.detector
    assert detector.suspect_gate is not None
    k = len(detector.plain_columns)
    assert guard.threshold < (k + 1) / (k / detector.suspect_gate + 1)
