"""bench.decode_contention: every step timed alone and beside a busy thread, written out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import common, decode_contention


def test_a_short_run_writes_each_step_alone_and_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert decode_contention.main(["--uploads", "2", "--rounds", "1", "--torch-threads", "1"]) == 0
    results = json.loads((tmp_path / "decode_contention.json").read_text())
    medians = results["median_ms"]
    assert len(medians) == 5
    assert all(ms["alone"] > 0 and ms["busy"] > 0 for ms in medians.values())
    assert (
        "| image_to_pixels (resize, crop, conversion) |"
        in (tmp_path / "decode_contention.md").read_text()
    )


def test_the_two_conversions_must_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison refuses to time a conversion that gives other values than torchvision's."""
    data = decode_contention.jpegs(1, (40, 40))
    preset = decode_contention.PRESETS["cifar"]
    assert len(decode_contention.steps(data, preset)) == 5
    monkeypatch.setattr(
        decode_contention, "eight_bit_to_pixels", lambda image: decode_contention.torch.zeros(1)
    )
    with pytest.raises(AssertionError, match="differs"):
        decode_contention.steps(data, preset)
