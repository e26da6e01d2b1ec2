"""Closed-loop load of running ``advguard serve`` processes, shared by the service benchmarks
(``bench.service_vs_bare``, ``bench.stateful_cost``, ``bench.switch_interval``): prebuilt
requests from a number of client ids, one keep-alive connection per simulated client, a load level
at a fixed concurrency for a fixed time (throughput, latency, statuses, and the service's own
stage and screening times from its metrics), and several services started at once and loaded in
turn, round by round (``interleaved``), with the CPU time each spent per answered request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.service.metrics import SCREENING_PARTS, STAGES
from bench.common import (
    RawConnection,
    admin_base,
    multipart_request,
    serve,
)


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(values) * 1000.0, q)), 1) if values else None


def metric_values(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for stage in STAGES:
        for kind in ("sum", "count"):
            name = f"advguard_stage_seconds_{kind}"
            match = re.search(rf'^{name}\{{stage="{stage}"\}} (\S+)$', text, re.MULTILINE)
            values[f"{stage}_{kind}"] = float(match.group(1)) if match else 0.0
    for kind in ("sum", "count"):
        match = re.search(rf"^advguard_batch_size_{kind} (\S+)$", text, re.MULTILINE)
        values[f"batch_{kind}"] = float(match.group(1)) if match else 0.0
    for part in SCREENING_PARTS:
        name = "advguard_screening_seconds_total"
        match = re.search(rf'^{name}\{{part="{part}"\}} (\S+)$', text, re.MULTILINE)
        values[f"screening_{part}"] = float(match.group(1)) if match else 0.0
    screened = re.findall(r"^advguard_stateful_queries_total\{[^}]*\} (\S+)$", text, re.MULTILINE)
    values["screened"] = sum(float(value) for value in screened)
    return values


async def scrape(host: str, port: int) -> dict[str, float]:
    connection = RawConnection(host, port)
    try:
        raw = b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n"
        _, _, body = await connection.request(raw)
    finally:
        await connection.close()
    return metric_values(body.decode())


@dataclass
class _LoadTally:
    """What a load level's clients have seen so far, shared by all of them; ``issued`` is the
    number of the next request to send, so that the clients together send the requests in turn."""

    issued: int
    latencies: list[float] = field(default_factory=list)
    in_app: list[float] = field(default_factory=list)  # the service's own time (Server-Timing)
    statuses: dict[str, int] = field(default_factory=dict)


async def _load_client(
    host: str, port: int, requests: list[bytes], deadline: float, tally: _LoadTally
) -> None:
    """One closed-loop client on its own keep-alive connection: it sends the next request as
    soon as its last one is answered, until ``deadline``, so the load is ``concurrency``
    requests in flight whatever the service's speed."""
    connection = RawConnection(host, port)
    try:
        while time.perf_counter() < deadline:
            raw = requests[tally.issued % len(requests)]
            tally.issued += 1
            t0 = time.perf_counter()
            status, headers, _ = await connection.request(raw)
            tally.latencies.append(time.perf_counter() - t0)
            tally.statuses[str(status)] = tally.statuses.get(str(status), 0) + 1
            match = re.search(r"dur=([0-9.]+)", headers.get("server-timing", ""))
            if match:
                tally.in_app.append(float(match.group(1)) / 1000.0)
    finally:
        await connection.close()


def _client_figures(tally: _LoadTally, elapsed: float) -> dict[str, Any]:
    """What the load client saw: statuses, throughput of answered requests, and latencies (with
    the in-app time the service reported per request, to tell its time from the network's)."""
    ok = tally.statuses.get("200", 0)
    return {
        "requests": len(tally.latencies),
        "statuses": tally.statuses,
        "seconds": round(elapsed, 2),
        "throughput_images_per_s": round(ok / elapsed, 1),
        "latency_ms_p50": pct(tally.latencies, 50),
        "latency_ms_p99": pct(tally.latencies, 99),
        "latency_ms_mean": round(float(np.mean(tally.latencies)) * 1000.0, 2),
        "in_app_ms_mean": round(float(np.mean(tally.in_app)) * 1000.0, 2) if tally.in_app else None,
        "in_app_ms_p99": pct(tally.in_app, 99),
    }


