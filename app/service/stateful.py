"""The stateful detector in the service: every classified query's fingerprint is matched against
its client's recent queries and everyone's (account-oblivious: Sybil ids do not help), then
stored with the answer it was served. A detection flags the client (reason ``query_attack``)
and the policy decides what the query gets:

- ``flag``: its answer, as usual;
- ``refuse``: 403 ``query_refused`` (and nothing else);
- ``silent`` (default): the answer its *anchor* was served, the earliest stored near-duplicate,
  so that neither a refusal nor a changed label tells the attacker that it was detected (OARS,
  CCS 2023); the query is stored with that answer, so every later copy gets it too.

The fingerprint, the match rule and the in-process store are ``app.core.stateful``'s; the
Redis store is ``app.service.fingerprints``. A store that fails (Redis down) fails open: the
query is answered as usual, counted as ``outcome="error"``, and Redis is not tried again for
``retry_interval_s``.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from starlette.concurrency import run_in_threadpool

from app.core.stateful import (
    Answer,
    DetectionRule,
    FingerprintStore,
    InProcessFingerprintStore,
    MatchEvidence,
    Stored,
    WindowHashScheme,
    default_scheme,
    eight_bit,
    pixel_digests,
)
from app.service.fingerprints import RedisFingerprintStore
from app.service.metrics import STATEFUL_OUTCOMES, Metrics
from app.service.settings import Settings, StatefulPolicy
from app.service.state import ApiError, Service
from app.service.tracking import REDIS_ERRORS, Observation

QUERY_ATTACK = "query_attack"  # the flag reason of a stateful detection


@dataclass(frozen=True)
class QueryPrint:
    """What the detector keeps of a query: its sketch, index keys and exact-pixel digest."""

    fingerprint: np.ndarray
    keys: np.ndarray
    digest: bytes


@dataclass(frozen=True)
class Screening:
    detected: bool
    evidence: MatchEvidence
    stored: Stored


class StatefulDetector:
    """A scheme, a rule and a store, with the store's outage handling."""

    def __init__(
        self,
        scheme: WindowHashScheme,
        rule: DetectionRule,
        store: FingerprintStore,
        policy: StatefulPolicy,
        *,
        retry_interval_s: float = 0.5,
        locked: bool = True,
    ) -> None:
        self.scheme = scheme
        self.rule = rule
        self.store = store
        self.policy: StatefulPolicy = policy
        self.retry_interval_s = retry_interval_s
        # the in-process store is not thread-safe; Redis scripts are atomic on their own
        self._lock: threading.Lock | None = threading.Lock() if locked else None
        self._down_until = 0.0

    def fingerprint(self, pixels: torch.Tensor) -> QueryPrint:
        """The preprocessed pixels the model sees (C, H, W in [0, 1]) as 8-bit values, hashed:
        the same conversion and fingerprint as the evaluation's."""
        image = eight_bit(pixels.detach().cpu().numpy())[None]
        sketches, keys = self.scheme.fingerprints_and_keys(image)
        return QueryPrint(sketches[0], keys[0], pixel_digests(image)[0])

    def _guarded(self) -> threading.Lock | _NoLock:
        return self._lock if self._lock is not None else _NoLock()

    def screen(self, client_id: str, query: QueryPrint, answer: Answer, at: float) -> Screening:
        """Match and store; raises ``REDIS_ERRORS`` (the caller fails open)."""
        with self._guarded():
            evidence, stored = self.store.check_and_store(
                client_id, query.fingerprint, query.digest, at, answer, query.keys
            )
        return Screening(self.rule.detects(evidence), evidence, stored)

    def relabel(self, stored: Stored, answer: Answer) -> None:
        with self._guarded():
            self.store.relabel(stored, answer)

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def failed(self) -> None:
        self._down_until = time.monotonic() + self.retry_interval_s

    def close(self) -> None:
        if isinstance(self.store, RedisFingerprintStore):
            self.store.close()


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


