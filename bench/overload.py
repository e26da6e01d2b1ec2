"""Overload benchmark of the guard service (a benchmark, not a test): loopback only, bounded.

Starts ``advguard serve`` on a free loopback port (demo bundle, CPU), then:

1. unloaded: one request at a time, ``--baseline-requests`` CIFAR-10 test JPEGs: p50/p99;
2. burst: ``--burst-concurrency`` clients sending back to back for ``--burst-seconds`` (far above
   saturation, and ignoring Retry-After as a hostile burst would): how many are served, how many
   get 503 and whether each carries Retry-After, the p99 of the served requests, the server's RSS
   (sampled from /proc) and queue depth (from /metrics) during the burst;
3. recovery: one request at a time again right after the burst: the time to the first 200 and
   the p99 of ``--baseline-requests`` requests, against the unloaded p99.

Each ``--queue-size`` and ``--latency-budget-ms`` given is a separate server run. Writes
bench/results/<--name, default overload>.json and .md.

    .venv/bin/python -m bench.overload --queue-size 256 16 --burst-concurrency 512
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.cli import at_least
from bench.common import RawConnection, admin_base, multipart_request, serve, write_results
from bench.load_service import test_jpegs


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def gauge(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


class Sampler:
    """Samples the server's RSS and open fds (and its queue depth) in a thread."""

    def __init__(self, pid: int, base: str, period_s: float = 0.25):
        self.pid, self.base, self.period_s = pid, base, period_s
        self.rss: list[float] = []
        self.queue: list[float] = []
        self.fds: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=5) as client:
            while not self._stop.is_set():
                self.rss.append(rss_mb(self.pid))
                self.fds.append(open_fds(self.pid))
                with suppress(httpx.HTTPError):
                    self.queue.append(gauge(client.get("/metrics").text, "advguard_queue_depth"))
                self._stop.wait(self.period_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(values) * 1000.0, q)), 1) if values else None


# (status, Retry-After header, Server-Timing header) of one POST /classify of image i
Post = Callable[[int], Awaitable[tuple[int, str | None, str | None]]]
TRANSPORT_ERRORS = (httpx.TransportError, OSError, asyncio.IncompleteReadError, ValueError)


@asynccontextmanager
async def clients(
    kind: str, base: str, images: list[bytes], concurrency: int
) -> AsyncIterator[Callable[[], Post]]:
    """A factory of per-worker ``post`` functions: ``raw`` gives each worker its own keep-alive
    connection (bench.common.RawConnection, prebuilt requests); ``httpx`` shares one AsyncClient
    pool of ``concurrency`` connections (the client of the first runs, which at 512 connections
    is itself the bottleneck: ~90 requests/s in all)."""
    if kind == "httpx":
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:

            async def post(i: int) -> tuple[int, str | None, str | None]:
                files = {"file": ("x.jpg", images[i % len(images)])}
                response = await client.post("/classify", files=files)
                headers = response.headers
                return (
                    response.status_code,
                    headers.get("retry-after"),
                    headers.get("server-timing"),
                )

            yield lambda: post
        return
    host, port = base.removeprefix("http://").rsplit(":", 1)
    requests = [multipart_request("/classify", data) for data in images]
    connections: list[RawConnection] = []

    def new() -> Post:
        connection = RawConnection(host, int(port))
        connections.append(connection)

        async def post(i: int) -> tuple[int, str | None, str | None]:
            status, headers, _ = await connection.request(requests[i % len(requests)])
            return status, headers.get("retry-after"), headers.get("server-timing")

        return post

    try:
        yield new
    finally:
        for connection in connections:
            await connection.close()


async def sequential(kind: str, base: str, images: list[bytes], n: int) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    async with clients(kind, base, images, 1) as new:
        post = new()
        for i in range(n):
            t0 = time.perf_counter()
            status, _, _ = await post(i)
            latencies.append(time.perf_counter() - t0)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        "requests": n,
        "statuses": statuses,
        "latency_ms_p50": pct(latencies, 50),
        "latency_ms_p99": pct(latencies, 99),
    }