def _metric_figures(delta: dict[str, float], elapsed: float) -> dict[str, Any]:
    """The service's own account of the level, from the change of its /metrics counters over it:
    where a request's time went by stage, what the query screening cost, and how the batcher
    grouped the requests (a zero count is taken as one: no division by zero on an idle level)."""
    classified = delta["total_count"] or 1.0
    batches = delta["batch_count"] or 1.0
    mean_ms = {
        stage: round(delta[f"{stage}_sum"] / (delta[f"{stage}_count"] or 1.0) * 1000.0, 2)
        for stage in STAGES
    }
    screened = delta["screened"] or 1.0
    screening_ms = {
        part: round(delta[f"screening_{part}"] / screened * 1000.0, 3) for part in SCREENING_PARTS
    }
    return {
        "stage_ms_mean": mean_ms,
        # per screened query, and the share of one thread the screening kept busy
        "screening_ms_per_query": screening_ms,
        "screening_busy": round(
            sum(delta[f"screening_{part}"] for part in SCREENING_PARTS) / elapsed, 3
        ),
        "mean_batch_size": round(delta["batch_sum"] / batches, 2),
        "batches_per_s": round(delta["batch_count"] / elapsed, 1),
        "classified": int(classified),
    }


async def load_level(
    host: str,
    port: int,
    admin_port: int,
    requests: list[bytes],
    concurrency: int,
    seconds: float,
    first: int = 0,
) -> dict[str, Any]:
    """Closed-loop load for ``seconds`` from ``concurrency`` clients, sending ``requests`` in
    turn from number ``first`` on; ``next_request`` in the result is where the next load of the
    same service goes on, so that a run's slices together go through every request before any
    is sent again (distinct uploads, as honest traffic mostly is: a resent image takes the
    query screening's near-duplicate path)."""
    tally = _LoadTally(issued=first)
    before = await scrape(host, admin_port)
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(
        *(_load_client(host, port, requests, deadline, tally) for _ in range(concurrency))
    )
    elapsed = time.perf_counter() - started
    after = await scrape(host, admin_port)
    delta = {key: after[key] - before[key] for key in after}
    return {
        "concurrency": concurrency,
        **_client_figures(tally, elapsed),
        **_metric_figures(delta, elapsed),
        "next_request": tally.issued,
    }


@dataclass(frozen=True)
class Interleaving:
    """How services are compared on a shared machine: ``rounds`` slices of ``slice_s`` seconds
    each, per service, at ``concurrency`` clients, the model on ``device``."""

    rounds: int
    slice_s: float
    concurrency: int
    device: str


@dataclass(frozen=True)
class Fill:
    """Untimed queries sent to some services before their warm-up: ``count`` of ``requests``
    (in turn) to each service named in ``services``, so that the timed slices read a query
    screening's store that already holds them, as a service long in production does."""

    requests: list[bytes]
    count: int
    services: frozenset[str]


FILL_SLICE_S = 10.0  # one fill load's length: the fill goes on in such loads until sent


async def fill_up(
    host: str, port: int, admin_port: int, fill: Fill, concurrency: int
) -> dict[str, Any]:
    """At least ``fill.count`` requests of ``fill.requests`` sent to one service at
    ``concurrency`` (closed loop, untimed), in loads of ``FILL_SLICE_S`` until that many have
    gone (the last load's excess sends the first ones again): how many were sent and answered
    200, and how long it took."""
    requests = fill.requests[: fill.count]
    sent, answered, seconds = 0, 0, 0.0
    while sent < fill.count:
        level = await load_level(host, port, admin_port, requests, concurrency, FILL_SLICE_S, sent)
        sent = level["next_request"]
        answered += level["statuses"].get("200", 0)
        seconds += level["seconds"]
    return {"sent": sent, "answered": answered, "seconds": round(seconds, 1)}


