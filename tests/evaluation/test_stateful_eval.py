"""The honest look-alike traffic and the stateful replay (evaluation.honest_traffic,
evaluation.stateful_eval) on the demo bundle and real CIFAR-10 photos: calibration, false flags,
an attack's replay, the command end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from app.core.guard import Guard
from app.core.stateful.defaults import DEFAULT_RULE, default_scheme
from evaluation.honest_traffic import (
    HonestQuery,
    TrafficKind,
    TrafficPlan,
    as_served,
    encode,
    interleave,
    to_pil,
)
from evaluation.query_oracles import GuardOracle
from evaluation.query_runs import (
    records_path,
    run_attack,
    save_records,
)
from evaluation.stateful_eval import (
    CALIBRATION_BUDGET,
    HonestCounts,
    LazyAnswers,
    LazyFingerprints,
    calibrate,
    false_flags,
    honest_timeline,
    replay_attack,
    summarise_outcomes,
)
from evaluation.stateful_eval import _viral_note as viral_note
from evaluation.stateful_eval import main as stateful_eval_main
from tests.conftest import CIFAR_TAR, DEMO_BUNDLE


def test_honest_queries_are_what_the_service_sees(
    guard: Guard, labelled: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = labelled
    png = as_served(encode(to_pil(images[0]), None), guard.preset)
    assert np.array_equal(png, images[0])  # a 32x32 PNG passes unchanged
    big = as_served(encode(to_pil(images[0]).resize((64, 64)), 90), guard.preset)
    assert big.shape == (3, 32, 32) and big.dtype == np.uint8


def test_interleave_keeps_each_clients_order() -> None:
    image = np.zeros((3, 2, 2), np.uint8)
    clients = [[HonestQuery(f"c{c}", "plain", image + i) for i in range(5)] for c in range(4)]
    merged = list(interleave(clients, seed=0))
    assert len(merged) == 20
    for c in range(4):
        mine = [int(q.image[0, 0, 0]) for q in merged if q.client == f"c{c}"]
        assert mine == list(range(5))


def test_replay_detects_a_recorded_attack(
    guard: Guard, labelled: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = labelled
    record = run_attack(
        GuardOracle(guard, False),
        "hopskipjump",
        images[2],
        int(labels[2]),
        120,
        0,
        2,
        images[labels != labels[2]],
    )
    scheme = default_scheme(b"s")
    rule = DEFAULT_RULE
    lazy = LazyFingerprints(scheme, record.queries, guard)
    served = LazyAnswers(record, guard, guarded=False)
    single = replay_attack(scheme, rule, record, lazy, served, 1, 120)
    spread = replay_attack(scheme, rule, record, lazy, served, 50, 120)
    assert single.detection is not None and single.detection <= 30
    assert spread.detection is not None
    summary = summarise_outcomes([single, spread])
    assert summary["detected"] == 2 and summary["runs"] == 2
    # the answers the replay stores are the ones the attack was given, checked query by query
    assert served[0].decision == "unguarded" and served[0].class_index == record.classes[0]
    tampered = dataclasses.replace(record, classes=(record.classes + 1) % 10)
    with pytest.raises(ValueError, match="another bundle"):
        LazyAnswers(tampered, guard, guarded=False)[0]
    with pytest.raises(ValueError, match="another bundle"):  # guarded: the decision differs
        LazyAnswers(record, guard, guarded=True)[0]


def test_calibration_sets_each_count_one_above_the_honest_highest() -> None:
    counts = HonestCounts(
        kind={"a": "plain", "b": "burst", "c": "viral"},
        client_max={"a": 0, "b": 4, "c": 0},
        global_max={"a": 1, "b": 4, "c": 3},
        changed_max={"a": 0, "b": 2, "c": 0},
    )
    no_flags = {"plain": 0.0, "resend": 0.0, "burst": 0.0, "viral": 0.0}
    rule = calibrate(counts, budget=no_flags)
    assert (rule.client_matches, rule.global_matches, rule.changed_matches) == (5, 5, 3)
    assert calibrate(counts, changed=False).changed_matches is None
    assert all(f["flagged"] == 0 for f in false_flags(counts, rule).values())
    stricter = dataclasses.replace(rule, changed_matches=2)  # b changed an answer at 2
    assert false_flags(counts, stricter)["burst"]["flagged"] == 1
    # a budget of one burst client in one lets the changed-answer count drop to 1 (b is flagged,
    # a and c never changed an answer); the near-duplicate counts still flag nobody
    one_burst = {**no_flags, "burst": 1.0}
    assert calibrate(counts, budget=one_burst) == dataclasses.replace(rule, changed_matches=1)
    # the default budget rounds down: 0.5% of one client allows none
    assert calibrate(counts) == rule


def test_calibration_budget_counts_clients_per_kind() -> None:
    kinds: dict[str, TrafficKind] = {f"b{i}": "burst" for i in range(400)}
    kinds.update({f"p{i}": "plain" for i in range(400)})
    changed = {c: (1 if c in {"b0", "b1", "p0"} else 0) for c in kinds}
    zeros = dict.fromkeys(kinds, 0)
    counts = HonestCounts(kinds, zeros, zeros, changed)
    # two bursts of 400 in a 0.5% budget (2 allowed) but one plain client of 400 in 0.05% (none)
    assert calibrate(counts).changed_matches == 2
    counts = HonestCounts(kinds, zeros, zeros, {**changed, "p0": 0})
    assert calibrate(counts).changed_matches == 1
    assert calibrate(counts, budget={**CALIBRATION_BUDGET, "burst": 0.004}).changed_matches == 2


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


def test_viral_false_flags_are_bounded_per_photo_not_per_sender() -> None:
    """Senders of the same few photos are not independent samples: with none flagged, the
    bound is over the photos (0 of 4: Wilson 0-49%), never the senders' 0.38%."""
    none = viral_note(1000, 0, 4)
    assert "per photo 0 of 4, 95% interval 0%-49%" in none and "0.38" not in none
    some = viral_note(1000, 3, 4)
    assert "3 senders were flagged" in some and "interval" not in some.split("holds. ")[1]


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
