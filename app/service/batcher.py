"""Micro-batching: one worker thread owns the Guard (model and index) and serves a bounded queue.

Requests put their pixels on the queue and wait on a future. The worker takes the first waiting
item, then gathers more until it has ``max_batch_size`` or ``max_wait_s`` has passed since the
first, and runs one forward pass and one index search for the whole batch. FAISS GPU indexes are
not thread-safe, so the index is only ever touched by this thread. A full queue refuses at once
(the route answers 503 with Retry-After); ``stop`` refuses new work and drains what is queued.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from app.core.guard import Guard, Verdict


class QueueFullError(Exception):
    """The batcher's queue is full: try again later."""


class BatcherClosedError(Exception):
    """The batcher is shutting down and takes no more work."""


@dataclass(frozen=True)
class BatchResult:
    verdict: Verdict
    queue_s: float
    model_s: float
    search_s: float
    batch_size: int


@dataclass
class _Item:
    pixels: torch.Tensor
    future: Future[BatchResult]
    enqueued: float


def _noop_batch(_size: int) -> None:
    return None


class Batcher:
    def __init__(
        self,
        guard: Guard,
        max_batch_size: int = 32,
        max_wait_s: float = 0.005,
        queue_size: int = 256,
        on_batch: Callable[[int], None] = _noop_batch,
    ):
        self.guard = guard
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
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

    def submit(self, pixels: torch.Tensor) -> Future[BatchResult]:
        future: Future[BatchResult] = Future()
        with self._submit_lock:
            if self._closed.is_set():
                raise BatcherClosedError("the service is shutting down")
            try:
                self._queue.put_nowait(_Item(pixels, future, time.perf_counter()))
            except queue.Full:
                raise QueueFullError("the classification queue is full") from None
        return future

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, finish everything already queued, then end the worker."""
        with self._submit_lock:
            self._closed.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

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
            batch.append(item)
        return batch

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                if self._closed.is_set():
                    return
                continue
            batch = [
                item for item in self._gather(first) if item.future.set_running_or_notify_cancel()
            ]
            if batch:
                self._process(batch)

    def _process(self, batch: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            features = self.guard.infer(torch.stack([item.pixels for item in batch]))
            after_model = time.perf_counter()
            scores = self.guard.score(features)
            after_search = time.perf_counter()
            verdicts = self.guard.decide(features, scores)
        except Exception as exc:  # the worker must survive anything a batch throws
            for item in batch:
                item.future.set_exception(exc)
            return
        self.on_batch(len(batch))
        for item, verdict in zip(batch, verdicts, strict=True):
            item.future.set_result(
                BatchResult(
                    verdict=verdict,
                    queue_s=started - item.enqueued,
                    model_s=after_model - started,
                    search_s=after_search - after_model,
                    batch_size=len(batch),
                )
            )