@dataclass
class BurstTally:
    """What a burst's answers came to: latencies (seconds) of the served and of the refused,
    the service's own time of the served (its Server-Timing header), every status, and the
    Retry-After values the 503s carried ("missing" where one had none)."""

    served: list[float] = field(default_factory=list)
    served_in_app: list[float] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    retry_after: dict[str, int] = field(default_factory=dict)
    transport_errors: int = 0

    def answer(self, status: int, retry_after: str | None, timing: str | None, at: float) -> None:
        """One answer, ``at`` seconds after its request was sent."""
        self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
        if status == 200:
            self.served.append(at)
            if timing and (match := re.search(r"dur=([0-9.]+)", timing)):
                self.served_in_app.append(float(match.group(1)) / 1000.0)
        elif status == 503:
            value = retry_after or "missing"
            self.refused.append(at)
            self.retry_after[value] = self.retry_after.get(value, 0) + 1

    def summary(self, issued: int, seconds: float) -> dict[str, Any]:
        """The burst's figures: counts, rates over ``seconds``, latency percentiles (ms)."""
        return {
            "seconds": round(seconds, 2),
            "requests": issued,
            "statuses": self.statuses,
            "transport_errors": self.transport_errors,
            "served": len(self.served),
            "refused_503": len(self.refused),
            "retry_after_values_on_503": self.retry_after,
            "served_per_s": round(len(self.served) / seconds, 1),
            "offered_per_s": round(issued / seconds, 1),
            "served_latency_ms_p50": pct(self.served, 50),
            "served_latency_ms_p99": pct(self.served, 99),
            "served_latency_ms_max": pct(self.served, 100),
            "served_in_app_ms_p50": pct(self.served_in_app, 50),
            "served_in_app_ms_p99": pct(self.served_in_app, 99),
            "refused_latency_ms_p50": pct(self.refused, 50),
            "refused_latency_ms_p99": pct(self.refused, 99),
        }


async def burst(
    kind: str, base: str, images: list[bytes], concurrency: int, seconds: float
) -> dict[str, Any]:
    """``concurrency`` clients sending back to back for ``seconds``, ignoring Retry-After, and
    how late the client's own event loop wakes a 10 ms sleep meanwhile (its own saturation)."""
    tally = BurstTally()
    loop_lag: list[float] = []
    issued = 0
    async with clients(kind, base, images, concurrency) as new:
        started = time.perf_counter()
        deadline = started + seconds

        async def worker() -> None:
            nonlocal issued
            post = new()
            while time.perf_counter() < deadline:
                i = issued
                issued += 1
                t0 = time.perf_counter()
                try:
                    status, retry_after, timing = await post(i)
                except TRANSPORT_ERRORS:
                    tally.transport_errors += 1
                    continue
                tally.answer(status, retry_after, timing, time.perf_counter() - t0)

        async def probe() -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                await asyncio.sleep(0.01)
                loop_lag.append(time.perf_counter() - t0 - 0.01)

        await asyncio.gather(probe(), *(worker() for _ in range(concurrency)))
        elapsed_total = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        **tally.summary(issued, elapsed_total),
        "client_loop_lag_ms_p50": pct(loop_lag, 50),
        "client_loop_lag_ms_p99": pct(loop_lag, 99),
    }


async def recovery(kind: str, base: str, images: list[bytes], n: int) -> dict[str, Any]:
    """Right after the burst: time to the first 200, then ``n`` sequential requests."""
    started = time.perf_counter()
    first_ok = None
    async with clients(kind, base, images, 1) as new:
        post = new()
        for i in range(1000):
            status, _, _ = await post(i)
            if status == 200:
                first_ok = time.perf_counter() - started
                break
            await asyncio.sleep(0.05)
    after = await sequential(kind, base, images, n)
    return {"time_to_first_200_ms": round((first_ok or float("nan")) * 1000, 1), **after}


