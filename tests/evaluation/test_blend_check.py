"""evaluation.blend_check: a real HopSkipJump run through the demo guard is flagged by its
first blends, honest clients are counted per kind, and the report shows every row."""

from __future__ import annotations

import numpy as np

from app.core.guard import Guard
from app.core.stateful.blends import BlendRule
from app.core.stateful.hashes import pixel_digests
from evaluation.blend_check import (
    RunBlend,
    attack_runs,
    first_blend,
    honest_flags,
    report,
    summarise_runs,
)
from evaluation.data import ImageSplit
from evaluation.stateful_replay import Timeline


def test_hopskipjump_through_the_guard_is_flagged_within_its_first_queries(
    guard: Guard, labelled: tuple[np.ndarray, np.ndarray]
) -> None:
    pixels, labels = labelled
    split = ImageSplit(pixels, labels, [str(i) for i in range(len(labels))], guard.class_names)
    attacked = np.arange(2)
    runs = attack_runs(guard, "hopskipjump", split, attacked, [0, 1], 40, 0, BlendRule())
    for run in runs:
        assert run.queries == 40 and run.stopped == "cap"
        # the original, the natural start(s), then the binary search's first midpoint
        assert run.first_blend is not None and run.first_blend <= 6
        assert run.before_success


def test_first_blend_is_the_midpoint_of_the_first_two_distinct_queries() -> None:
    rng = np.random.default_rng(0)
    x, s = rng.integers(0, 256, size=(2, 3, 32, 32))
    mid = np.round((x + s) / 2)
    queries = np.stack([x, x, s, mid]).astype(np.uint8)  # a resend of x on the way
    assert first_blend(queries, BlendRule()) == 4
    photos = rng.integers(0, 256, size=(6, 3, 32, 32)).astype(np.uint8)
    assert first_blend(photos, BlendRule()) is None


def test_honest_flags_counts_clients_per_kind_with_an_interval() -> None:
    rng = np.random.default_rng(2)
    x, s = rng.integers(0, 256, size=(2, 3, 32, 32))
    blends = [x, s, np.round(0.3 * x + 0.7 * s)]
    photos = list(rng.integers(0, 256, size=(3, 3, 32, 32)))
    images = np.stack(blends + photos).astype(np.uint8)
    clients = ["a"] * 3 + ["b"] * 3
    kinds = ["burst"] * 3 + ["plain"] * 3
    traffic = Timeline(clients, kinds, images, pixel_digests(images))  # type: ignore[arg-type]
    counts = honest_flags(traffic, BlendRule())
    assert counts["burst"]["clients"] == 1 and counts["burst"]["flagged"] == 1
    assert counts["plain"]["clients"] == 1 and counts["plain"]["flagged"] == 0
    assert counts["viral"] == {"clients": 0, "flagged": 0, "interval": [0.0, 1.0]}
    low, high = counts["plain"]["interval"]
    assert low == 0.0 and 0.5 < high < 1.0


def test_the_report_has_a_row_per_attack_and_per_kind() -> None:
    runs = [
        RunBlend(1, 40, 3, None, "cap"),
        RunBlend(2, 40, 12, 9, "cap"),
        RunBlend(3, 9, None, 9, "success"),
    ]
    summary = summarise_runs(runs)
    assert summary["flagged"] == 2 and summary["flagged_before_success"] == 1
    assert summary["median_queries_to_flag"] == 7.5 and summary["flagged_by_10th"] == 1
    assert summary["succeeded_within_cap"] == 2
    text = report(
        {
            "rule": {"max_residual": 0.5, "min_separation": 8.0, "min_novelty": 0.3, "window": 8},
            "first_image": 400,
            "images": 3,
            "cap": 40,
            "attacks": {"hopskipjump": summary},
            "honest": {"judging": {"burst": {"clients": 9, "flagged": 0, "interval": [0.0, 0.3]}}},
            "command": "python -m evaluation.blend_check",
        }
    )
    assert "| hopskipjump | 3 | 2 | 1 | 7.5 | 1 | 2 |" in text
    assert "| judging | burst | 9 | 0 | 0.00-30.00% |" in text
    assert "picks 400-402" in text