def requests_of(jpegs: list[bytes], clients: int) -> list[bytes]:
    """One prebuilt request per image, from ``clients`` ids in turn (``X-Client-ID``); 0: no
    header, so every request is the one client of the load generator's address."""
    requests = [multipart_request("/classify", data) for data in jpegs]
    if clients == 0:
        return requests
    return [
        raw.replace(b"Host: bench\r\n", f"Host: bench\r\nX-Client-ID: c{i % clients}\r\n".encode())
        for i, raw in enumerate(requests)
    ]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def interleaved(
    envs: dict[str, dict[str, str]],
    requests: list[bytes],
    plan: Interleaving,
    label: str,
    redis_pid: int | None = None,
    fill: Fill | None = None,
) -> dict[str, Any]:
    """Every service of ``envs`` started at once and loaded in turn, one slice each per round
    (the order flipped every round): on a machine shared with other jobs, whose load drifts over
    minutes, each service sees the same drift. Throughput = all answered requests / all loaded
    seconds of the service. Also the CPU time the service (and Redis, when given) spent per
    answered request: on cores shared with other jobs, far steadier than throughput, and what
    bounds throughput on busy cores. With ``fill``, its services are sent its untimed queries
    first (``fill_up``), before the warm-up."""
    with contextlib.ExitStack() as stack:
        ports, pids = {}, {}
        for name, env in envs.items():
            base, server = stack.enter_context(serve(env, plan.device))
            host, port_text = base.removeprefix("http://").rsplit(":", 1)
            admin = int(admin_base(server).rsplit(":", 1)[1])
            ports[name], pids[name] = (host, int(port_text), admin), server.pid
        filled: dict[str, dict[str, Any]] = {}
        for name in envs:
            if fill is not None and name in fill.services:
                host, port, admin = ports[name]
                filled[name] = asyncio.run(fill_up(host, port, admin, fill, plan.concurrency))
                print(f"{label} {name} filled:", filled[name], flush=True)
        # untimed: a few clients, then one slice each at the measured concurrency, so that no
        # service's first timed slice is its first under full load (batch sizes, caches)
        following = {name: 0 for name in envs}
        for concurrency, seconds in ((4, 3.0), (plan.concurrency, plan.slice_s)):
            for name in envs:
                host, port, admin = ports[name]
                warm = asyncio.run(
                    load_level(host, port, admin, requests, concurrency, seconds, following[name])
                )
                following[name] = warm["next_request"]
        slices: dict[str, list[dict[str, Any]]] = {name: [] for name in envs}
        cpu: dict[str, float] = {name: 0.0 for name in envs}
        order = list(envs)
        for r in range(plan.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                host, port, admin = ports[name]
                watched = [pids[name]] + ([redis_pid] if redis_pid is not None else [])
                before = sum(cpu_seconds(pid) for pid in watched)
                level = asyncio.run(
                    load_level(
                        host, port, admin, requests, plan.concurrency, plan.slice_s, following[name]
                    )
                )
                following[name] = level["next_request"]
                cpu[name] += sum(cpu_seconds(pid) for pid in watched) - before
                slices[name].append(level)
                print(f"{label} {name} round {r}:", level["throughput_images_per_s"], flush=True)
    out: dict[str, Any] = {}
    for name, levels in slices.items():
        answered = sum(level["statuses"].get("200", 0) for level in levels)
        seconds = sum(level["seconds"] for level in levels)
        stateful = [level["stage_ms_mean"].get("stateful", 0.0) for level in levels]
        out[name] = {
            "throughput_images_per_s": round(answered / seconds, 1),
            "cpu_ms_per_request": round(1000.0 * cpu[name] / max(answered, 1), 3),
            "per_round_images_per_s": [level["throughput_images_per_s"] for level in levels],
            "stateful_stage_ms_mean": round(float(np.mean(stateful)), 2),
            "screening_ms_per_query": screening_means(levels),
            "levels": levels,
            **({"filled": filled[name]} if name in filled else {}),
        }
    return out


def screening_means(levels: list[dict[str, Any]]) -> dict[str, float]:
    """Each screening part's ms per screened query, averaged over the load slices."""
    return {
        part: round(float(np.mean([level["screening_ms_per_query"][part] for level in levels])), 3)
        for part in SCREENING_PARTS
    }


def run_service(
    env: dict[str, str],
    args: argparse.Namespace,
    jpegs: list[bytes],
    label: str,
    warmup_s: float = 3.0,
    clients: int = 0,
) -> dict[str, Any]:
    """``advguard serve`` with ``env`` under closed-loop load at each of ``args.concurrency``
    for ``args.seconds`` (model on ``args.device``), after ``warmup_s`` at 4 clients; requests
    from ``clients`` ids in turn (0: one client, no ``X-Client-ID``)."""
    requests = requests_of(jpegs, clients)
    with serve(env, args.device) as (base, _server):
        host, port = base.removeprefix("http://").rsplit(":", 1)
        admin = int(admin_base(_server).rsplit(":", 1)[1])
        warm = asyncio.run(load_level(host, int(port), admin, requests, 4, warmup_s))
        following = warm["next_request"]
        levels = []
        for concurrency in args.concurrency:
            level = asyncio.run(
                load_level(host, int(port), admin, requests, concurrency, args.seconds, following)
            )
            following = level["next_request"]
            print(f"{label}:", level, flush=True)
            levels.append(level)
    best = max(levels, key=lambda level: level["throughput_images_per_s"])
    return {"env": env, "levels": levels, "saturation": best}
