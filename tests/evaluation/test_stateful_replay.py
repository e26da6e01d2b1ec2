"""The stateful experiment's parts (evaluation.stateful_replay): a recorded attack replayed through
a fresh store is detected; the calibration sets each count one above the honest highest and
counts its budget per traffic kind."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from app.core.guard import Guard
from app.core.stateful.defaults import DEFAULT_RULE, default_scheme
from evaluation.honest_traffic import (
    TrafficKind,
)
from evaluation.query_oracles import GuardOracle
from evaluation.query_runs import (
    run_attack,
)
from evaluation.stateful_replay import (
    CALIBRATION_BUDGET,
    HonestCounts,
    LazyAnswers,
    LazyFingerprints,
    calibrate,
    false_flags,
    replay_attack,
    summarise_outcomes,
)


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
