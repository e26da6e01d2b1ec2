"""``python -m evaluation.honest_edits``: honest edits of real test photos through a real bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.core.guard import Guard
from app.core.images import encode_image
from evaluation import honest_edits
from evaluation.honest_traffic import as_served, to_pil
from tests.conftest import CIFAR_TAR, DEMO_BUNDLE, REPO

EXAMPLES = REPO / "app" / "service" / "static" / "examples"


def test_each_edit_is_served_as_the_service_would_and_judged_by_the_bundle(tmp_path: Path):
    code = honest_edits.main(
        ["--bundle", str(DEMO_BUNDLE), "--source", str(CIFAR_TAR), "--per-class", "2",
         "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    )  # fmt: skip
    assert code == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["photos"] == 20
    (rows,) = result["bundles"].values()
    assert [r["edit"] for r in rows] == list(honest_edits.EDITS)
    for r in rows:
        assert 0 <= r["accepted_correct"] <= 1 and 0 <= r["accuracy"] <= 1
        low, high = r["accepted_correct_interval"]
        assert low <= r["accepted_correct"] <= high
    assert "| brightness x1.2 |" in (tmp_path / "out" / "table.md").read_text()


def test_judge_counts_decisions_of_the_bundle_itself():
    """The row of an edit is the guard's own verdicts on those pixels, counted: the demo page's
    examples, 3 authentic photos it accepts and 4 adversarials it rejects."""
    guard = Guard.load(DEMO_BUNDLE, device="cpu")
    examples = sorted(EXAMPLES.glob("*.png"))
    photos = np.stack(
        [np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1) for p in examples]
    )
    served = {
        "none": np.stack([as_served(encode_image(to_pil(p), None), guard.preset) for p in photos])
    }
    np.testing.assert_array_equal(served["none"], photos)  # a 32x32 PNG is served as it is
    verdicts = guard.classify_pixels(torch.from_numpy(photos.astype(np.float32) / 255.0))
    accepted = np.array([v.accepted for v in verdicts])
    assert accepted.tolist() == [p.name.startswith("authentic") for p in examples]
    labels = np.array([v.predicted_class for v in verdicts])
    labels[0] = (labels[0] + 1) % 10  # the first authentic photo counted as misclassified
    (row,) = honest_edits.judge(guard, served, labels)
    assert row.correct == 6 and row.accuracy == pytest.approx(6 / 7)
    assert row.accepted_correct == pytest.approx(2 / 6)
    assert row.accepted_all == pytest.approx(3 / 7)


def test_palette_and_grayscale_edits_are_served_as_such():
    """The web and print edits reach the model as what they claim: at most 256 colours (GIF), at
    most the web palette's 216 with dithering, and grey (R = G = B) in black and white."""
    photos = [
        np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1)
        for p in sorted(EXAMPLES.glob("authentic*.png"))
    ]
    preset = Guard.load(DEMO_BUNDLE, device="cpu").preset

    def served(edit: str, photo: np.ndarray) -> np.ndarray:
        return as_served(encode_image(honest_edits.EDITS[edit](to_pil(photo)), None), preset)

    def colours(pixels: np.ndarray) -> int:
        return int(np.unique(pixels.reshape(3, -1), axis=1).shape[1])

    for photo in photos:
        assert colours(photo) > 256  # else the palettes would change nothing
        gif = served("palette 256 (GIF)", photo)
        assert colours(gif) <= 256 and not np.array_equal(gif, photo)
        assert colours(served("palette web, dithered", photo)) <= 216
        grey = served("grayscale", photo)
        assert np.array_equal(grey[0], grey[1]) and np.array_equal(grey[1], grey[2])


def test_sensor_noise_has_its_spread_and_is_the_same_on_a_rerun():
    """Gaussian noise of the stated standard deviation in levels (rounding and clipping aside),
    seeded by the photo: the same photo gets the same noise, another photo other noise."""
    photos = [
        np.asarray(Image.open(p).convert("RGB")).astype(np.float64)
        for p in sorted(EXAMPLES.glob("authentic*.png"))[:2]
    ]
    for levels in (1, 2, 4):
        edit = honest_edits.EDITS[f"sensor noise {levels}"]
        noises = []
        for photo in photos:
            picture = Image.fromarray(photo.astype(np.uint8))
            noisy = np.asarray(edit(picture)).astype(np.float64)
            np.testing.assert_array_equal(noisy, np.asarray(edit(picture)))
            inside = (photo > 4 * levels) & (photo < 255 - 4 * levels)  # no clipping there
            noise = (noisy - photo)[inside]
            assert abs(noise.std() - levels) < 0.1 * levels + 0.1  # + rounding's 1/sqrt(12)
            assert abs(noise.mean()) < 0.1
            noises.append(noisy - photo)
        assert not np.array_equal(noises[0], noises[1])


def test_a_bad_photo_count_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        honest_edits.main(["--bundle", str(DEMO_BUNDLE), "--per-class", "0"])
    assert "--per-class must be at least 1" in capsys.readouterr().err
