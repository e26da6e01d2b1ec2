"""Answering a batch of waiting requests from a worker thread with one wake-up of their loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.service.settle import settle


def test_a_batch_is_settled_in_one_call_on_its_loop() -> None:
    """``settle`` wakes each loop once per batch, not once per future; a future cancelled
    meanwhile (its client left) is skipped, and a closed loop (shut down) is not an error."""
    wakeups: list[int] = []

    async def run() -> tuple[list[str | None], bool]:
        loop = asyncio.get_running_loop()
        wake = loop.call_soon_threadsafe

        def counted(callback: Any, *args: Any) -> Any:
            if getattr(callback, "__name__", "") == "_settle_now":  # not to_thread's own
                wakeups.append(len(args[0]))
            return wake(callback, *args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        futures = [loop.create_future() for _ in range(5)]
        futures[2].cancel()
        outcomes = [(f, None if i == 1 else "abcde"[i]) for i, f in enumerate(futures)]
        await asyncio.to_thread(settle, [*outcomes[:4], (futures[4], RuntimeError("x"))])
        answered = [await f for i, f in enumerate(futures) if i not in (2, 4)]
        with pytest.raises(RuntimeError, match="x"):
            await futures[4]
        return answered, futures[2].cancelled()

    answered, cancelled = asyncio.run(run())
    assert wakeups == [5]
    assert answered == ["a", None, "d"] and cancelled
    closed = asyncio.new_event_loop()
    late = closed.create_future()
    closed.close()
    settle([(late, "a")])  # nobody waits: no error
    assert not late.done()