def counters(text: str, name: str, label: str) -> dict[str, float]:
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(rf'^{name}\{{{label}="([^"]+)"\}} (\S+)$', text, re.MULTILINE)
    }


def run_config(
    args: argparse.Namespace, images: list[bytes], queue_size: int, budget_ms: float | None
) -> dict[str, Any]:
    env = {"ADVGUARD_QUEUE_SIZE": str(queue_size), "ADVGUARD_RETRY_AFTER_S": "1"}
    if budget_ms is not None:
        env["ADVGUARD_LATENCY_BUDGET_MS"] = str(budget_ms)
    if args.shed_delay_ms is not None:
        env["ADVGUARD_SHED_DELAY_MS"] = str(args.shed_delay_ms)
    with serve(env, args.device) as (base, server):
        kind = args.client
        asyncio.run(sequential(kind, base, images, 20))  # warm-up
        rss_idle = rss_mb(server.pid)
        baseline = asyncio.run(sequential(kind, base, images, args.baseline_requests))
        with Sampler(server.pid, admin_base(server)) as sampler:
            loaded = asyncio.run(
                burst(kind, base, images, args.burst_concurrency, args.burst_seconds)
            )
        rss_after_burst = rss_mb(server.pid)
        text = httpx.get(f"{admin_base(server)}/metrics", timeout=10).text
        shed = counters(text, "advguard_shed_total", "reason")
        seconds_per_image = gauge(text, "advguard_seconds_per_image")
        after = asyncio.run(recovery(kind, base, images, args.baseline_requests))
        alive = server.poll() is None
    p99_ratio = (
        round(loaded["served_latency_ms_p99"] / baseline["latency_ms_p99"], 2)
        if loaded["served_latency_ms_p99"] and baseline["latency_ms_p99"]
        else None
    )
    return {
        "queue_size": queue_size,
        "max_in_flight": queue_size + 32,  # the default: queue size + max batch size (32)
        "latency_budget_ms": "auto" if budget_ms is None else budget_ms,
        "shed_delay_ms": "default" if args.shed_delay_ms is None else args.shed_delay_ms,
        "shed_by_reason": shed,
        "seconds_per_image_after_burst": round(seconds_per_image, 5),
        "unloaded": baseline,
        "burst": loaded,
        "served_p99_over_unloaded_p99": p99_ratio,
        "recovery": after,
        "recovery_p99_over_unloaded_p99": round(
            after["latency_ms_p99"] / baseline["latency_ms_p99"], 2
        ),
        "rss_mb": {
            "idle": round(rss_idle, 1),
            "peak_during_burst": round(max(sampler.rss), 1),
            "after_burst": round(rss_after_burst, 1),
        },
        "open_fds_peak_during_burst": max(sampler.fds),
        "queue_depth_max_seen": max(sampler.queue) if sampler.queue else None,
        "server_alive_after": alive,
    }


def budget(text: str) -> float | None:
    return None if text == "auto" else float(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--queue-size",
        type=at_least(1),
        nargs="+",
        default=[256],
        help="ADVGUARD_QUEUE_SIZE values, a server run each (default: %(default)s)",
    )
    parser.add_argument(
        "--latency-budget-ms",
        type=budget,
        nargs="+",
        default=[None],
        help="ADVGUARD_LATENCY_BUDGET_MS values (0: deadlines off; auto: the service's default)",
    )
    parser.add_argument(
        "--shed-delay-ms", type=float, help="ADVGUARD_SHED_DELAY_MS; default: the service's"
    )
    parser.add_argument("--name", default="overload", help="bench/results/<name>.json and .md")
    parser.add_argument(
        "--burst-concurrency",
        type=at_least(1),
        default=512,
        help="clients sending back to back in the burst (default: %(default)s)",
    )
    parser.add_argument(
        "--burst-seconds",
        type=float,
        default=20.0,
        help="the burst's length in seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--baseline-requests",
        type=at_least(1),
        default=100,
        help="one-at-a-time requests before and after the burst (default: %(default)s)",
    )
    parser.add_argument(
        "--device", default="cpu", help="the service's device: cuda / cpu (default: %(default)s)"
    )
    parser.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="load generator: raw keep-alive sockets (cheap) or one shared httpx pool",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load_before = os.getloadavg()
    images = test_jpegs(1000)
    configs = []
    for queue_size in args.queue_size:
        for budget_ms in args.latency_budget_ms:
            result = run_config(args, images, queue_size, budget_ms)
            print(result, flush=True)
            configs.append(result)
    load_after = os.getloadavg()
    write_results(
        args.name,
        {
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "settings": vars(args),
            "configs": configs,
        },
        markdown(args, configs, load_before, load_after),
    )
    return 0


