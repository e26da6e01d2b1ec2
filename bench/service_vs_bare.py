"""What the service costs over the bare model and search, in one run on one machine.

(a) ``advguard serve`` with the guard (demo bundle, ``--device``), closed-loop load of CIFAR-10
    test JPEGs at each ``--concurrency`` for ``--seconds``: throughput, p50/p99 latency, and where
    a request's time goes (the service's stage histograms and its Server-Timing header);
(b) the same service with the guard off (``ADVGUARD_GUARD_ENABLED=false``: model only);
(c) the in-process limit, no HTTP: the bundle's Guard on pixels decoded beforehand, model +
    search (``infer``, ``score``, ``decide``, as the batcher runs them) at each batch size of
    ``--batch-sizes``; the best is the limit. Model only (``Guard.classify``) likewise, the limit
    for (b). Decoding alone (the service's per-image work before the batcher) is timed too.

Saturation of a service is its best throughput over the concurrency levels. Ratios against the
targets: a/b >= 90% (the guard's own cost) and a/c >= 70% (the service's overhead over the bare
limit). The load client is ``bench.common.RawConnection`` (one keep-alive connection per worker,
prebuilt requests) and shares the cores with the service; (c) is measured with nothing else
running. Writes bench/results/service_vs_bare.json and .md.

    .venv/bin/python -m bench.service_vs_bare
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.core.guard import Guard
from app.core.images import decode_image
from app.service.settings import DEFAULT_BUNDLE
from bench.common import RawConnection, multipart_request, serve, write_results
from bench.load_service import test_jpegs

STAGES = ("decode", "queue", "model", "search", "total")
DEFAULT_THREADS = torch.get_num_threads()


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(values) * 1000.0, q)), 1) if values else None


# --------------------------------------------------------------------------- (c) in process


def time_batches(run: Any, pixels: list[torch.Tensor], batch: int, min_s: float) -> dict[str, Any]:
    """Images/s of ``run`` on stacked batches of ``batch`` pixels, cycling through the images,
    for at least ``min_s`` seconds and 2 batches, after one warm-up batch."""
    n = len(pixels)

    def stacked(k: int) -> torch.Tensor:
        return torch.stack([pixels[(k * batch + j) % n] for j in range(batch)])

    run(stacked(0))
    images, batches, per_batch = 0, 0, []
    started = time.perf_counter()
    while batches < 2 or time.perf_counter() - started < min_s:
        t0 = time.perf_counter()
        run(stacked(batches + 1))
        per_batch.append(time.perf_counter() - t0)
        images += batch
        batches += 1
    elapsed = time.perf_counter() - started
    return {
        "batch_size": batch,
        "batches": batches,
        "images_per_s": round(images / elapsed, 1),
        "batch_ms_p50": pct(per_batch, 50),
    }


def in_process(guard: Guard, jpegs: list[bytes], sizes: list[int], min_s: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    pixels = [guard.pixels(decode_image(data)) for data in jpegs]
    decode_per_s = len(jpegs) / (time.perf_counter() - t0)

    def guarded(batch: torch.Tensor) -> None:
        features = guard.infer(batch)
        guard.decide(features, guard.score(features))

    sweep = [time_batches(guarded, pixels, size, min_s) for size in sizes]
    for row in sweep:
        print("in process, model + search:", row, flush=True)
    model_only = [time_batches(guard.classify, pixels, size, min_s) for size in sizes]
    for row in model_only:
        print("in process, model only:", row, flush=True)
    best = max(sweep, key=lambda row: row["images_per_s"])
    best_model = max(model_only, key=lambda row: row["images_per_s"])
    return {
        "decode_images_per_s_one_thread": round(decode_per_s, 1),
        "model_and_search": sweep,
        "model_only": model_only,
        "limit": best,
        "limit_model_only": best_model,
    }


# --------------------------------------------------------------------------- (a), (b) service


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
    return values


async def scrape(host: str, port: int) -> dict[str, float]:
    connection = RawConnection(host, port)
    try:
        raw = b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n"
        _, _, body = await connection.request(raw)
    finally:
        await connection.close()
    return metric_values(body.decode())


async def load_level(
    host: str, port: int, requests: list[bytes], concurrency: int, seconds: float
) -> dict[str, Any]:
    latencies: list[float] = []
    in_app: list[float] = []
    statuses: dict[str, int] = {}
    issued = 0
    before = await scrape(host, port)
    started = time.perf_counter()
    deadline = started + seconds

    async def worker() -> None:
        nonlocal issued
        connection = RawConnection(host, port)
        try:
            while time.perf_counter() < deadline:
                raw = requests[issued % len(requests)]
                issued += 1
                t0 = time.perf_counter()
                status, headers, _ = await connection.request(raw)
                latencies.append(time.perf_counter() - t0)
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                match = re.search(r"dur=([0-9.]+)", headers.get("server-timing", ""))
                if match:
                    in_app.append(float(match.group(1)) / 1000.0)
        finally:
            await connection.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    after = await scrape(host, port)
    delta = {key: after[key] - before[key] for key in after}
    ok = statuses.get("200", 0)
    count = delta["total_count"] or 1.0
    batches = delta["batch_count"] or 1.0
    mean_ms = {
        stage: round(delta[f"{stage}_sum"] / (delta[f"{stage}_count"] or 1.0) * 1000.0, 2)
        for stage in STAGES
    }
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "statuses": statuses,
        "seconds": round(elapsed, 2),
        "throughput_images_per_s": round(ok / elapsed, 1),
        "latency_ms_p50": pct(latencies, 50),
        "latency_ms_p99": pct(latencies, 99),
        "latency_ms_mean": round(float(np.mean(latencies)) * 1000.0, 2),
        "in_app_ms_mean": round(float(np.mean(in_app)) * 1000.0, 2) if in_app else None,
        "in_app_ms_p99": pct(in_app, 99),
        "stage_ms_mean": mean_ms,
        "mean_batch_size": round(delta["batch_sum"] / batches, 2),
        "batches_per_s": round(delta["batch_count"] / elapsed, 1),
        "classified": int(count),
    }


def run_service(
    env: dict[str, str], args: argparse.Namespace, jpegs: list[bytes], label: str
) -> dict[str, Any]:
    requests = [multipart_request("/classify", data) for data in jpegs]
    with serve(env, args.device) as (base, _server):
        host, port = base.removeprefix("http://").rsplit(":", 1)
        asyncio.run(load_level(host, int(port), requests, 4, 3.0))  # warm-up
        levels = []
        for concurrency in args.concurrency:
            level = asyncio.run(load_level(host, int(port), requests, concurrency, args.seconds))
            print(f"{label}:", level, flush=True)
            levels.append(level)
    best = max(levels, key=lambda level: level["throughput_images_per_s"])
    return {"env": env, "levels": levels, "saturation": best}


# --------------------------------------------------------------------------- report


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def run_variant(
    threads: int, args: argparse.Namespace, guard: Guard, jpegs: list[bytes]
) -> dict[str, Any]:
    """(c), (a) and (b) with ``threads`` intra-op torch threads (0: torch's default, one per
    core), in the benchmark process and in the services (ADVGUARD_TORCH_THREADS)."""
    threads = threads or DEFAULT_THREADS
    torch.set_num_threads(threads)
    label = f"{torch.get_num_threads()} torch threads"
    bare = in_process(guard, jpegs, args.batch_sizes, args.min_seconds)
    env = {"ADVGUARD_BUNDLE": str(args.bundle), "ADVGUARD_TORCH_THREADS": str(threads)}
    guarded = run_service(env, args, jpegs, f"guard on, {label}")
    unguarded = run_service(
        {**env, "ADVGUARD_GUARD_ENABLED": "false"}, args, jpegs, f"guard off, {label}"
    )
    # the limit again at its best batch size: how much the machine drifted meanwhile
    pixels = [guard.pixels(decode_image(data)) for data in jpegs]

    def model_and_search(batch: torch.Tensor) -> None:
        features = guard.infer(batch)
        guard.decide(features, guard.score(features))

    best = bare["limit"]["batch_size"]
    bare["limit_again_after"] = time_batches(model_and_search, pixels, best, args.min_seconds)
    a = guarded["saturation"]["throughput_images_per_s"]
    b = unguarded["saturation"]["throughput_images_per_s"]
    c = bare["limit"]["images_per_s"]
    return {
        "torch_threads": torch.get_num_threads(),
        "service_guard_on": guarded,
        "service_guard_off": unguarded,
        "in_process": bare,
        "a_over_b": ratio(a, b),
        "a_over_c": ratio(a, c),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seconds", type=float, default=20.0, help="per concurrency level")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256]
    )
    parser.add_argument("--min-seconds", type=float, default=1.0, help="per batch size")
    parser.add_argument(
        "--torch-threads",
        type=int,
        nargs="+",
        default=[0, 1],
        help="intra-op torch threads, one run of (c), (a), (b) each; 0: torch's default",
    )
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    jpegs = test_jpegs(args.images)
    guard = Guard.load(args.bundle, device=args.device)
    variants = [run_variant(threads, args, guard, jpegs) for threads in args.torch_threads]
    load_after = os.getloadavg()

    # the in-process limit is the best over every thread setting; the service's best likewise
    c_best = max(v["in_process"]["limit"]["images_per_s"] for v in variants)
    best = max(
        variants, key=lambda v: v["service_guard_on"]["saturation"]["throughput_images_per_s"]
    )
    a_best = best["service_guard_on"]["saturation"]["throughput_images_per_s"]
    ratios = {
        "a_over_b_target": 0.9,
        "a_over_c_target": 0.7,
        "by_threads": {str(v["torch_threads"]): [v["a_over_b"], v["a_over_c"]] for v in variants},
        "best_a_over_best_c": ratio(a_best, c_best),
    }
    results = {
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "variants": variants,
        "ratios": ratios,
    }

    def rows(name: str, threads: int, service: dict[str, Any]) -> str:
        out = []
        for lv in service["levels"]:
            st = lv["stage_ms_mean"]
            out.append(
                f"| {name} | {threads} | {lv['concurrency']} | {lv['throughput_images_per_s']} "
                f"| {lv['latency_ms_p50']} / {lv['latency_ms_p99']} | {lv['in_app_ms_mean']} "
                f"| {st['decode']} / {st['queue']} / {st['model']} / {st['search']} "
                f"| {lv['mean_batch_size']} | {lv['statuses']} |"
            )
        return "\n".join(out)

    def verdict(value: float, target: float) -> str:
        return "met" if value >= target else "not met"

    service_rows = "\n".join(
        rows("(a) guard on", v["torch_threads"], v["service_guard_on"])
        + "\n"
        + rows("(b) guard off", v["torch_threads"], v["service_guard_off"])
        for v in variants
    )
    bare_rows = "\n".join(
        f"| {v['torch_threads']} | "
        + " | ".join(
            f"{g['images_per_s']} / {m['images_per_s']}"
            for g, m in zip(
                v["in_process"]["model_and_search"], v["in_process"]["model_only"], strict=True
            )
        )
        + f" | {v['in_process']['limit']['images_per_s']} "
        f"({v['in_process']['limit']['batch_size']}; "
        f"{v['in_process']['limit_again_after']['images_per_s']} at the end) |"
        for v in variants
    )
    ratio_rows = "\n".join(
        f"| {v['torch_threads']} "
        f"| {v['service_guard_on']['saturation']['throughput_images_per_s']} "
        f"| {v['service_guard_off']['saturation']['throughput_images_per_s']} "
        f"| {v['in_process']['limit']['images_per_s']} "
        f"| {v['a_over_b']:.1%} ({verdict(v['a_over_b'], 0.9)}) "
        f"| {v['a_over_c']:.1%} ({verdict(v['a_over_c'], 0.7)}) |"
        for v in variants
    )
    sizes = " | ".join(str(size) for size in args.batch_sizes)
    table = (
        f"CIFAR-10 test JPEGs ({args.images}), bundle `{args.bundle.name}`, model on "
        f"{args.device}. Services: closed-loop load for {args.seconds} s per level, one "
        "keep-alive connection per client (raw asyncio client, on the same cores as the "
        "service); saturation = the best level. In process: no HTTP, pixels decoded beforehand.\n\n"
        "| torch threads | (a) guard on images/s | (b) guard off images/s | (c) in-process limit "
        "| a / b (target 90%) | a / c (target 70%) |\n| --- | --- | --- | --- | --- | --- |\n"
        f"{ratio_rows}\n\n"
        f"Best service (a) over best in-process limit (c): {a_best} / {c_best} images/s = "
        f"{ratios['best_a_over_best_c']:.1%}.\n\n"
        "| service | torch threads | concurrency | images/s | p50 / p99 ms | mean ms in app "
        "| mean ms decode / queue / model / search (per request) | mean batch | statuses |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
        f"{service_rows}\n\n"
        "In process, images/s (model + search / model only) by batch size:\n\n"
        f"| torch threads | {sizes} | limit (batch) |\n"
        f"| --- | {' | '.join('---' for _ in args.batch_sizes)} | --- |\n"
        f"{bare_rows}\n\n"
        f"Decoding alone: {variants[0]['in_process']['decode_images_per_s_one_thread']} images/s "
        "on one thread.\n\n"
        f"Load average (1/5/15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
        f"after: {', '.join(f'{x:.2f}' for x in load_after)} on {os.cpu_count()} cores.\n"
    )
    write_results("service_vs_bare", results, table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
