"""The batcher's two-stage pipeline, on the real Guard of the demo bundle: the model worker runs
the next batch while the search worker searches the last one, the hand-off holds one batch, both
stages drain on stop, a failing search fails its batch only, and the service time per item is
the slower stage's.

Nothing here measures time: the search stage waits on a gate the test opens, and stage times are
read on a fake clock that only the stages move.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from app.core.guard import Guard
from app.core.images import decode_image
from app.service.batcher import Batcher
from tests.service.helpers import LabelledImage

WAIT_S = 30.0  # generous bound on waiting for a thread to reach a point; never a measurement


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class StagedGuard:
    """The real Guard; its forward pass "takes" ``model_s`` and its search ``search_s`` on the
    fake clock, and the search waits for ``search_gate``. Records which thread ran each stage
    and how many forward passes ran."""

    def __init__(self, real: Guard, clock: FakeClock, model_s: float, search_s: float) -> None:
        self.real, self.clock = real, clock
        self.model_s, self.search_s = model_s, search_s
        self.search_gate = threading.Event()
        self.searching = threading.Event()  # a search is waiting at the gate
        self.inferences = 0
        self.inferred = threading.Condition()
        self.threads: dict[str, set[str]] = {"model": set(), "search": set()}
        self.fail_next_search = False

    def infer(self, pixels: torch.Tensor) -> Any:
        self.threads["model"].add(threading.current_thread().name)
        result = self.real.infer(pixels)
        self.clock.now += self.model_s
        with self.inferred:
            self.inferences += 1
            self.inferred.notify_all()
        return result

    def wait_inferences(self, count: int) -> None:
        with self.inferred:
            assert self.inferred.wait_for(lambda: self.inferences >= count, WAIT_S)

    def evidence(self, batch: Any) -> Any:
        self.threads["search"].add(threading.current_thread().name)
        self.searching.set()
        assert self.search_gate.wait(WAIT_S), "the test never opened the search gate"
        self.clock.now += self.search_s
        if self.fail_next_search:
            self.fail_next_search = False
            raise RuntimeError("the index broke")
        return self.real.evidence(batch)

    def decide(self, batch: Any, scores: Any) -> Any:
        return self.real.decide(batch, scores)

    def explain(self, batch: Any, evidence: Any, rows: Any) -> Any:
        return self.real.explain(batch, evidence, rows)


@pytest.fixture
def pixels(guard: Guard, test_images: list[LabelledImage]) -> list[torch.Tensor]:
    return [guard.pixels(decode_image(image.data)) for image in test_images[:6]]


def _alone(guard: Guard, pixels: list[torch.Tensor]) -> list[Any]:
    """Each image's verdict in a batch of its own (the batchers here batch one at a time)."""
    return [guard.classify_pixels(p[None])[0] for p in pixels]


def _batcher(staged: StagedGuard, clock: FakeClock, pipelined: bool = True) -> Batcher:
    return Batcher(
        staged,  # type: ignore[arg-type]
        max_batch_size=1,
        max_wait_s=0.0,
        clock=clock,
        pipelined=pipelined,
    )


def test_the_model_runs_the_next_batch_while_the_last_is_searched(
    guard: Guard, pixels: list[torch.Tensor]
) -> None:
    clock = FakeClock()
    staged = StagedGuard(guard, clock, model_s=1.0, search_s=0.0)
    batcher = _batcher(staged, clock)
    batcher.start()
    try:
        futures = [batcher.submit(pixels[0])]
        assert staged.searching.wait(WAIT_S)  # the first batch is held in the search stage
        futures += [batcher.submit(p) for p in pixels[1:5]]
        # meanwhile: the second batch ran the model (overlap) and waits in the hand-off, the
        # third ran the model and waits to be handed off; no further batch runs
        staged.wait_inferences(3)
        time.sleep(0.2)  # room for a fourth forward pass, if the hand-off were unbounded
        assert staged.inferences == 3
        assert not any(f.done() for f in futures)
        staged.search_gate.set()
        results = [f.result(WAIT_S) for f in futures]
    finally:
        batcher.stop()
    assert staged.threads == {"model": {"advguard-batcher"}, "search": {"advguard-search"}}
    assert [r.verdict for r in results] == _alone(guard, pixels[:5])
    assert all(r.model_s == pytest.approx(1.0) for r in results)


def test_stop_drains_both_stages(guard: Guard, pixels: list[torch.Tensor]) -> None:
    clock = FakeClock()
    staged = StagedGuard(guard, clock, model_s=0.0, search_s=0.0)
    batcher = _batcher(staged, clock)
    batcher.start()
    futures = [batcher.submit(p) for p in pixels]
    assert staged.searching.wait(WAIT_S)
    stopping = threading.Thread(target=batcher.stop)
    stopping.start()
    staged.search_gate.set()
    stopping.join(WAIT_S)
    assert not stopping.is_alive() and not batcher.running
    assert [f.result(0).verdict for f in futures] == _alone(guard, pixels)


def test_a_failed_search_fails_its_batch_only(guard: Guard, pixels: list[torch.Tensor]) -> None:
    clock = FakeClock()
    staged = StagedGuard(guard, clock, model_s=0.0, search_s=0.0)
    staged.fail_next_search = True
    staged.search_gate.set()
    batcher = _batcher(staged, clock)
    batcher.start()
    try:
        failed = batcher.submit(pixels[0])
        with pytest.raises(RuntimeError, match="the index broke"):
            failed.result(WAIT_S)
        served = batcher.submit(pixels[1]).result(WAIT_S)
        assert batcher.running
    finally:
        batcher.stop()
    assert [served.verdict] == _alone(guard, pixels[1:2])


def test_service_time_per_item_is_the_slower_stage(
    guard: Guard, pixels: list[torch.Tensor]
) -> None:
    """With the stages side by side, a batch costs the slower stage, not the sum: that is what
    admission's expected wait multiplies."""
    clock = FakeClock()
    staged = StagedGuard(guard, clock, model_s=1.0, search_s=3.0)
    staged.search_gate.set()
    batcher = _batcher(staged, clock)
    batcher.start()
    try:
        result = batcher.submit(pixels[0]).result(WAIT_S)
    finally:
        batcher.stop()
    assert (result.model_s, result.search_s) == (pytest.approx(1.0), pytest.approx(3.0))
    assert batcher.item_seconds == pytest.approx(3.0)
    assert batcher.expected_latency_s(1) == pytest.approx(6.0)


def test_without_the_search_worker_one_thread_runs_both_stages_in_turn(
    guard: Guard, pixels: list[torch.Tensor]
) -> None:
    """``ADVGUARD_SEARCH_WORKER=false``: the model worker searches each batch itself, so no
    forward pass runs while a search is held; the answers are the same."""
    clock = FakeClock()
    staged = StagedGuard(guard, clock, model_s=1.0, search_s=3.0)
    batcher = _batcher(staged, clock, pipelined=False)
    batcher.start()
    try:
        futures = [batcher.submit(pixels[0])]
        assert staged.searching.wait(WAIT_S)
        futures.append(batcher.submit(pixels[1]))
        time.sleep(0.2)  # room for a second forward pass, if the stages overlapped
        assert staged.inferences == 1
        staged.search_gate.set()
        results = [f.result(WAIT_S) for f in futures]
    finally:
        batcher.stop()
    assert staged.threads == {"model": {"advguard-batcher"}, "search": {"advguard-batcher"}}
    assert [r.verdict for r in results] == _alone(guard, pixels[:2])
    assert batcher.item_seconds == pytest.approx(4.0)  # in turn: the stages' sum
