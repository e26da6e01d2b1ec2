"""Every Prometheus metric of the service, defined once, in a registry of its own per app.

Names are prefixed ``advguard_`` and in base units (seconds); no metric carries a per-client
label. Dashboards and alert rules are written against these exact names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

DECISIONS = ("accepted", "rejected", "unguarded", "error")  # unguarded: the guard is off
# why a classification was refused with 503 overloaded: too many in flight, expected wait over
# the latency budget, waited past the budget (never run), batcher queue full
SHED_REASONS = ("in_flight", "expected_wait", "expired", "queue_full")
STAGES = ("decode", "queue", "model", "search", "stateful", "total")
# the screening's work, by part: the batch's 8-bit pixels (stacked, rounded), their window
# hashes (on worker processes for large uploads), the matching and storing of its queries, the
# recording of their clients' statistics
SCREENING_PARTS = ("pixels", "hash", "match", "record")
# what the stateful detector made of a query: no attack seen, detected, served its anchor's
# answer without a detection (a near-duplicate that would show a class its anchor did not:
# DetectionRule.keeps_anchor), or its store failed (the query answered as usual: fail open)
Outcome = Literal["clear", "detected", "consistent", "error"]
STATEFUL_OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)

# Scores live in [0, 1]: v2's are combined p-values, the demo bundle's acceptance threshold
# 0.0143 (its 2% of authentic images lie below it), the paper's vote ~0.163; both ends of the
# low range are bucketed finely so a heatmap shows where traffic falls around either threshold.
SCORE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
    0.15, 0.163, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
)  # fmt: skip
STAGE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "advguard_requests_total",
            "Classification requests by decision (error: refused or failed)",
            ["decision"],
            registry=r,
        )
        self.http_responses = Counter(
            "advguard_http_responses_total", "HTTP responses by status code", ["status"], registry=r
        )
        self.score = Histogram(
            "advguard_score",
            "kNN score of the predicted class",
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "advguard_stage_seconds",
            "Time spent per stage of a classification",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "advguard_batch_size", "Images per model batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "advguard_queue_depth", "Images waiting for the batcher", registry=r
        )
        self.flagged_clients = Gauge(
            "advguard_flagged_clients", "Clients currently flagged", registry=r
        )
        self.tracker_errors = Counter(
            "advguard_tracker_errors_total",
            "Failed tracker operations and dropped buffered updates",
            registry=r,
        )
        self.tracker_buffered = Gauge(
            "advguard_tracker_buffered_updates",
            "Tracker updates waiting for Redis to come back",
            registry=r,
        )
        self.bundle = Info("advguard_bundle", "The bundle being served", registry=r)
        self.clients_flagged = Counter(
            "advguard_clients_flagged_total", "Clients newly flagged", registry=r
        )
        self.shed = Counter(
            "advguard_shed_total",
            "Classifications refused with 503 overloaded, by reason",
            ["reason"],
            registry=r,
        )
        self.stateful = Counter(
            "advguard_stateful_queries_total",
            "Queries checked by the stateful detector, by policy and outcome",
            ["policy", "outcome"],
            registry=r,
        )
        self.screening_seconds = Counter(
            "advguard_screening_seconds_total",
            "Time the query screening spent, by part; its rate is the share of one thread it "
            "keeps busy (1: the screening is the bottleneck); with a Redis tracker, the record "
            "part runs on a thread of its own, beside the rest",
            ["part"],
            registry=r,
        )
        self.seconds_per_image = Gauge(
            "advguard_seconds_per_image",
            "Measured model and search time per image (weighted mean of batch time / size)",
            registry=r,
        )
        for decision in DECISIONS:
            self.requests.labels(decision=decision)
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
        for reason in SHED_REASONS:
            self.shed.labels(reason=reason)
        for part in SCREENING_PARTS:
            self.screening_seconds.labels(part=part)

    def spent_screening(self, part: str, seconds: float) -> None:
        """Add ``seconds`` to the query screening's time in ``part`` (``SCREENING_PARTS``)."""
        self.screening_seconds.labels(part=part).inc(seconds)

    def bind(
        self,
        queue_depth: Callable[[], float],
        buffered: Callable[[], float],
        flagged: Callable[[], float],
    ) -> None:
        """Gauges read at scrape time from the live objects."""
        self.queue_depth.set_function(queue_depth)
        self.tracker_buffered.set_function(buffered)
        self.flagged_clients.set_function(flagged)
