"""Micro-batching: one worker thread owns the Guard (model and index) and serves a bounded queue.

Requests put their pixels on the queue and wait on a future of their event loop (``submit`` runs
on the loop; the worker answers a batch with one wake-up of it: ``app.service.settle``). The
worker takes the first waiting item, then gathers more until it has ``max_batch_size`` or
``max_wait_s`` has passed since the first, and runs one forward pass and one index search for
the whole batch (the forward pass only when ``guarded`` is false: the guard is off), then, with
a ``screen`` (the stateful detector, when its store never waits on the network), screens the
batch's queries. With a ``before_run``, the batch's look-ups (what its items were submitted
with) go to it as the batch starts: the stateful detector's screening thread looks them up
while the model runs them. FAISS GPU indexes are not thread-safe, so the index is only ever
touched by this thread. A full queue refuses at once (the route answers 503 with
Retry-After); ``stop`` refuses new work and drains what is queued.

Latency budget (``budget_s``): an item that has waited longer than that in the queue when a
batch could take it is never run: its future fails with ``DeadlineExceededError`` (503 +
Retry-After) and its place in the batch goes to the next item. The worker measures its service
time per item (batch time / batch size, an exponentially weighted mean) so that admission can
refuse at once a request whose expected wait is already over the budget (``expected_latency_s``).
The budget is fixed (``latency_budget_s``) or, by default, ``auto_budget_batches`` full batches
at the measured time per image: no refusal that full batches could absorb, and no queue longer
than that many batch times, whatever the hardware.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from app.core import search
from app.core.explain import Explanation
from app.core.guard import Classification, Guard, Verdict
from app.core.stateful.match_rule import Answer
from app.service.settle import settle

# ADVGUARD_LATENCY_BUDGET_MS unset: a budget of this many full batches at the measured time per
# image (see docs/reliability.md, Overload)
AUTO_BUDGET_BATCHES = 2.0

# weight of the newest batch in the service time per item: ~the last 5-10 batches count
ITEM_TIME_ALPHA = 0.2


# Screens a guarded batch's queries on the worker, in arrival order: (client id, pixels, verdict)
# each -> the answer to serve each, or None to refuse (the stateful detector's, when its store
# never waits on the network: app.service.stateful.batch_screening)
Screen = Callable[[Sequence[tuple[str, torch.Tensor, Verdict]]], list[Answer | None]]


class QueueFullError(Exception):
    """The batcher's queue is full: try again later."""


class BatcherClosedError(Exception):
    """The batcher is shutting down and takes no more work."""


class DeadlineExceededError(Exception):
    """The item waited past its deadline before a batch could take it: it was not run."""


@dataclass(frozen=True)
class BatchResult:
    verdict: Classification  # a ``Verdict`` (score, threshold, accepted) when guarded
    queue_s: float
    model_s: float
    search_s: float
    batch_size: int
    explanation: Explanation | None = None  # when submitted with explain=True and guarded
    screened: bool = False  # screened on the worker (``Batcher.screen``): ``served`` holds
    served: Answer | None = None  # the answer to serve, or None to refuse
    screen_s: float = 0.0  # the batch's screening time
    # the item's pixels as the model's GPU holds them (None on the CPU): screened from there,
    # with no second copy of the batch to the device
    model_pixels: torch.Tensor | None = None


@dataclass
class _Item:
    pixels: torch.Tensor
    future: asyncio.Future[BatchResult]
    enqueued: float
    deadline: float | None
    explain: bool = False
    client_id: str | None = None  # screened on the worker when it has a ``screen``
    look_up: Any = None  # handed to ``before_run`` with the rest of its batch


def _noop_count(_size: int) -> None:
    return None