def config_row(c: dict[str, Any]) -> str:
    """One configuration's row of the results table."""
    b = c["burst"]
    return (
        f"| {c['queue_size']} / {c['max_in_flight']} | {c['latency_budget_ms']} "
        f"| {c['shed_delay_ms']} "
        f"| {c['unloaded']['latency_ms_p99']} "
        f"| {b['offered_per_s']} "
        f"| {b['served']} ({b['served_per_s']}/s) | {b['refused_503']} "
        f"| {b['retry_after_values_on_503']} | {b['transport_errors']} "
        f"| {b['served_latency_ms_p50']} / {b['served_latency_ms_p99']} "
        f"| {b['served_in_app_ms_p99']} | {b['client_loop_lag_ms_p99']} "
        f"| {', '.join(f'{k} {v:.0f}' for k, v in c['shed_by_reason'].items() if v)} "
        f"| {c['served_p99_over_unloaded_p99']} | {b['refused_latency_ms_p99']} "
        f"| {c['rss_mb']['idle']} / {c['rss_mb']['peak_during_burst']} / "
        f"{c['rss_mb']['after_burst']} | {c['queue_depth_max_seen']} "
        f"| {c['recovery']['time_to_first_200_ms']} | {c['recovery']['latency_ms_p99']} "
        f"({c['recovery_p99_over_unloaded_p99']}x) |"
    )


def markdown(
    args: argparse.Namespace,
    configs: list[dict[str, Any]],
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> str:
    """The results file's Markdown: what was sent, a row per configuration, how to read it."""
    rows = [config_row(c) for c in configs]
    return (
        f"Burst: {args.burst_concurrency} clients back to back for {args.burst_seconds} s "
        f"(no client honours Retry-After; {args.client} client), CIFAR-10 test JPEGs, "
        f"model on {args.device}; "
        "client and server share the machine's cores over loopback.\n\n"
        "| queue / max in flight | latency budget ms | shed delay ms | unloaded p99 ms "
        "| offered/s | served | 503 | Retry-After on 503 | transport errors "
        "| served p50 / p99 ms | served p99 in the app ms | client loop lag p99 ms "
        "| 503s by reason "
        "| served p99 / unloaded p99 | 503 p99 ms "
        "| RSS MB idle / peak / after | max queue depth seen | recovery: first 200 ms "
        "| recovery p99 ms |\n" + "| --- " * 19 + "|\n" + "\n".join(rows) + "\n\n"
        f"Load average (1/5/15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
        f"after: {', '.join(f'{x:.2f}' for x in load_after)} on "
        f"{os.cpu_count()} cores: the machine was shared with other jobs, which inflates "
        "every latency here; the ratios matter more than the absolute numbers.\n\n"
        'Latencies are end to end at the client; "in the app" is the service\'s own '
        'Server-Timing (from the request\'s head to its answer), "client loop lag" how late the '
        "client's own event loop woke a 10 ms sleep (the client's share of the latency). 503s by "
        "reason: advguard_shed_total (in_flight: ADVGUARD_MAX_IN_FLIGHT; expected_wait: expected "
        "wait over the latency budget; expired: waited past it in the queue, never run; "
        'queue_full). Latency budget "auto": two full batches at the measured time per '
        "image.\n"
    )


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m bench.overload"))
