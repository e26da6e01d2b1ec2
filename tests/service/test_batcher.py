"""The batch worker's screening hook (``Batcher.screen``): the stateful detector runs on the
worker, right after the guard decides a batch, when its store never waits on the network."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import pytest
import torch

from app.core.guard import Guard, Verdict
from app.core.stateful.match_rule import Answer
from app.service.batcher import Batcher, BatcherClosedError, BatchResult, QueueFullError
from tests.service.helpers import LoopThread

Query = tuple[str, torch.Tensor, Verdict]


def _one_batch(
    batcher: Batcher, loop_thread: LoopThread, pixels: list[torch.Tensor], **per_item: list[Any]
) -> list[BatchResult]:
    """Start the batcher, submit the four pixels with ``per_item``'s keyword values (one list
    per keyword, a value per image), collect the results, stop. The worker waits up to its
    ``max_wait_s`` (30 s in these tests) to fill a batch of 4: the four make one batch."""
    batcher.start()
    try:
        submit = partial(loop_thread.call, batcher.submit)
        futures = [
            submit(p, **{key: values[i] for key, values in per_item.items()})
            for i, p in enumerate(pixels)
        ]
        return [loop_thread.result(f) for f in futures]
    finally:
        batcher.stop()


def test_a_batchs_queries_with_a_client_id_are_screened_on_the_worker_in_arrival_order(
    guard: Guard, pixels: list[torch.Tensor], loop_thread: LoopThread
) -> None:
    screened: list[tuple[str, list[str]]] = []  # (thread, client ids) per call

    def screen(queries: Sequence[Query]) -> list[Answer | None]:
        screened.append((threading.current_thread().name, [q[0] for q in queries]))
        # refuse the second client's query, answer the others with class 7
        return [
            None if client == "b" else Answer("accepted", 7, 0.5, verdict.score)
            for client, _, verdict in queries
        ]

    batcher = Batcher(guard, max_batch_size=4, max_wait_s=30.0, screen=screen)
    results = _one_batch(batcher, loop_thread, pixels, client_id=["a", None, "b", "a"])
    assert screened == [("advguard-batcher", ["a", "b", "a"])]
    assert [r.screened for r in results] == [True, False, True, True]
    assert results[2].served is None  # refused
    for r in (results[0], results[3]):
        assert r.served is not None and r.served.class_index == 7
        assert r.screen_s >= 0.0
    assert results[1].served is None  # not screened
    expected = guard.classify_pixels(torch.stack(pixels))
    assert [r.verdict.predicted_class for r in results] == [v.predicted_class for v in expected]


def test_a_failing_screen_fails_its_batch_and_the_worker_goes_on(
    guard: Guard, pixels: list[torch.Tensor], loop_thread: LoopThread
) -> None:
    calls: list[int] = []

    def screen(queries: Sequence[Query]) -> list[Answer | None]:
        calls.append(len(queries))
        if len(calls) == 1:
            raise RuntimeError("a bug in the screening")
        return [None for _ in queries]

    batcher = Batcher(guard, max_batch_size=1, max_wait_s=0.0, screen=screen)
    batcher.start()
    try:
        submit = partial(loop_thread.call, batcher.submit)
        with pytest.raises(RuntimeError, match="a bug in the screening"):
            loop_thread.result(submit(pixels[0], client_id="a"))
        after = loop_thread.result(submit(pixels[1], client_id="a"))
        unscreened = loop_thread.result(submit(pixels[2]))
    finally:
        batcher.stop()
    assert calls == [1, 1]
    assert after.screened and after.served is None
    assert not unscreened.screened


def test_the_guard_off_screens_nothing(
    guard: Guard, pixels: list[torch.Tensor], loop_thread: LoopThread
) -> None:
    def screen(queries: Sequence[Query]) -> list[Answer | None]:
        raise AssertionError("an unguarded result was screened")

    batcher = Batcher(guard, max_batch_size=1, max_wait_s=0.0, guarded=False, screen=screen)
    batcher.start()
    try:
        result = loop_thread.result(loop_thread.call(batcher.submit, pixels[0], client_id="a"))
    finally:
        batcher.stop()
    assert not result.screened and not isinstance(result.verdict, Verdict)


def test_a_batchs_look_ups_go_to_before_run_together_before_the_model_runs(
    guard: Guard, pixels: list[torch.Tensor], loop_thread: LoopThread
) -> None:
    """``before_run`` gets a batch's look-ups (its items submitted with one) in one call as the
    batch starts, before the forward pass: the screening thread looks them up meanwhile."""
    events: list[tuple[str, list[str]]] = []
    real_infer = guard.infer

    def infer(batch: torch.Tensor) -> object:
        events.append(("model", [str(len(batch))]))
        return real_infer(batch)

    guard.infer = infer  # type: ignore[method-assign]
    batcher = Batcher(guard, max_batch_size=4, max_wait_s=30.0)
    batcher.before_run = lambda look_ups: events.append(("look up", list(look_ups)))
    try:
        results = _one_batch(batcher, loop_thread, pixels, look_up=["q0", None, "q2", "q3"])
    finally:
        guard.infer = real_infer  # type: ignore[method-assign]
    assert events == [("look up", ["q0", "q2", "q3"]), ("model", ["4"])]
    assert all(isinstance(r.verdict, Verdict) for r in results)


class _SlowGuard:
    """Stands in for a Guard: records batch sizes, blocks until released."""

    def __init__(self, real: Guard) -> None:
        self.real = real
        self.sizes: list[int] = []
        self.release = __import__("threading").Event()

    def on_device(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.real.on_device(pixels)

    def infer(self, pixels: torch.Tensor):  # type: ignore[no-untyped-def]
        self.release.wait(10)
        self.sizes.append(int(pixels.shape[0]))
        return self.real.infer(pixels)

    def score(self, batch):  # type: ignore[no-untyped-def]
        return self.real.score(batch)

    def evidence(self, batch):  # type: ignore[no-untyped-def]
        return self.real.evidence(batch)

    def explain(self, batch, evidence, rows):  # type: ignore[no-untyped-def]
        return self.real.explain(batch, evidence, rows)

    def decide(self, batch, scores):  # type: ignore[no-untyped-def]
        return self.real.decide(batch, scores)


def test_batcher_batches_bounds_and_drains(guard: Guard, loop_thread: LoopThread) -> None:
    slow = _SlowGuard(guard)
    batcher = Batcher(slow, max_batch_size=4, max_wait_s=0.05, queue_size=6)  # type: ignore[arg-type]
    batcher.start()
    pixels = torch.rand(3, 32, 32)
    submit = partial(loop_thread.call, batcher.submit, pixels)
    futures = [submit()]
    time.sleep(0.1)  # the worker holds the first item, blocked in infer
    futures += [submit() for _ in range(6)]
    with pytest.raises(QueueFullError):
        submit()
    slow.release.set()
    batcher.stop()  # drains everything queued
    with pytest.raises(BatcherClosedError):
        submit()
    results = [loop_thread.result(f, timeout=10) for f in futures]
    assert slow.sizes == [1, 4, 2]
    assert [r.batch_size for r in results] == [1, 4, 4, 4, 4, 2, 2]
    first = results[0].verdict
    assert all(r.verdict.predicted_class == first.predicted_class for r in results)
    assert all(r.verdict.score == pytest.approx(first.score, abs=1e-5) for r in results)
