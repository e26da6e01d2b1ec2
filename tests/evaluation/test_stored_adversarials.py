"""``python -m evaluation.stored_adversarials``: adversarials stored as PNG or JPEG files, served
as the service would, judged by a real bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.core.guard import Guard
from evaluation import attacks, stored_adversarials
from evaluation.data import load_split
from evaluation.selection import selection_keys
from tests.conftest import CIFAR_TAR, DEMO_BUNDLE


def test_each_attack_and_format_is_counted_and_judged(tmp_path: Path) -> None:
    code = stored_adversarials.main(
        ["--bundle", str(DEMO_BUNDLE), "--source", str(CIFAR_TAR), "--per-class", "1",
         "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    )  # fmt: skip
    assert code == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = result["rows"]
    expected = [(a, f) for a in stored_adversarials.ATTACKS for f in stored_adversarials.FORMATS]
    assert [(r["attack"], r["stored_as"]) for r in rows] == expected
    for r in rows:
        assert 0 <= r["still_fooling"] <= r["crafted"] <= result["photos"]
        (share,) = r["accepted"].values()
        low, high = next(iter(r["accepted_interval"].values()))
        assert low <= share <= high
    # a PNG keeps the perturbation but for rounding: FGSM's adversarials still fool the model
    fgsm_png = rows[0]
    assert fgsm_png["crafted"] > 0 and fgsm_png["still_fooling"] >= fgsm_png["crafted"] - 1
    assert "| PGD-L2 | JPEG 75 |" in (tmp_path / "out" / "table.md").read_text()


def test_a_transfer_attacker_crafts_on_the_craft_bundles_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--craft-bundle``: the attacks run on that bundle's network, the judging on the judged
    bundles' (here the same weights loaded twice, so the rows equal a run without it)."""
    crafted_on: list[object] = []
    judged_by: list[object] = []
    craft, rows_of_attack = stored_adversarials.craft, stored_adversarials.rows_of_attack

    def spy_craft(model: Any, *args: Any) -> Any:
        crafted_on.append(model.network)
        return craft(model, *args)

    def spy_rows(name: str, model: Any, *args: Any) -> Any:
        judged_by.append(model.network)
        return rows_of_attack(name, model, *args)

    monkeypatch.setattr(stored_adversarials, "craft", spy_craft)
    monkeypatch.setattr(stored_adversarials, "rows_of_attack", spy_rows)
    common = ["--bundle", str(DEMO_BUNDLE), "--source", str(CIFAR_TAR), "--per-class", "1",
              "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert stored_adversarials.main([*common, "--out", str(tmp_path / "own")]) == 0
    assert crafted_on[0] is judged_by[0]
    transfer = [*common, "--craft-bundle", str(DEMO_BUNDLE), "--out", str(tmp_path / "t")]
    assert stored_adversarials.main(transfer) == 0
    assert crafted_on[1] is not judged_by[-1]
    own, other = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("own", "t"))
    assert other["craft_bundle"] == str(DEMO_BUNDLE) and own["craft_bundle"] is None
    assert other["rows"] == own["rows"]


def test_the_attacks_are_seeded() -> None:
    """PGD starts at random: the same seed crafts the same adversarials, another seed others."""
    guard = Guard.load(DEMO_BUNDLE, device="cpu")
    model = attacks.LogitsModel(guard.network).eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = np.array([0, 1, 2, 3])
    first = stored_adversarials.craft(model, x, labels, seed=0)
    assert list(first) == list(stored_adversarials.ATTACKS)
    for name, adversarial in stored_adversarials.craft(model, x, labels, seed=0).items():
        np.testing.assert_array_equal(adversarial, first[name])
    other = stored_adversarials.craft(model, x, labels, seed=1)
    assert not np.array_equal(other["PGD-Linf"], first["PGD-Linf"])


def test_a_bad_photo_count_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        stored_adversarials.main(["--bundle", str(DEMO_BUNDLE), "--per-class", "0"])
    assert "--per-class must be at least 1" in capsys.readouterr().err


def test_outside_selection_leaves_the_selection_images_out(tmp_path: Path) -> None:
    """``--outside-selection``: the photos lose exactly the selection images among them (each
    one is classified correctly, so each was a photo), and the results say how many."""
    cache = tmp_path / "evaluation" / "data"
    common = ["--bundle", str(DEMO_BUNDLE), "--source", str(CIFAR_TAR), "--per-class", "20",
              "--cache-dir", str(cache)]  # fmt: skip
    assert stored_adversarials.main([*common, "--out", str(tmp_path / "all")]) == 0
    outside = [*common, "--outside-selection", str(DEMO_BUNDLE), "--out", str(tmp_path / "out")]
    assert stored_adversarials.main(outside) == 0
    every, kept = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("all", "out"))
    preset = Guard.load(DEMO_BUNDLE, device="cpu").preset
    first = set(load_split(CIFAR_TAR, "test", preset, cache, 20).keys)
    left_out = selection_keys(DEMO_BUNDLE, CIFAR_TAR, cache.parent) & first
    assert kept["selection_images_left_out"] == len(left_out) > 0
    assert kept["photos"] == every["photos"] - len(left_out)
    assert every["selection_images_left_out"] == 0 and every["outside_selection"] is None