class Batcher:
    def __init__(
        self,
        guard: Guard,
        max_batch_size: int = 32,
        max_wait_s: float = 0.005,
        queue_size: int = 256,
        on_batch: Callable[[int], None] = _noop_count,
        guarded: bool = True,
        latency_budget_s: float | None = None,
        auto_budget_batches: float | None = None,
        on_expired: Callable[[int], None] = _noop_count,
        clock: Callable[[], float] = time.perf_counter,
        search_threads: int | None = None,
        screen: Screen | None = None,
    ):
        self.guard = guard
        self.screen = screen  # set before ``start``: the worker then screens guarded batches
        # set before ``start``: gets a batch's look-ups as it starts (``submit``'s ``look_up``)
        self.before_run: Callable[[list[Any]], None] | None = None
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self.on_expired = on_expired
        self.guarded = guarded
        self.latency_budget_s = latency_budget_s  # fixed longest wait in the queue
        self.auto_budget_batches = auto_budget_batches  # else this many full batches; None: off
        self.clock = clock  # deadlines and queue times are on this clock
        # faiss's CPU search threads, set on the worker (OpenMP keeps the setting per thread);
        # None: OpenMP's default (one per core). ``search_threads_in_use``: read back there
        self.search_threads = search_threads
        self.search_threads_in_use: int | None = None
        self._item_s: float | None = None
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=queue_size)
        self._closed = threading.Event()
        self._submit_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="advguard-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def qsize(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._closed.is_set()

    @property
    def item_seconds(self) -> float | None:
        """Measured service time per item (model and search; an exponentially weighted mean of
        batch time / batch size); None before the first batch."""
        return self._item_s

    def budget_s(self) -> float | None:
        """The latency budget now: the fixed one, else ``auto_budget_batches`` full batches at
        the measured time per image; None when off (or nothing measured yet)."""
        if self.latency_budget_s is not None:
            return self.latency_budget_s
        item_s = self._item_s
        if self.auto_budget_batches is None or item_s is None:
            return None
        return self.auto_budget_batches * self.max_batch_size * item_s

    def expected_latency_s(self, ahead: int) -> float:
        """Expected time until a new item is answered with ``ahead`` items in front of it
        (queued, in the running batch, or on their way to the queue): (ahead + 1) x the measured
        time per item; 0 before the first batch."""
        item_s = self._item_s
        return 0.0 if item_s is None else (ahead + 1) * item_s

    def submit(
        self,
        pixels: torch.Tensor,
        explain: bool = False,
        client_id: str | None = None,
        look_up: Any = None,
    ) -> asyncio.Future[BatchResult]:
        """Queue one image, from a running event loop: the future of that loop that gets its
        result. ``explain`` also computes its evidence (``app.core.explain``) in the worker, the
        one thread that may search the index. With ``client_id`` and a ``screen``, a guarded
        result is also screened there (``BatchResult.screened``). ``look_up``: handed to
        ``before_run`` when its batch starts (an item never run is never handed)."""
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        with self._submit_lock:
            if self._closed.is_set():
                raise BatcherClosedError("the service is shutting down")
            now = self.clock()
            budget = self.budget_s()
            deadline = None if budget is None else now + budget
            try:
                item = _Item(pixels, future, now, deadline, explain, client_id, look_up)
                self._queue.put_nowait(item)
            except queue.Full:
                raise QueueFullError("the classification queue is full") from None
        return future

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, finish everything already queued, then end the worker."""
        with self._submit_lock:
            self._closed.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _take(self, item: _Item) -> bool:
        """Whether the item goes into the batch: not cancelled (its client went away; read on
        this thread, so one cancelled meanwhile still runs, unanswered), and not past its
        deadline (then its future fails with DeadlineExceededError: stale work is never run)."""
        if item.future.cancelled():
            return False
        now = self.clock()
        if item.deadline is not None and now > item.deadline:
            waited = now - item.enqueued
            message = f"waited {waited * 1000:.0f} ms for the model, past the latency budget"
            settle([(item.future, DeadlineExceededError(message))])
            self.on_expired(1)
            return False
        return True

    def _gather(self, first: _Item) -> list[_Item]:
        batch = [first]
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                item = (
                    self._queue.get_nowait()
                    if remaining <= 0
                    else self._queue.get(timeout=remaining)
                )
            except queue.Empty:
                break
            if self._take(item):
                batch.append(item)
        return batch

    def _run(self) -> None:
        if self.search_threads is not None:
            search.set_threads(self.search_threads)
        self.search_threads_in_use = search.threads()
        while True:
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                if self._closed.is_set():
                    return
                continue
            if self._take(first):
                self._process(self._gather(first))

    def _process(self, batch: list[_Item]) -> None:
        started = self.clock()
        try:
            if self.before_run is not None:
                look_ups = [item.look_up for item in batch if item.look_up is not None]
                if look_ups:
                    self.before_run(look_ups)
            pixels = torch.stack([item.pixels for item in batch])
            results: list[Classification]
            explanations: dict[int, Explanation] = {}
            on_device: torch.Tensor | None = None
            if self.guarded:
                pixels = self.guard.on_device(pixels)
                on_device = None if pixels.device.type == "cpu" else pixels
                features = self.guard.infer(pixels)
                after_model = self.clock()
                evidence = self.guard.evidence(features)
                after_search = self.clock()
                results = list(self.guard.decide(features, evidence.scores))
                rows = [i for i, item in enumerate(batch) if item.explain]
                explained = self.guard.explain(features, evidence, rows)
                explanations = dict(zip(rows, explained, strict=True))
            else:  # guard off: the forward pass only, no index search
                results = self.guard.classify(pixels)
                after_model = after_search = self.clock()
            served = self._screened(batch, results)
            after_screen = self.clock()
        except Exception as exc:  # the worker must survive anything a batch throws
            settle([(item.future, exc) for item in batch])
            return
        item_s = (after_screen - started) / len(batch)
        previous = self._item_s
        self._item_s = (
            item_s if previous is None else previous + ITEM_TIME_ALPHA * (item_s - previous)
        )
        self.on_batch(len(batch))
        settle(
            [
                (
                    item.future,
                    BatchResult(
                        verdict=result,
                        queue_s=started - item.enqueued,
                        model_s=after_model - started,
                        search_s=after_search - after_model,
                        batch_size=len(batch),
                        explanation=explanations.get(row),
                        screened=row in served,
                        served=served.get(row),
                        screen_s=after_screen - after_search,
                        model_pixels=None if on_device is None else on_device[row],
                    ),
                )
                for row, (item, result) in enumerate(zip(batch, results, strict=True))
            ]
        )

    def _screened(
        self, batch: list[_Item], results: list[Classification]
    ) -> dict[int, Answer | None]:
        """Row -> the answer to serve (None: refuse), for the batch's guarded items submitted
        with a client id, screened in arrival order; empty without a ``screen``."""
        if self.screen is None:
            return {}
        rows: list[int] = []
        queries: list[tuple[str, torch.Tensor, Verdict]] = []
        for row, (item, result) in enumerate(zip(batch, results, strict=True)):
            if item.client_id is not None and isinstance(result, Verdict):
                rows.append(row)
                queries.append((item.client_id, item.pixels, result))
        if not rows:
            return {}
        return dict(zip(rows, self.screen(queries), strict=True))
