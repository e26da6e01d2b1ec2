"""The live policy check's bookkeeping (the live runs themselves need a service and Redis)."""

from __future__ import annotations

import numpy as np

from app.core.guard import Guard
from evaluation.policy_check import ImageCheck, replay_predictions, summarise, withheld
from evaluation.query_attacks import DECISIONS, AttackRecord, GuardOracle
from tests.conftest import DEMO_BUNDLE


def test_predictions_follow_the_replay_of_each_run_in_order() -> None:
    stateful = {
        "chosen": "fp",
        "schemes": {
            "fp": {
                "outcomes": {
                    "square/guard_on": {
                        "single": [[2, 7, 3], [3, 7, None], [3, 7, 9], [None, None, 4]]
                    }
                }
            }
        },
    }
    assert replay_predictions(stateful, "square") == [True, False, False, True]


def test_summary_counts_agreement_per_image() -> None:
    checks = [
        ImageCheck(1, True, True, 5, 0),
        ImageCheck(2, False, False, 1000, 990),
        ImageCheck(3, False, True, 40, 12),
    ]
    summary = summarise(checks)
    assert (summary["images"], summary["live_success"], summary["predicted_success"]) == (3, 2, 1)
    assert summary["same_outcome"] == 2 and summary["per_image"][1]["answers_withheld"] == 990


def test_withheld_counts_answers_that_differ_from_the_guards_own() -> None:
    guard = Guard.load(DEMO_BUNDLE, device="cpu")
    rng = np.random.default_rng(0)
    queries = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
    own = GuardOracle(guard).ask(queries)
    decisions = [DECISIONS.index(a.decision) for a in own]
    classes = [-1 if a.class_index is None else a.class_index for a in own]
    decisions[1] = DECISIONS.index("refused")  # what a 403 under refuse records
    classes[1] = -1
    record = AttackRecord(
        attack="square",
        row=0,
        label=0,
        original=queries[0],
        queries=queries,
        decisions=np.array(decisions, dtype=np.int8),
        classes=np.array(classes, dtype=np.int16),
        probabilities=np.full(3, np.nan, dtype=np.float32),
        first_success=-1,
        stopped="cap",
        seconds=0.0,
    )
    assert withheld(record, guard) == 1
