"""The stateful detector in the service: every classified query's fingerprint is matched against
its client's recent queries and everyone's (account-oblivious: Sybil ids do not help), then
stored with the answer it was served. A detection flags the client (reason ``query_attack``)
and the policy decides what the query gets:

- ``flag``: its answer, as usual;
- ``refuse`` (default): 403 ``query_refused`` (and nothing else);
- ``silent``: the answer its *anchor* was served, the earliest stored near-duplicate, so that
  neither a refusal nor a changed label tells the attacker that it was detected (OARS, CCS
  2023); the query is stored with that answer, so every later copy gets it too. Measured in
  closed loop it protects less than ``refuse``: the anchor's answer is the true one whenever the
  anchor was answered the same (docs/service.md).

One thread does all of it, a batch of queries at a time: fingerprints for the batch in one
vectorised pass, then each query matched and stored in arrival order. Measured
(bench/results/stateful_cost.md), the numpy work of fingerprinting cost 0.11 ms of CPU per query
on one thread and 0.3-0.4 ms with 8 threads doing it at once (every call hands the interpreter
lock back and forth), and the in-process store needed a lock: one owner thread has neither
cost, and the store needs no lock. Which thread:

- a store that never waits on the network (in process), with the model on the CPU: the batch
  worker, right after the guard decides the batch (``batch_screening``): no second hand-off and
  no second wake-up of the event loop per batch, and the screening never competes for the
  cores with the model's threads, since it runs between its batches;
- Redis, or a model on a GPU: its own thread (``ScreeningWorker``), so that the model never
  waits on Redis, and a GPU's batches overlap the screening (``screens_on_batch_worker``).
  With ``ADVGUARD_STATEFUL_LOOK_UP_EARLY`` a query is screened there in two steps: *looked
  up* with its model batch as the batch starts, while the model classifies it (fingerprinted;
  with Redis also stored, its answer pending, and its candidates fetched: every round trip
  but the answers' write, in one pass for the batch), then *decided* once classified. Off
  (the default) all of it follows classification. On two CPU cores the early look-up took
  the screening's round trips off the answer's path but slowed the model's forward pass beside
  it, with no throughput gain to show (docs/service.md); it is meant for a model that does not
  share the CPU.

The fingerprint, the match rule and the in-process store are ``app.core.stateful``'s; the
Redis store is ``app.service.fingerprints``. A store that fails (Redis down) fails open: the
query is answered as usual, counted as ``outcome="error"``, and Redis is not tried again for
``retry_interval_s``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from app.core.flagging import FlagPolicy
from app.core.guard import Verdict
from app.core.stateful.blends import (
    BlendBatch,
    BlendEntry,
    BlendFound,
    BlendMemory,
    BlendRule,
    InProcessBlendMemory,
    sketches,
)
from app.core.stateful.defaults import default_scheme
from app.core.stateful.match_rule import Answer, DetectionReason, DetectionRule, MatchEvidence
from app.core.stateful.schemes import WindowHashScheme
from app.core.stateful.store import FingerprintStore, InProcessFingerprintStore, StoreQuery
from app.service.batcher import Screen
from app.service.blend_memory import RedisBlendMemory
from app.service.fingerprints import Found, RedisFingerprintStore
from app.service.hashing import FingerprintHasher, is_large, stacked_on
from app.service.metrics import STATEFUL_OUTCOMES, Metrics, Outcome
from app.service.redis_connection import REDIS_ERRORS
from app.service.settings import FingerprintDevice, Settings, StatefulPolicy
from app.service.settle import settle
from app.service.state import ApiError, Service
from app.service.tracking import Observation, tracker_call

log = logging.getLogger(__name__)

QUERY_ATTACK = "query_attack"  # the flag reason of a stateful detection
MAX_SCREENING_BATCH = 64  # queries screened per pass of the worker at most

Flag = Callable[[str, str, float], bool]  # (client id, reason, at) -> newly flagged


@dataclass(frozen=True)
class QueryPrint:
    """What the detector keeps of a query: its sketch, index keys and exact-pixel digest."""

    fingerprint: np.ndarray
    keys: np.ndarray
    digest: bytes


@dataclass(eq=False)
class LookUp:
    """A query looked up before it is classified (``StatefulDetector.look_up``): its print,
    the time it is stored at and, with Redis, what the store found; ``failed``: the store
    failed (down), so the query is answered unscreened. Set and read on the screening thread
    only."""

    client_id: str
    pixels: torch.Tensor
    at: float = 0.0
    print: QueryPrint | None = None
    found: Found | None = None
    failed: bool = False


@dataclass(frozen=True)
class Pending:
    """A classified query waiting for the screening thread; its future gets the answer to
    serve, or None to refuse. Its ``observation`` (the client's statistics) is recorded on the
    screening thread once the batch is screened, before the future is set: no second thread
    hop, and the batch's updates go to the tracker together (one Redis round trip)."""

    client_id: str
    pixels: torch.Tensor
    answer: Answer
    future: asyncio.Future[Answer | None] | None = None  # None: no one waits (the replays)
    observation: Observation | None = None
    look_up: LookUp | None = None  # None: looked up when screened


@dataclass(frozen=True)
class Screened:
    """A screened batch, per query in arrival order: the answer to serve (None: refuse) and
    what the screening made of it (the ``advguard_stateful_queries_total`` outcome)."""

    served: list[Answer | None]
    outcomes: list[Outcome]
    reasons: list[DetectionReason | None]  # which part of the rule detected it (None: none)


@dataclass(frozen=True)
class Judged:
    """One query's judgement: the answer to serve (None: refuse), the answer to keep with the
    stored query instead of its own (None: its own), the outcome, and the rule's reason."""

    served: Answer | None
    kept: Answer | None
    outcome: Outcome
    reason: DetectionReason | None = None


class StatefulDetector:
    """A scheme, a rule and a store, with the store's outage handling and the policy. Only the
    thread that screens touches the store (the batch worker in process, ``ScreeningWorker``
    with Redis); ``screen_batch`` is its work."""

    def __init__(
        self,
        scheme: WindowHashScheme,
        rule: DetectionRule,
        store: FingerprintStore,
        policy: StatefulPolicy,
        metrics: Metrics | None = None,
        flag: Flag | None = None,
        *,
        retry_interval_s: float = 0.5,
        fingerprint_processes: int = 0,
        fingerprint_device: torch.device | None = None,
        blends: BlendMemory | None = None,
    ) -> None:
        self.scheme = scheme
        self.blends = blends  # the blend test's memory (None: the test is off)
        # large uploads are hashed on a GPU or worker processes (bit-identical; app.service.hashing)
        self.hasher = FingerprintHasher(scheme, fingerprint_processes, fingerprint_device)
        self.rule = rule
        self.store = store
        self.policy: StatefulPolicy = policy
        self.metrics = metrics
        self.flag = flag
        self.retry_interval_s = retry_interval_s
        self._down_until = 0.0

    def fingerprints(self, pixels: Sequence[torch.Tensor]) -> list[QueryPrint]:
        """The preprocessed pixels the model sees (each C, H, W in [0, 1]) as 8-bit values,
        hashed in one pass: the same conversion and fingerprint as the evaluation's."""
        prints = self.hasher.prints(pixels, self.spent)
        return [
            QueryPrint(prints.sketches[i], prints.keys[i], prints.digests[i])
            for i in range(len(pixels))
        ]

    def fingerprint(self, pixels: torch.Tensor) -> QueryPrint:
        return self.fingerprints([pixels])[0]

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def failed(self) -> None:
        self._down_until = time.monotonic() + self.retry_interval_s

    def screen_batch(self, batch: Sequence[Pending], write_now: bool = True) -> list[Answer | None]:
        """Per query of the batch, the answer to serve, or None to refuse (``screen``)."""
        return self.screen(batch, write_now=write_now).served

    def look_up(self, queries: Sequence[LookUp], store: bool = True) -> None:
        """What screening needs before the answer, done while the model classifies
        (``ADVGUARD_STATEFUL_LOOK_UP_EARLY``): the queries fingerprinted at once and, with Redis
        and ``store``, stored in arrival order (answers pending) and their candidates fetched
        (``RedisFingerprintStore.look_up_many``). A store that is down marks them ``failed``:
        answered unscreened. Without ``store`` (a query screened without an early look-up),
        the store checks and stores each query with its answer when it is decided."""
        prints = self.fingerprints([query.pixels for query in queries])
        at = time.time()
        for query, its_print in zip(queries, prints, strict=True):
            query.print, query.at = its_print, at
        if not store or not isinstance(self.store, RedisFingerprintStore):
            return  # in memory: decided in one go
        if not self.available():  # the store failed a moment ago: do not wait on it
            for query in queries:
                query.failed = True
            return
        started = time.perf_counter()
        try:
            found = self.store.look_up_many([self._query(query, None) for query in queries])
        except REDIS_ERRORS:
            self.failed()
            for query in queries:
                query.failed = True
            return
        finally:
            self.spent("match", time.perf_counter() - started)
        for i, query in enumerate(queries):
            query.found = None if found is None else found[i]

    @staticmethod
    def _query(looked_up: LookUp, answer: Answer | None) -> StoreQuery:
        its_print = looked_up.print
        assert its_print is not None  # looked up
        return StoreQuery(
            looked_up.client_id,
            its_print.fingerprint,
            its_print.digest,
            looked_up.at,
            answer,
            its_print.keys,
        )

    def screen(self, batch: Sequence[Pending], *, write_now: bool = True) -> Screened:
        """Match, store and judge the batch's queries in arrival order (fingerprinted here when
        not looked up before), with the store's round trips per batch, not per query: per
        query, the answer to serve (None: refuse) and the outcome. A store that fails (or
        failed at the look-up) answers those queries as usual. Queries looked up early in Redis
        get their answers written now, or with ``write_now`` False by ``write_answers`` once
        they are served (or the store's next round trip)."""
        looked_up = [
            pending.look_up or LookUp(pending.client_id, pending.pixels) for pending in batch
        ]
        fresh = [query for query in looked_up if query.print is None]
        if fresh:
            self.look_up(fresh, store=False)
        served: list[Answer | None] = [pending.answer for pending in batch]
        outcomes: list[Outcome] = ["error"] * len(batch)
        reasons: list[DetectionReason | None] = [None] * len(batch)
        available = self.available()
        judged = [i for i, query in enumerate(looked_up) if available and not query.failed]
        blends = self._recall_blends(batch, judged) if judged else None
        if blends is None and self.blends is not None:
            judged = []  # the blend memory failed: the batch is answered unscreened
        matching = time.perf_counter()
        turn = iter(judged)

        def decide(query: StoreQuery, evidence: MatchEvidence) -> Answer | None:
            i = next(turn)
            if blends is None:
                judged = self._judge(query, evidence)
            else:
                judged = self._judge(query, evidence, blends.find(i, query.client_id))
                entry = BlendEntry(blends.sketches[i], query.digest, judged.kept or query.answer)
                blends.add(query.client_id, entry)
            served[i], outcomes[i], reasons[i] = judged.served, judged.outcome, judged.reason
            return judged.kept

        queries = [self._query(looked_up[i], batch[i].answer) for i in judged]
        found = [its for i in judged if (its := looked_up[i].found) is not None]
        assert not found or len(found) == len(judged)  # a look-up stores all of its queries
        try:
            if found and isinstance(self.store, RedisFingerprintStore):
                self.store.check_and_store_many(queries, decide, found)
            elif queries:
                self.store.check_and_store_many(queries, decide)
            if blends is not None and blends.added and self.blends is not None:
                self.blends.keep(blends.added, time.time())
        except REDIS_ERRORS:
            self.failed()  # the queries not judged yet are answered as usual
        finally:
            # once per batch, not per query: a labelled counter's lookup is ~3 us a call
            for outcome in STATEFUL_OUTCOMES:
                self._count(outcome, outcomes.count(outcome))
            self.spent("match", time.perf_counter() - matching)
        if write_now:
            self.write_answers()
        return Screened(served, outcomes, reasons)

    def write_answers(self) -> None:
        """Write the answers decided for queries looked up in Redis (a failure fails open)."""
        if not isinstance(self.store, RedisFingerprintStore):
            return
        started = time.perf_counter()
        try:
            self.store.write_answers()
        except REDIS_ERRORS:
            self.failed()
        finally:
            self.spent("match", time.perf_counter() - started)

    def spent(self, part: str, seconds: float) -> None:
        """Add to the screening's time in ``part`` (``SCREENING_PARTS``)."""
        if self.metrics is not None:
            self.metrics.spent_screening(part, seconds)

    def _recall_blends(self, batch: Sequence[Pending], judged: Sequence[int]) -> BlendBatch | None:
        """With the blend test on: the judged queries (indices in ``batch``), their sketches and
        their clients' recent queries, each client's first query already searched; None when
        the test is off or its memory failed (Redis down: fails open like the store)."""
        if self.blends is None:
            return None
        clients = [batch[i].client_id for i in judged]
        started = time.perf_counter()
        try:
            recents = self.blends.recall(clients)
        except REDIS_ERRORS:
            self.failed()
            return None
        finally:
            self.spent("match", time.perf_counter() - started)
        # pooled where the pixels lie (a GPU batch's rows: only the sketches come back)
        rows = [batch[i].pixels for i in judged]
        queries = sketches(stacked_on(rows, rows[0].device), 255.0)
        searching = time.perf_counter()  # the batched search is matching too
        try:
            return BlendBatch(self.blends.rule, recents, judged, clients, queries)
        finally:
            self.spent("match", time.perf_counter() - searching)

    def _judge(
        self, query: StoreQuery, evidence: MatchEvidence, blend: BlendFound | None = None
    ) -> Judged:
        """The query's judgement; flags a detected client. An undetected near-duplicate that
        would show a class its anchor did not (``DetectionRule.keeps_anchor``) is served and
        kept with its anchor's answer under ``refuse`` and ``silent``: ``consistent``. A query
        the counts do not detect but the blend test finds (``blend``) is detected, its anchor
        the answer kept with its line's older end."""
        answer = query.answer
        assert answer is not None  # the service always stores the answer it serves
        reason = self.rule.reason(evidence, answer)
        anchor = evidence.anchor
        if reason is None and blend is not None:
            reason, anchor = "blend", blend.anchor
        if reason is None:
            anchor = evidence.consistency_basis().anchor
            if (
                self.policy != "flag"
                and anchor is not None
                and self.rule.keeps_anchor(evidence, answer)
            ):
                return Judged(anchor, anchor, "consistent")
            return Judged(answer, None, "clear")
        newly_flagged = self.flag is not None and self.flag(query.client_id, QUERY_ATTACK, query.at)
        if newly_flagged and self.metrics is not None:
            self.metrics.clients_flagged.inc()
        if self.policy == "refuse":
            return Judged(None, None, "detected", reason)
        if self.policy == "flag" or anchor is None or anchor == answer:
            return Judged(answer, None, "detected", reason)
        return Judged(anchor, anchor, "detected", reason)

    def _count(self, outcome: Outcome, n: int = 1) -> None:
        if self.metrics is not None and n > 0:
            self.metrics.stateful.labels(policy=self.policy, outcome=outcome).inc(n)

    def close(self) -> None:
        self.hasher.close()
        if isinstance(self.store, RedisFingerprintStore):
            self.store.close()
        if isinstance(self.blends, RedisBlendMemory):
            self.blends.close()


class ScreeningWorker:
    """The one thread that screens queries: it takes the first waiting item, then every other
    one already waiting (up to ``max_batch``): model batches' queries to look up as the model
    starts them (``look_up_all``, handed together to ``look_up_batch``) and classified queries
    to screen (``submit``, handed to ``screen_batch``), each kind in arrival order. Queries
    whose look-up is done are screened first, then the new look-ups run, then the queries that
    waited on them: a classified query never waits for the look-up of a later batch, and
    ``after_pass`` runs once a pass's answers are out. A query submitted after ``stop`` is not
    screened (``submit`` returns None: the caller fails open, as when the store is down);
    ``stop`` handles what is queued first.

    A batch's statistics (``track``) are recorded on a thread of their own while the batch is
    screened, and its answers wait for both: with Redis both are round trips, and one after the
    other they made a screened batch's latency (at concurrency 32 that is throughput) their sum.
    Batches are recorded in order, one at a time; both trackers are thread-safe. A batch whose
    screening fails (a bug) is still recorded: its queries were classified, and are answered 500.

    ``submit`` runs on an event loop and returns a future of that loop; a screened batch's
    futures are answered with one wake-up of the loop (``app.service.settle``)."""

    def __init__(
        self,
        screen_batch: Callable[[Sequence[Pending]], list[Answer | None]],
        max_batch: int = MAX_SCREENING_BATCH,
        track: Callable[[Sequence[Observation]], None] | None = None,
        look_up_batch: Callable[[Sequence[LookUp]], None] | None = None,
        after_pass: Callable[[], None] | None = None,
    ) -> None:
        self.screen_batch = screen_batch
        self.max_batch = max_batch
        self.track = track  # records a screened batch's observations, in order
        self.look_up_batch = look_up_batch  # None: queries are looked up when screened
        self.after_pass = after_pass  # once a pass's answers are out (writes them to Redis)
        self._queue: queue.SimpleQueue[list[LookUp] | Pending | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="advguard-screening", daemon=True)
        self._tracking = ThreadPoolExecutor(1, thread_name_prefix="advguard-tracking")

    def start(self) -> None:
        self._thread.start()

    def look_up(self, client_id: str, pixels: torch.Tensor) -> LookUp | None:
        """A query's look-up, to queue with its model batch (``look_up_all``) and then pass to
        ``submit``; None: nothing to look up early."""
        return None if self.look_up_batch is None else LookUp(client_id, pixels)

    def look_up_all(self, queries: list[LookUp]) -> None:
        """Queue a model batch's look-ups as it starts: looked up together while the model runs
        (after ``stop``, each is looked up when its query is screened)."""
        with self._lock:
            if not self._closed:
                self._queue.put(queries)

    def submit(
        self,
        client_id: str,
        pixels: torch.Tensor,
        answer: Answer,
        observation: Observation | None = None,
        looked_up: LookUp | None = None,
    ) -> asyncio.Future[Answer | None] | None:
        future: asyncio.Future[Answer | None] = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._closed:
                return None
            self._queue.put(Pending(client_id, pixels, answer, future, observation, looked_up))
        return future

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)  # after every query already queued
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():  # else it may still submit: left to the process's exit
            self._tracking.shutdown()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, last = [first], False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    last = True
                    break
                batch.append(item)
            self._serve(batch)
            if last:
                return

    def _serve(self, items: list[list[LookUp] | Pending]) -> None:
        """Screen the queries whose look-up is done, run the new look-ups, then screen the
        queries that waited on them."""
        ready: list[Pending] = []
        waited: list[Pending] = []
        for item in items:
            if isinstance(item, Pending):
                waits = item.look_up is not None and item.look_up.print is None
                (waited if waits else ready).append(item)
        if ready:
            self._screen(ready)
        looked_up = [query for item in items if isinstance(item, list) for query in item]
        if looked_up and self.look_up_batch is not None:
            try:
                self.look_up_batch(looked_up)
            except Exception:  # a bug: looked up again when screened (and failed there)
                log.exception("looking up a batch of %d failed", len(looked_up))
                for query in looked_up:
                    query.print, query.found = None, None
        if waited:
            self._screen(waited)
        if self.after_pass is not None:
            try:
                self.after_pass()
            except Exception:  # a bug: its queries were answered already
                log.exception("finishing a screening pass failed")

    def _screen(self, batch: list[Pending]) -> None:
        observations = [p.observation for p in batch if p.observation is not None]
        tracking = (
            self._tracking.submit(self.track, observations)
            if observations and self.track is not None
            else None
        )
        try:
            answers = self.screen_batch(batch)
        except Exception as exc:  # a bug, not an outage (those fail open inside): fail the batch
            log.exception("stateful screening failed for a batch of %d", len(batch))
            if tracking is not None:
                wait([tracking])
            settle([(pending.future, exc) for pending in batch if pending.future is not None])
            return
        failed: Exception | None = None
        if tracking is not None:
            try:
                tracking.result()
            except Exception as exc:  # a bug (an outage fails open inside): fail those queries
                log.exception("recording the statistics of a screened batch failed")
                failed = exc
        settle(
            [
                (
                    pending.future,
                    failed if failed is not None and pending.observation is not None else answer,
                )
                for pending, answer in zip(batch, answers, strict=True)
                if pending.future is not None
            ]
        )


