"""Answering requests that wait on the event loop from a worker thread, a batch at a time.

The batch worker and the screening thread (Redis) each answer a batch of requests at once.
Answering each request's ``concurrent.futures`` future, awaited through ``asyncio.wrap_future``,
woke the event loop once per request (a write to its self-pipe, and the interpreter lock
handed over each time). Measured on 2 cores under load (docs/service.md, micro-batching): one
wake-up per batch saved about 0.23 ms of CPU per request in the batch worker and 0.1-0.2 ms in
the screening thread.

So the workers' ``submit`` runs on the loop and returns a future of that loop, and a worker
answers a whole batch with ``settle``: one call on each loop its futures belong to.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def settle(outcomes: Sequence[tuple[asyncio.Future[T], T | Exception]]) -> None:
    """Give each future its result, or its exception when the outcome is one, from any thread:
    one call on each loop the futures belong to (one wake-up), not one per future. A future
    already done (cancelled: its client went away) is skipped; a closed loop has no one waiting.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[T], T | Exception]]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0].get_loop(), []).append(outcome)
    for loop, theirs in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(_settle_now, theirs)


def _settle_now(outcomes: Sequence[tuple[asyncio.Future[T], T | Exception]]) -> None:
    for future, outcome in outcomes:
        if future.done():
            continue
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
