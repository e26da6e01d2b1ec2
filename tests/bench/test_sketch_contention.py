"""bench.sketch_contention: each setting timed, and what a sketching thread starts, written out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import common, sketch_contention


def test_a_short_run_writes_every_setting_and_the_threads_torchs_pooling_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    threads_before = torch.get_num_threads()
    try:
        assert (
            sketch_contention.main(
                ["--batch", "4", "--passes", "2", "--rounds", "1", "--torch-threads", "2"]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads_before)
    forward = json.loads((tmp_path / "sketch_contention.json").read_text())["forward"]
    assert list(forward) == list(sketch_contention.SETTINGS)
    assert all(setting["median_ms"] > 0 for setting in forward.values())
    alone, torchs, todays = (forward[name] for name in sketch_contention.SETTINGS)
    assert alone["threads_gained"] == 0
    assert torchs["threads_gained"] >= 1  # torch's pooling starts the thread's own team
    assert todays["threads_gained"] == 0  # numpy's does not
    assert "| beside sketches (today's) |" in (tmp_path / "sketch_contention.md").read_text()
