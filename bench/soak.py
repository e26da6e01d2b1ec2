"""Soak benchmark of the guard service (a benchmark, not a test): loopback only.

Starts a redis-server (no persistence) and ``advguard serve`` tracking clients in it with a short
client TTL, measures saturation (closed loop at ``--calibrate-concurrency`` for
``--calibrate-seconds``), then sends an open-loop stream at ``--fraction`` (0.7) of it for
``--minutes`` (default 20), every request from a new client id, so that Redis keeps growing
unless key expiry bounds it. Every ``--sample-s`` seconds: the server's RSS and open file
descriptors (/proc), Redis ``used_memory`` and key count, and the window's served rate and p99.
Reports growth past the warm-up (``--warmup-fraction`` of the run, at most 2 minutes) and writes
bench/results/soak.json and .md.

    .venv/bin/python -m bench.soak --minutes 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis

from app.cli import at_least
from bench.common import serve, start_redis, write_results
from bench.load_service import test_jpegs
from bench.overload import open_fds, rss_mb


async def closed_loop(base: str, images: list[bytes], concurrency: int, seconds: float) -> float:
    ok = 0
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        started = time.perf_counter()
        deadline = started + seconds

        async def worker(offset: int) -> None:
            nonlocal ok
            i = offset
            while time.perf_counter() < deadline:
                response = await client.post(
                    "/classify", files={"file": ("x.jpg", images[i % len(images)])}
                )
                ok += response.status_code == 200
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return ok / (time.perf_counter() - started)


_MAX_IN_FLIGHT = 256  # the open loop's connection cap: past it, requests are counted, not sent


@dataclass
class _OpenLoopTally:
    """What the open loop's requests have done so far, shared by the request tasks and the
    sampler; the sampler empties ``window`` at each sample, so each sample reads its own."""

    window: list[float] = field(default_factory=list)  # seconds of the 200s since the last sample
    statuses: dict[str, int] = field(default_factory=dict)  # status code or error: count
    in_flight: int = 0
    not_sent: int = 0  # due while _MAX_IN_FLIGHT requests were in flight


async def _send(client: httpx.AsyncClient, image: bytes, tally: _OpenLoopTally) -> None:
    """One request from a new client id (so that Redis gets a new client's keys each time),
    tallied by status, or by error type when the request fails (a soak must not stop on one)."""
    tally.in_flight += 1
    t0 = time.perf_counter()
    try:
        response = await client.post(
            "/classify",
            files={"file": ("x.jpg", image)},
            headers={"X-Client-ID": uuid.uuid4().hex},
        )
        key = str(response.status_code)
        if response.status_code == 200:
            tally.window.append(time.perf_counter() - t0)
    except httpx.HTTPError as exc:
        key = type(exc).__name__
    finally:
        tally.in_flight -= 1
    tally.statuses[key] = tally.statuses.get(key, 0) + 1


def _launch(
    client: httpx.AsyncClient,
    image: bytes,
    tally: _OpenLoopTally,
    tasks: set[asyncio.Task[None]],
) -> None:
    """Starts one request without waiting for it (open loop: the rate does not slow down with the
    service), unless _MAX_IN_FLIGHT are in flight: then it is counted as not sent, so that an
    overloaded service shows as a count rather than as a client queue growing without bound."""
    if tally.in_flight < _MAX_IN_FLIGHT:
        task = asyncio.create_task(_send(client, image, tally))
        tasks.add(task)  # held until done: the event loop keeps only weak references
        task.add_done_callback(tasks.discard)
    else:
        tally.not_sent += 1


def _sample(
    tally: _OpenLoopTally, started: float, sample_s: float, pid: int, store: redis.Redis
) -> dict[str, Any]:
    """The server's and Redis's state now, and the window's served rate and p99: what a soak
    watches for growth."""
    info = store.info("memory")
    lat = np.array(tally.window) * 1000.0 if tally.window else np.array([np.nan])
    return {
        "t_s": round(time.perf_counter() - started, 1),
        "rss_mb": round(rss_mb(pid), 1),
        "open_fds": open_fds(pid),
        "redis_used_memory_mb": round(info["used_memory"] / 2**20, 2),
        "redis_keys": int(store.dbsize()),
        "served_per_s": round(len(tally.window) / sample_s, 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "in_flight": tally.in_flight,
        "statuses_so_far": dict(tally.statuses),
        "not_sent_256_in_flight": tally.not_sent,
    }


async def open_loop(
    base: str,
    images: list[bytes],
    rate: float,
    seconds: float,
    sample_s: float,
    pid: int,
    store: redis.Redis,
) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = []
    tally = _OpenLoopTally()
    limits = httpx.Limits(max_connections=_MAX_IN_FLIGHT, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        started = time.perf_counter()
        next_sample = started + sample_s
        tasks: set[asyncio.Task[None]] = set()
        i = 0
        while (now := time.perf_counter()) < started + seconds:
            due = started + i / rate
            if due > now:
                await asyncio.sleep(min(due - now, max(0.0, next_sample - now)))
            if time.perf_counter() >= due:
                _launch(client, images[i % len(images)], tally, tasks)
                i += 1
            if time.perf_counter() >= next_sample:
                samples.append(_sample(tally, started, sample_s, pid, store))
                print(samples[-1], flush=True)
                tally.window.clear()
                next_sample += sample_s
        await asyncio.gather(*tasks)
    return samples


def stateful_client_ttl_s(args: argparse.Namespace) -> int:
    return int(args.stateful_client_ttl_s or args.client_ttl_s)


def slope_per_min(ts: list[float], values: list[float]) -> float:
    if len(ts) < 2:
        return float("nan")
    return float(np.polyfit(np.array(ts) / 60.0, np.array(values), 1)[0])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--minutes",
        type=float,
        default=20.0,
        help="the open-loop stream's length in minutes (default: %(default)s)",
    )
    parser.add_argument(
        "--fraction",
        type=float,
        default=0.7,
        help="share of saturation the stream is sent at (default: %(default)s)",
    )
    parser.add_argument(
        "--saturation",
        type=float,
        help="images/s at saturation, measured elsewhere (bench/overload.py, load_service.py); "
        "default: measure it here first (on a shared machine a quiet moment can overestimate it)",
    )
    parser.add_argument(
        "--calibrate-concurrency",
        type=at_least(1),
        default=8,
        help="closed-loop clients measuring saturation (default: %(default)s)",
    )
    parser.add_argument(
        "--calibrate-seconds",
        type=float,
        default=20.0,
        help="seconds of the saturation measurement (default: %(default)s)",
    )
    parser.add_argument(
        "--client-ttl-s",
        type=at_least(1),
        default=60,
        help="ADVGUARD_CLIENT_TTL_S: seconds an idle client's statistics live "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--sample-s",
        type=float,
        default=10.0,
        help="seconds between samples (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup-fraction",
        type=float,
        default=0.2,
        help="share of the run left out as warm-up, at most 2 minutes (default: %(default)s)",
    )
    parser.add_argument(
        "--stateful-max-fingerprints",
        type=int,
        help="ADVGUARD_STATEFUL_MAX_FINGERPRINTS (default: the service's, 50,000)",
    )
    parser.add_argument(
        "--stateful-client-ttl-s",
        type=int,
        help="ADVGUARD_STATEFUL_CLIENT_TTL_S (default: --client-ttl-s, so that a rotated id's "
        "fingerprints expire with its statistics)",
    )
    parser.add_argument(
        "--device", default="cpu", help="the service's device: cuda / cpu (default: %(default)s)"
    )
    parser.add_argument("--out", default="soak", help="results file name under bench/results")
    return parser


def run_soak(args: argparse.Namespace) -> tuple[float, float, list[dict[str, Any]], int]:
    """Redis and the service started, saturation measured (or given), the open-loop soak run:
    (saturation, rate, samples, open fds after the stream)."""
    images = test_jpegs(1000)
    workdir = Path(tempfile.mkdtemp(prefix="advguard-soak-"))
    redis_process, redis_url = start_redis(workdir)
    store = redis.Redis.from_url(redis_url, socket_timeout=2)
    env = {
        "ADVGUARD_REDIS_URL": redis_url,
        "ADVGUARD_STATEFUL_SECRET": "soak-secret",
        "ADVGUARD_CLIENT_TTL_S": str(args.client_ttl_s),
        "ADVGUARD_STATEFUL_CLIENT_TTL_S": str(stateful_client_ttl_s(args)),
    }
    if args.stateful_max_fingerprints:
        env["ADVGUARD_STATEFUL_MAX_FINGERPRINTS"] = str(args.stateful_max_fingerprints)
    try:
        with serve(env, args.device) as (base, server):
            saturation = args.saturation or asyncio.run(
                closed_loop(base, images, args.calibrate_concurrency, args.calibrate_seconds)
            )
            rate = args.fraction * saturation
            print(f"saturation {saturation:.1f}/s, soak at {rate:.1f}/s", flush=True)
            samples = asyncio.run(
                open_loop(base, images, rate, args.minutes * 60, args.sample_s, server.pid, store)
            )
            fds_end = open_fds(server.pid)
    finally:
        redis_process.kill()
        redis_process.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    return saturation, rate, samples, fds_end


def summarise(
    args: argparse.Namespace,
    saturation: float,
    rate: float,
    samples: list[dict[str, Any]],
    fds_end: int,
) -> dict[str, Any]:
    """Past the warm-up: the first, last and largest RSS, fds, Redis memory and keys."""
    warmup_s = min(args.warmup_fraction * args.minutes * 60, 120.0)
    steady = [s for s in samples if s["t_s"] >= warmup_s] or samples
    ts = [s["t_s"] for s in steady]
    rss = [s["rss_mb"] for s in steady]
    fds = [s["open_fds"] for s in steady]
    mem = [s["redis_used_memory_mb"] for s in steady]
    keys = [s["redis_keys"] for s in steady]
    last = samples[-1]["statuses_so_far"] if samples else {}
    summary = {
        "saturation_per_s": round(saturation, 1),
        "target_rate_per_s": round(rate, 1),
        "warmup_s": warmup_s,
        "rss_mb_after_warmup": rss[0],
        "rss_mb_end": rss[-1],
        "rss_mb_max_after_warmup": max(rss),
        "rss_slope_mb_per_min_after_warmup": round(slope_per_min(ts, rss), 3),
        "open_fds_after_warmup": fds[0],
        "open_fds_end": fds[-1],
        "open_fds_max_after_warmup": max(fds),
        "open_fds_after_stream": fds_end,
        "redis_used_memory_mb_after_warmup": mem[0],
        "redis_used_memory_mb_end": mem[-1],
        "redis_used_memory_mb_max": max(mem),
        "redis_keys_after_warmup": keys[0],
        "redis_keys_end": keys[-1],
        "redis_keys_max": max(keys),
        "redis_keys_expected_plateau": round(rate * args.client_ttl_s),
        "statuses": last,
    }
    return summary


def report(
    args: argparse.Namespace,
    summary: dict[str, Any],
    samples: list[dict[str, Any]],
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> str:
    """The results file's markdown: what was run, the summary, every sample, the load."""
    warmup_s = summary["warmup_s"]
    full_run = args.minutes >= 20
    note = (
        "This is the full 20-minute run."
        if full_run
        else f"**A {args.minutes:g}-minute run**: it cannot show growth slower than that; the "
        "20-minute soak is `python -m bench.soak --minutes 20`."
    )
    rows = "\n".join(
        f"| {s['t_s']} | {s['rss_mb']} | {s['open_fds']} | {s['redis_used_memory_mb']} "
        f"| {s['redis_keys']} | {s['served_per_s']} | {s['p99_ms']} |"
        for s in samples
    )
    table = (
        f"{note}\n\n"
        + (
            f"Saturation given: {summary['saturation_per_s']} images/s; soak at "
            if args.saturation
            else f"Saturation measured first: {summary['saturation_per_s']} images/s (closed "
            f"loop, {args.calibrate_concurrency} clients, {args.calibrate_seconds:g} s); soak at "
        )
        + f"{args.fraction:g} x = {summary['target_rate_per_s']} requests/s open loop for "
        f"{args.minutes:g} min, each request from a new client id; Redis without persistence, "
        f"client TTL {args.client_ttl_s} s; stateful detection on (the default), its "
        f"fingerprints capped at {args.stateful_max_fingerprints or 50_000:,} queries, a "
        f"client's own for {stateful_client_ttl_s(args)} s; CIFAR-10 test JPEGs, model on "
        f"{args.device}.\n\n"
        f"Past the warm-up ({warmup_s:g} s): RSS {summary['rss_mb_after_warmup']} -> "
        f"{summary['rss_mb_end']} MB (max {summary['rss_mb_max_after_warmup']}, slope "
        f"{summary['rss_slope_mb_per_min_after_warmup']} MB/min); open fds "
        f"{summary['open_fds_after_warmup']} -> {summary['open_fds_end']} (max "
        f"{summary['open_fds_max_after_warmup']}); Redis memory "
        f"{summary['redis_used_memory_mb_after_warmup']} -> "
        f"{summary['redis_used_memory_mb_end']} MB, keys {summary['redis_keys_after_warmup']} "
        f"-> {summary['redis_keys_end']} (rate x TTL = {summary['redis_keys_expected_plateau']}"
        f"). Statuses: {summary['statuses']}.\n\n"
        "| t s | RSS MB | open fds | Redis MB | Redis keys | served/s | p99 ms |\n"
        "| --- | --- | --- | --- | --- | --- | --- |\n"
        f"{rows}\n\n"
        f"Load average (1/5/15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
        f"after: {', '.join(f'{x:.2f}' for x in load_after)} on {os.cpu_count()} cores "
        "(shared machine: other jobs inflate latencies).\n"
    )
    return table


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load_before = os.getloadavg()
    saturation, rate, samples, fds_end = run_soak(args)
    load_after = os.getloadavg()
    summary = summarise(args, saturation, rate, samples, fds_end)
    table = report(args, summary, samples, load_before, load_after)
    full_run = args.minutes >= 20
    write_results(
        args.out,
        {
            "full_20_minute_run": full_run,
            "settings": vars(args),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "summary": summary,
            "samples": samples,
        },
        table,
    )
    return 0


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m bench.soak"))