def settings_scheme(settings: Settings) -> WindowHashScheme:
    """The default fingerprint salted with the settings' secret; without one (in process only:
    ``Settings`` requires a secret with Redis) a random one, so fingerprints die with the
    process."""
    given = settings.stateful_secret
    secret = given.get_secret_value().encode() if given is not None else secrets.token_bytes(32)
    return default_scheme(secret, close_radius=settings.stateful_close_radius or None)


def settings_rule(settings: Settings) -> DetectionRule:
    """The detection rule the settings give (a count of 0: that part of the rule is off)."""
    return DetectionRule(
        settings.stateful_client_matches,
        settings.stateful_global_matches,
        settings.stateful_changed_matches or None,
        settings.stateful_consistent_matches or None,
        settings.stateful_changed_rejected,
    )


def settings_store(settings: Settings, scheme: WindowHashScheme) -> FingerprintStore:
    """The fingerprint store the settings bound: in Redis when a URL is set, else in process."""
    if settings.redis_url:
        return RedisFingerprintStore(
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
    return InProcessFingerprintStore(
        scheme,
        max_fingerprints=settings.stateful_max_fingerprints,
        ttl_s=settings.stateful_ttl_s,
        per_client=settings.stateful_per_client,
        max_clients=settings.stateful_max_clients,
        client_ttl_s=settings.stateful_client_ttl_s,
    )


def settings_blends(settings: Settings) -> BlendMemory | None:
    """The blend test's memory when the settings turn the test on: in Redis beside the store
    when a URL is set, else in process. A client's kept queries live as long as both everyone's
    queries (``ADVGUARD_STATEFUL_TTL_S``) and the client's own (``ADVGUARD_STATEFUL_CLIENT_TTL_S``)
    do: they are both, and under client-id rotation a list per id would otherwise outlive the
    rest of that id's state (the soak, issue 13)."""
    if not settings.stateful_blends:
        return None
    rule = BlendRule()
    ttl_s = min(settings.stateful_ttl_s, settings.stateful_client_ttl_s)
    if settings.redis_url:
        return RedisBlendMemory(
            settings.redis_url,
            rule,
            prefix=settings.redis_prefix,
            ttl_s=ttl_s,
            timeout_s=settings.redis_timeout_s,
            cluster=settings.redis_cluster,
        )
    return InProcessBlendMemory(rule, max_clients=settings.stateful_blend_clients, ttl_s=ttl_s)


def build_stateful(
    settings: Settings,
    metrics: Metrics,
    flag: Flag,
    image_values: int,
    model_device: torch.device | None = None,
) -> StatefulDetector | None:
    """The settings' detector; None when disabled or with the guard off (nothing is tracked).
    ``flag`` flags a client (the tracker's); ``image_values``: values of one preprocessed
    upload (3 x crop x crop), which decides whether the fingerprint workers start now;
    ``model_device``: where the model runs (a GPU hashes the large uploads, ``hashing_device``)."""
    if not (settings.stateful_enabled and settings.guard_enabled):
        return None
    scheme = settings_scheme(settings)
    for outcome in STATEFUL_OUTCOMES:
        metrics.stateful.labels(policy=settings.stateful_policy, outcome=outcome)
    detector = StatefulDetector(
        scheme,
        settings_rule(settings),
        settings_store(settings, scheme),
        settings.stateful_policy,
        metrics,
        flag,
        retry_interval_s=settings.redis_retry_interval_s,
        fingerprint_processes=settings.stateful_fingerprint_processes,
        fingerprint_device=hashing_device(settings.stateful_fingerprint_device, model_device),
        blends=settings_blends(settings),
    )
    if is_large(image_values):
        detector.hasher.start()
    return detector


def hashing_device(
    choice: FingerprintDevice, model_device: torch.device | None
) -> torch.device | None:
    """Where large uploads are window-hashed (``ADVGUARD_STATEFUL_FINGERPRINT_DEVICE``): the
    model's GPU under ``auto``; None (the host: worker processes or the screening thread) for
    a model on the CPU, or under ``cpu``."""
    if choice == "auto" and model_device is not None and model_device.type != "cpu":
        return model_device
    return None


def answer_of(verdict: Verdict) -> Answer:
    """The answer the guard gives a query: what the detector stores and may serve again."""
    decision: Literal["accepted", "rejected"] = "accepted" if verdict.accepted else "rejected"
    return Answer(decision, verdict.predicted_class, verdict.probability, verdict.score)


def observation_of(client_id: str, verdict: Verdict, at: float, policy: FlagPolicy) -> Observation:
    """What the client's statistics record of a query."""
    flag_value = policy.flag_value(verdict.score, verdict.predicted_class)
    return Observation(client_id, flag_value, verdict.accepted, at)


def screens_on_batch_worker(store_blocks: bool, tracker_blocks: bool, model_device: str) -> bool:
    """Where the service screens: on the batch worker when neither the store nor the tracker
    waits on the network and the model runs on the CPU, where a screening thread of its own
    would only compete with the model's threads for the same cores (measured: 90.5% against
    86.3% of the throughput without screening, docs/service.md); else on its own thread, so
    that the model never waits on Redis, and a GPU's batches overlap the screening of the
    batch before (at ImageNet size ~2 ms of fingerprint a query, serial on the worker)."""
    return not store_blocks and not tracker_blocks and model_device == "cpu"


def batch_screening(service: Service, detector: StatefulDetector) -> Screen:
    """The batch worker's screening (``Batcher.screen``) for a store that never waits on the
    network: the batch's queries screened in arrival order, then recorded in their clients'
    statistics together, as the screening worker does (``ScreeningWorker``, beside the
    screening; here there is nothing to wait on, so nothing to overlap)."""

    def screen(queries: Sequence[tuple[str, torch.Tensor, Verdict]]) -> list[Answer | None]:
        at = time.time()
        observations = [
            observation_of(client, verdict, at, service.flag_policy)
            for client, _, verdict in queries
        ]
        served = detector.screen_batch(
            [Pending(client, pixels, answer_of(verdict)) for client, pixels, verdict in queries]
        )
        record_screened(service, observations)
        return served

    return screen


def track_all(service: Service, observations: Sequence[Observation]) -> None:
    """Record the observations in the client's statistics, counting newly flagged clients."""
    for result in service.tracker.record_many(observations):
        if result.newly_flagged:
            service.metrics.clients_flagged.inc()


def record_screened(service: Service, observations: Sequence[Observation]) -> None:
    """``track_all`` for a screened batch, its time counted as the screening's ``record``."""
    started = time.perf_counter()
    try:
        track_all(service, observations)
    finally:
        service.metrics.spent_screening("record", time.perf_counter() - started)


async def track_and_screen(
    service: Service,
    observation: Observation,
    pixels: torch.Tensor,
    answer: Answer,
    looked_up: LookUp | None = None,
) -> Answer:
    """Pass the classified query through the stateful detector (when on) and record it in the
    client's statistics: the answer it gets; raises the 403 of the ``refuse`` policy (a query
    the batch worker did not screen already: with Redis, or the detector off). With the
    detector on, the screening worker records it with the rest of its batch, while screening
    the batch (one thread hop per request: a second hop measurably cost throughput);
    otherwise it is recorded here (``tracker_call``: on the event loop for the in-process
    tracker, on a worker thread for Redis). ``looked_up``: the query's look-up
    (``ScreeningWorker.look_up``), queued before it was classified."""
    worker = service.screening
    started = time.perf_counter()
    future = (
        None
        if worker is None
        else worker.submit(observation.client_id, pixels, answer, observation, looked_up)
    )
    if future is None:
        await tracker_call(service.tracker, track_all, service, [observation])
        if worker is None:
            return answer
        policy = service.settings.stateful_policy  # shutting down: fail open
        service.metrics.stateful.labels(policy=policy, outcome="error").inc()
        return answer
    served = await future
    service.metrics.stage_seconds.labels(stage="stateful").observe(time.perf_counter() - started)
    return served_or_refused(served)


def served_or_refused(served: Answer | None) -> Answer:
    """The screened answer to serve; None (a detection under ``refuse``) raises its 403,
    whichever thread screened the query."""
    if served is None:
        raise ApiError(403, "query_refused", "this query was refused")
    return served
