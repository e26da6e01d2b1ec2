"""bench.search_selection on 48 CIFAR-10 test images through the demo bundle: both searches
give the same neighbours and decisions, and the report renders. No timing is asserted."""

from __future__ import annotations

import argparse

import numpy as np

from app.core import search
from app.core.guard import Guard
from bench.common import faiss_selection_only
from bench.load_service import test_jpegs as cifar_test_jpegs
from bench.search_selection import (
    markdown,
    pixels_of,
    score_both_ways,
    the_vote,
    time_both,
)
from tests.conftest import DEMO_BUNDLE


def test_both_searches_agree_on_real_features_and_the_report_renders() -> None:
    guard = Guard.load(DEMO_BUNDLE, device="cpu")
    scored = score_both_ways(guard, pixels_of(guard, cifar_test_jpegs(48)))
    assert scored["images"] == 48
    assert scored["decisions_changed"] == 0
    assert scored["neighbours"]["ids_unexplained"] == 0
    assert scored["neighbours"]["out_of_tol"] == 0
    vote = the_vote(guard)
    queries = scored.pop("queries")
    assert queries.shape == (48, vote.layer.index.d)
    raw = time_both(vote.layer.index, queries, vote.k, [4, 16], rounds=2, min_s=0.0)
    assert set(raw) == {"4", "16"} and all(
        len(v) == 2 for row in raw.values() for v in row.values()
    )
    timing = {
        "k": vote.k,
        "vectors": search.index_size(vote.layer.index),
        "dim": int(vote.layer.index.d),
        "batches": {
            b: {
                "faiss_median_ms": float(np.median(r["faiss"])),
                "threshold_median_ms": float(np.median(r["threshold"])),
            }
            for b, r in raw.items()
        },
    }
    args = argparse.Namespace(bundle=DEMO_BUNDLE, rounds=2)
    text = markdown(args, timing, scored)
    assert "| 16 |" in text and "**0 of 48**" in text


def test_the_reference_switch_restores_the_threshold_selection() -> None:
    before = search.THRESHOLD_SELECTION_MIN_K
    with faiss_selection_only():
        assert search.THRESHOLD_SELECTION_MIN_K > 10**12
    assert before == search.THRESHOLD_SELECTION_MIN_K
