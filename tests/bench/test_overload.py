"""The overload benchmark's tally of a burst's answers (the burst itself needs a served port:
``python -m bench.overload``)."""

from __future__ import annotations

import pytest

from bench.overload import BurstTally


def test_a_burst_tally_counts_each_outcome_and_the_retry_after_values() -> None:
    tally = BurstTally()
    tally.answer(200, None, "app;dur=12.5", 0.020)
    tally.answer(200, None, None, 0.040)  # no Server-Timing: no in-app time
    tally.answer(503, "2", None, 0.001)
    tally.answer(503, None, None, 0.003)  # a 503 without Retry-After is counted as such
    tally.answer(403, None, None, 0.002)  # neither served nor shed
    tally.transport_errors += 1
    summary = tally.summary(issued=6, seconds=2.0)
    assert summary["statuses"] == {"200": 2, "503": 2, "403": 1}
    assert summary["served"] == 2 and summary["refused_503"] == 2
    assert summary["retry_after_values_on_503"] == {"2": 1, "missing": 1}
    assert summary["transport_errors"] == 1
    assert summary["served_per_s"] == 1.0 and summary["offered_per_s"] == 3.0
    assert summary["served_latency_ms_max"] == 40.0
    assert summary["served_in_app_ms_p50"] == 12.5
    assert summary["refused_latency_ms_p99"] == pytest.approx(2.98, abs=0.05)


def test_a_burst_with_nothing_served_has_no_latencies() -> None:
    summary = BurstTally().summary(issued=0, seconds=1.0)
    assert summary["served"] == 0 and summary["served_latency_ms_p50"] is None
    assert summary["served_in_app_ms_p99"] is None and summary["refused_latency_ms_p50"] is None
