"""The stateful evaluation's command (evaluation.stateful_eval) end to end on the demo bundle and
real CIFAR-10 photos, and the bad counts and remote URL it refuses before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.core.guard import Guard
from evaluation.honest_traffic import (
    TrafficPlan,
)
from evaluation.query_oracles import GuardOracle
from evaluation.query_runs import (
    records_path,
    run_attack,
    save_records,
)
from evaluation.stateful_eval import main as stateful_eval_main
from evaluation.stateful_replay import (
    honest_timeline,
)
from tests.conftest import CIFAR_TAR, DEMO_BUNDLE


@pytest.mark.slow
def test_stateful_eval_end_to_end(
    guard: Guard, labelled: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """``python -m evaluation.stateful_eval`` on a tiny recorded Square attack (3 images, with
    and without the guard) and 3 honest clients of each kind: every stage runs, the report is
    written, and the chosen candidate's replays are the recorded runs."""
    images, labels = labelled
    pool = images[labels != labels[0]]
    cache = tmp_path / "cache"
    for setting, guarded in (("guard_off", False), ("guard_on", True)):
        oracle = GuardOracle(guard, guarded=guarded)
        records = [
            run_attack(oracle, "square", images[i], int(labels[i]), 40, 0, i, pool)
            for i in range(3)
        ]
        save_records(records, records_path(cache, "square", setting))
    scheme = "window_hash step=25 shared>=25"
    out = tmp_path / "out"
    argv = [
        "--bundle", str(DEMO_BUNDLE), "--source", str(CIFAR_TAR), "--cache", str(cache),
        "--data-cache", str(tmp_path / "data"), "--out", str(out), "--clients", "3",
        "--horizon", "40", "--schemes", scheme, "--threads", "1",
    ]  # fmt: skip
    assert stateful_eval_main(argv) == 0
    summary = json.loads((out / "stateful.json").read_text())
    assert summary["chosen"] == scheme and summary["honest_plan"]["clients"] == 3
    result = summary["schemes"][scheme]
    for setting in ("square/guard_off", "square/guard_on"):
        for spread in ("single", "sybil"):  # one client id, and the Sybil spread
            assert len(result["outcomes"][setting][spread]) == 3
    assert "outcomes" not in summary["chosen_counts_only"]
    assert summary["cost"]["fingerprint_ms"] > 0 and summary["cost"]["bytes_per_fingerprint"] > 0
    assert summary["command"].startswith("python -m evaluation.stateful_eval")
    assert scheme in (out / "stateful.md").read_text()
    # the honest traffic, read back from its cache: each viral sender's one copy of a viral
    # photo is marked, and nothing else is
    plan = TrafficPlan(clients=3)
    for split, seed in (("train", 0), ("test", 1)):
        traffic = honest_timeline(guard, CIFAR_TAR, split, cache, tmp_path / "data", plan, seed)
        marked = [i for i in range(len(traffic.clients)) if traffic.is_circulating(i)]
        assert sorted(traffic.clients[i] for i in marked) == [
            f"{split}-viral-{c}" for c in range(3)
        ]


def test_counts_below_one_and_a_remote_url_are_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cap of 0 used to replace the recorded runs in --cache with empty ones, then crash."""
    from evaluation.query_attacks import main

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "square-guard_off.npz").write_bytes(b"recorded")
    base = ["--cache", str(cache), "--out", str(tmp_path / "out")]
    for extra, message in (
        (["--cap-square", "0"], "argument --cap-square: expected at least 1, got 0"),
        (["--images", "-1"], "argument --images: expected at least 1, got -1"),
        (["--url", "http://192.168.0.1:8000"], "is not a loopback address"),
        (["--out", str(cache / "square-guard_off.npz")], "exists and is not a directory"),
    ):
        with pytest.raises(SystemExit) as exited:
            main([*base, *extra])
        assert exited.value.code == 2
        assert message in capsys.readouterr().err
    assert (cache / "square-guard_off.npz").read_bytes() == b"recorded"
    assert not (tmp_path / "out").exists()