def build_stateful(settings: Settings, metrics: Metrics) -> StatefulDetector | None:
    """The settings' detector; None when disabled or with the guard off (nothing is tracked)."""
    if not (settings.stateful_enabled and settings.guard_enabled):
        return None
    given = settings.stateful_secret
    # in process only (Settings requires a secret with Redis): fingerprints die with the process
    secret = given.get_secret_value().encode() if given is not None else secrets.token_bytes(32)
    scheme = default_scheme(secret)
    rule = DetectionRule(settings.stateful_client_matches, settings.stateful_global_matches)
    store: FingerprintStore
    if settings.redis_url:
        store = RedisFingerprintStore(
            settings.redis_url,
            scheme,
            prefix=settings.redis_prefix,
            max_fingerprints=settings.stateful_max_fingerprints,
            ttl_s=settings.stateful_ttl_s,
            per_client=settings.stateful_per_client,
            client_ttl_s=settings.stateful_client_ttl_s,
            timeout_s=settings.redis_timeout_s,
            cluster=settings.redis_cluster,
        )
    else:
        store = InProcessFingerprintStore(
            scheme,
            max_fingerprints=settings.stateful_max_fingerprints,
            ttl_s=settings.stateful_ttl_s,
            per_client=settings.stateful_per_client,
            max_clients=settings.stateful_max_clients,
            client_ttl_s=settings.stateful_client_ttl_s,
        )
    for outcome in STATEFUL_OUTCOMES:
        metrics.stateful.labels(policy=settings.stateful_policy, outcome=outcome)
    return StatefulDetector(
        scheme,
        rule,
        store,
        settings.stateful_policy,
        retry_interval_s=settings.redis_retry_interval_s,
        locked=not settings.redis_url,
    )


def _screen(service: Service, client_id: str, query: QueryPrint, answer: Answer) -> Answer | None:
    """In a worker thread: match, store, flag and (silent) re-store; the answer to serve, or
    None to refuse. Counts the outcome."""
    detector = service.stateful
    assert detector is not None
    metrics = service.metrics
    outcome = metrics.stateful.labels(policy=detector.policy, outcome="error")
    if not detector.available():
        outcome.inc()
        return answer
    at = time.time()
    try:
        screening = detector.screen(client_id, query, answer, at)
    except REDIS_ERRORS:
        detector.failed()
        outcome.inc()
        return answer
    if not screening.detected:
        metrics.stateful.labels(policy=detector.policy, outcome="clear").inc()
        return answer
    metrics.stateful.labels(policy=detector.policy, outcome="detected").inc()
    if service.tracker.flag(client_id, QUERY_ATTACK, at):
        metrics.clients_flagged.inc()
    if detector.policy == "refuse":
        return None
    anchor = screening.evidence.anchor
    if detector.policy == "flag" or anchor is None or anchor == answer:
        return answer
    try:
        detector.relabel(screening.stored, anchor)
    except REDIS_ERRORS:
        detector.failed()
    return anchor


def _track_and_screen(
    service: Service, observation: Observation, query: QueryPrint | None, answer: Answer
) -> Answer | None:
    """In one worker thread (one hand-off per request, not two): the client's statistics, then
    the stateful detector; the answer to serve, or None to refuse."""
    if service.tracker.record(observation).newly_flagged:
        service.metrics.clients_flagged.inc()
    if service.stateful is None or query is None:
        return answer
    started = time.perf_counter()
    served = _screen(service, observation.client_id, query, answer)
    service.metrics.stage_seconds.labels(stage="stateful").observe(time.perf_counter() - started)
    return served


async def track_and_screen(
    service: Service, observation: Observation, query: QueryPrint | None, answer: Answer
) -> Answer:
    """Record the classified query and pass it through the stateful detector: the answer it
    gets; raises the 403 of the ``refuse`` policy."""
    served = await run_in_threadpool(_track_and_screen, service, observation, query, answer)
    if served is None:
        raise ApiError(403, "query_refused", "this query was refused")
    return served
