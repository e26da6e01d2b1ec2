"""``evaluation.consistency_cost``: honest traffic through the service's own detector, and what
the consistent count replaced, per kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.core.guard import Guard
from app.core.stateful.defaults import DEFAULT_RULE
from app.core.stateful.hashes import pixel_digests
from app.core.stateful.match_rule import Answer, DetectionRule
from evaluation.consistency_cost import replaced, report, serve_through_detector, summarise
from evaluation.stateful_replay import Timeline
from tests.conftest import DEMO_BUNDLE
from tests.core.stateful.probes import photos, square_step  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def guard() -> Guard:
    torch.set_num_threads(1)
    return Guard.load(DEMO_BUNDLE, device="cpu")


def test_a_class_changing_copy_is_served_its_anchors_class_and_counted(
    guard: Guard,
    photos: np.ndarray,  # noqa: F811
) -> None:
    """A burst client's near-exact copy whose class changes hears its anchor's class (one
    answer replaced, nobody refused); with the consistent count off it hears the model's own;
    an unrelated photo of another client with another class is not touched."""
    step = square_step(photos[3], np.random.default_rng(0))
    images = np.stack([photos[3], step, photos[7]])
    traffic = Timeline(["a", "a", "b"], ["burst", "burst", "plain"], images, pixel_digests(images))
    cat, dog = Answer("accepted", 3, 0.9, 0.5), Answer("accepted", 5, 0.8, 0.4)
    answers = [cat, dog, dog]
    outcome = serve_through_detector(guard, traffic, answers, DEFAULT_RULE)
    assert outcome.served == [cat, cat, dog]
    assert [replaced(o, s) for o, s in zip(outcome.own, outcome.served, strict=True)] == [
        False,
        True,
        False,
    ]
    counts = summarise(traffic, outcome)
    intervals = {"clients_replaced_wilson95": None, "clients_flagged_wilson95": None}
    assert counts["burst"] | intervals == {
        "queries": 2,
        "replaced": 1,
        "replaced_share": 0.5,
        "refused": 0,
        "clients": 1,
        "clients_replaced": 1,
        "clients_replaced_wilson95": None,
        "clients_flagged": 0,
        "clients_flagged_wilson95": None,
        "clients_flagged_by_first_reason": {
            "client_matches": 0,
            "global_matches": 0,
            "changed_answer": 0,
            "blend": 0,
        },
        "clients_flagged_at_circulating": 0,
    }
    assert outcome.reasons == [None, None, None]
    assert counts["plain"]["replaced"] == 0 and counts["resend"]["queries"] == 0
    off = DetectionRule(5, 5, changed_matches=2)
    assert serve_through_detector(guard, traffic, answers, off).served == answers


def test_the_report_states_the_ship_rule_and_each_kind() -> None:
    kinds = ("plain", "resend", "burst", "viral")
    row = {
        "queries": 200,
        "replaced": 3,
        "replaced_share": 0.015,
        "refused": 0,
        "clients": 10,
        "clients_replaced": 2,
        "clients_replaced_wilson95": [0.05, 0.5],
        "clients_flagged": 1,
        "clients_flagged_wilson95": [0.01, 0.4],
        "clients_flagged_by_first_reason": {
            "client_matches": 0,
            "global_matches": 1,
            "changed_answer": 0,
        },
        "clients_flagged_at_circulating": 1,
    }
    summary = {
        "rule": [5, 5, 2, 1],
        "close_radius": 9,
        "max_fingerprints": None,
        "judging": dict.fromkeys(kinds, row),
        "calibration": dict.fromkeys(kinds, row),
        "ships": False,
        "command": "python -m evaluation.consistency_cost",
    }
    text = report(summary)
    assert "rule 5, 5, 2, 1" in text and "missed: off by default" in text
    assert "block means within 9 grey levels, a saturated difference" in text
    assert "no close copies" in report(summary | {"close_radius": 0})
    assert "one store holding every query" in text
    assert (
        "viral photo (the others at one of their own photos): 1 of the 1 flagged in the test"
        in text
    )
    assert "a ring of the last 50,000" in report(summary | {"max_fingerprints": 50_000})
    assert "counting rejections" not in text and "the blend test," not in text
    assert "(client, global, changed, consistent), the blend test, " in report(
        summary | {"blends": True}
    )
    counting = report(summary | {"changed_includes_rejected": True})
    assert "(client, global, changed, consistent), the changed answer counting rejections" in (
        counting
    )
    row_text = (
        "| 200 | 3 | 1.50% | 0 | 2 of 10 | 5.00-50.00% | 1 of 10 | 1.00-40.00% | 0 / 1 / 0 / 0 |"
    )
    assert text.count(row_text) == 8


def test_a_client_is_flagged_by_everyones_copies_unless_the_ring_has_let_them_go(
    guard: Guard,
    photos: np.ndarray,  # noqa: F811
) -> None:
    """Five other clients' distinct near-duplicates of a photo flag a sixth client who sends
    it, by everyone's count, while every query is kept; a ring of two holds only the fifth copy
    and an unrelated photo when the sixth client's arrives, and does not flag it."""
    rng = np.random.default_rng(1)
    copies = [square_step(photos[3], rng) for _ in range(5)]
    images = np.stack([*copies, photos[7], photos[3]])
    clients = ["a", "b", "c", "d", "e", "f", "g"]
    circulating = [False] * 6 + [True]  # the sixth client's photo as a viral copy
    traffic = Timeline(
        clients, ["burst"] * 5 + ["plain"] * 2, images, pixel_digests(images), circulating
    )
    cat = Answer("accepted", 3, 0.9, 0.5)
    answers = [cat] * 7
    kept_all = serve_through_detector(guard, traffic, answers, DEFAULT_RULE)
    assert kept_all.served[-1] is None and kept_all.reasons[-1] == "global_matches"
    plain = summarise(traffic, kept_all)["plain"]
    assert plain["clients_flagged_by_first_reason"] == {
        "client_matches": 0,
        "global_matches": 1,
        "changed_answer": 0,
        "blend": 0,
    }
    assert plain["clients_flagged_at_circulating"] == 1
    ring = serve_through_detector(guard, traffic, answers, DEFAULT_RULE, max_fingerprints=2)
    assert ring.served[-1] == cat and ring.reasons[-1] is None
