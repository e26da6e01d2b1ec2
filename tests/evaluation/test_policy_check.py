"""The live policy check's bookkeeping (the live runs themselves need a service and Redis)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from app.core.guard import Guard
from evaluation.policy_check import (
    ImageCheck,
    replay_predictions,
    summarise,
    truly_adversarial,
    withheld,
)
from evaluation.query_attacks import DECISIONS, AttackRecord, GuardOracle
from tests.conftest import DEMO_BUNDLE

EXAMPLES = Path(__file__).resolve().parents[2] / "app" / "service" / "static" / "examples"


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
        ImageCheck(1, True, True, 5, 0, True),
        ImageCheck(2, False, False, 1000, 990, True),  # stopped on a silent answer's lie
        ImageCheck(3, False, True, 40, 12, True),
    ]
    summary = summarise(checks)
    assert (summary["images"], summary["live_success"], summary["predicted_success"]) == (3, 2, 1)
    assert summary["believed_success"] == 3
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


def test_a_success_counts_only_when_the_guard_itself_is_fooled() -> None:
    """Under silent the served answer may be the anchor's: the attack stops on what it was
    told, and the check asks the guard itself about that query."""
    guard = Guard.load(DEMO_BUNDLE, device="cpu")
    noise = np.random.default_rng(1).integers(0, 256, size=(1, 3, 32, 32), dtype=np.uint8)
    photos = [  # the demo page's authentic examples: the bundle accepts them
        np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
        for path in sorted(EXAMPLES.glob("authentic-*.png"))
    ]
    queries = np.concatenate([np.stack(photos), noise])
    own = GuardOracle(guard).ask(queries)
    assert sum(a.decision == "accepted" for a in own) == 3

    def record(first_success: int, label: int) -> AttackRecord:
        n = len(queries)
        return AttackRecord(
            attack="boundary",
            row=0,
            label=label,
            original=queries[0],
            queries=queries,
            decisions=np.zeros(n, dtype=np.int8),
            classes=np.full(n, -1, dtype=np.int16),
            probabilities=np.full(n, np.nan, dtype=np.float32),
            first_success=first_success,
            stopped="success" if first_success >= 0 else "cap",
            seconds=0.0,
        )

    assert not truly_adversarial(record(-1, 0), guard)
    for i, answer in enumerate(own):
        if answer.decision == "accepted":
            assert answer.class_index is not None
            assert truly_adversarial(record(i, (answer.class_index + 1) % 10), guard)
            assert not truly_adversarial(record(i, answer.class_index), guard)
        else:  # rejected: no class, nothing to hold
            assert not truly_adversarial(record(i, 0), guard)
