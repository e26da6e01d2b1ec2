"""Load benchmark of the guard service (a benchmark, not a test): loopback only, bounded.

Starts ``advguard serve`` on a free loopback port with the demo bundle, then for each
concurrency level sends CIFAR-10 test JPEGs (read from the tar) with that many requests in flight,
for at most ``--requests`` requests or ``--seconds`` seconds, whichever comes first. Reports
throughput (images/s), p50/p99 latency and the mean model batch size, and writes
bench/results/service_load.json and .md.

    .venv/bin/python -m bench.load_service --concurrency 1 8 32 --requests 600 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.cli import at_least
from bench.common import admin_base, command_line, serve

REPO = Path(__file__).resolve().parent.parent
CIFAR_TAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
RESULTS = REPO / "bench" / "results"


def test_jpegs(limit: int, tar_path: Path = CIFAR_TAR, split: str = "test") -> list[bytes]:
    """The first ``limit`` CIFAR-10 JPEGs of a split (``<split>/<class>/<name>.jpg`` members;
    the test photos by default, ``train`` for the 50,000 others) of a tar: the full ../shared
    archive, or a smaller one of the same layout carried elsewhere."""
    images: list[bytes] = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) >= 3 and parts[-3] == split:
                handle = tar.extractfile(member)
                assert handle is not None
                images.append(handle.read())
                if len(images) == limit:
                    break
    return images


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def metric_sum(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def run_level(
    base: str,
    admin: str,
    images: list[bytes],
    concurrency: int,
    max_requests: int,
    max_seconds: float,
) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    issued = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        before = (await client.get(f"{admin}/metrics")).text
        started = time.perf_counter()
        deadline = started + max_seconds

        async def worker() -> None:
            nonlocal issued
            while issued < max_requests and time.perf_counter() < deadline:
                data = images[issued % len(images)]
                issued += 1
                t0 = time.perf_counter()
                response = await client.post("/classify", files={"file": ("x.jpg", data)})
                latencies.append(time.perf_counter() - t0)
                key = str(response.status_code)
                statuses[key] = statuses.get(key, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        after = (await client.get(f"{admin}/metrics")).text
    batches = metric_sum(after, "advguard_batch_size_count") - metric_sum(
        before, "advguard_batch_size_count"
    )
    batched = metric_sum(after, "advguard_batch_size_sum") - metric_sum(
        before, "advguard_batch_size_sum"
    )
    ok = statuses.get("200", 0)
    lat = np.array(latencies) * 1000.0
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "ok": ok,
        "statuses": statuses,
        "seconds": round(elapsed, 3),
        "throughput_images_per_s": round(ok / elapsed, 1),
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 1),
        "latency_ms_p99": round(float(np.percentile(lat, 99)), 1),
        "latency_ms_mean": round(float(lat.mean()), 1),
        "mean_batch_size": round(batched / batches, 2) if batches else None,
    }


def _parser() -> argparse.ArgumentParser:
    """The levels, their bounds and the service's batching settings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--concurrency",
        type=at_least(1),
        nargs="+",
        default=[1, 8, 32],
        help="requests in flight, one level each (default: %(default)s)",
    )
    parser.add_argument("--requests", type=at_least(1), default=600, help="per level, at most")
    parser.add_argument("--seconds", type=float, default=30.0, help="per level, at most")
    parser.add_argument(
        "--warmup",
        type=at_least(0),
        default=30,
        help="warm-up requests before the levels, not reported (default: %(default)s)",
    )
    parser.add_argument(
        "--device", default="cpu", help="the service's device: cuda / cpu (default: %(default)s)"
    )
    parser.add_argument(
        "--max-batch-size",
        type=at_least(1),
        default=32,
        help="the service's ADVGUARD_MAX_BATCH_SIZE (default: %(default)s)",
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="the service's ADVGUARD_MAX_WAIT_MS (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "service_load",
        help="results path without suffix: .json and .md are written (default: %(default)s)",
    )
    return parser


def _load_levels(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every level's figures, each printed as it is measured, and the bundle the service served
    (asked before the service stops). The warm-up level is not reported: it only keeps the
    first level from paying for the model's first batches."""
    images = test_jpegs(1000)
    env = {
        "ADVGUARD_MAX_BATCH_SIZE": str(args.max_batch_size),
        "ADVGUARD_MAX_WAIT_MS": str(args.max_wait_ms),
    }
    with serve(env, args.device) as (base, server):
        admin = admin_base(server)
        asyncio.run(run_level(base, admin, images, 4, args.warmup, 30.0))
        levels = []
        for concurrency in args.concurrency:
            result = asyncio.run(
                run_level(base, admin, images, concurrency, args.requests, args.seconds)
            )
            print(json.dumps(result), flush=True)
            levels.append(result)
        bundle = httpx.get(f"{base}/v1/bundle", timeout=5).json()
    return levels, bundle


def _report(
    args: argparse.Namespace,
    levels: list[dict[str, Any]],
    bundle: dict[str, Any],
    loads: tuple[float, float],
) -> dict[str, Any]:
    """The results file: the levels with what they ran on (machine, load, bundle, settings), so
    that a figure can be judged against the conditions it was measured in."""
    load_before, load_after = loads
    command = command_line()
    best = max(levels, key=lambda level: level["throughput_images_per_s"])
    return {
        "command": command,
        "machine": {
            "nproc": os.cpu_count(),
            "cpu_model": cpu_model(),
            "platform": platform.platform(),
            "device": args.device,
            "note": "client and server share the machine's cores (loopback)",
            "loadavg_1min_before": round(load_before, 2),
            "loadavg_1min_after": round(load_after, 2),
        },
        "bundle": {"name": bundle["name"], "model_arch": bundle["model_arch"], "k": bundle["k"]},
        "settings": {"max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms},
        "saturation": {
            "concurrency": best["concurrency"],
            "throughput_images_per_s": best["throughput_images_per_s"],
            "latency_ms_p50": best["latency_ms_p50"],
            "latency_ms_p99": best["latency_ms_p99"],
        },
        "levels": levels,
    }


def _markdown(report: dict[str, Any], loads: tuple[float, float]) -> str:
    """The results file's markdown, from the report alone (and the unrounded load averages), so
    that the table and the JSON cannot disagree."""
    rows = "\n".join(
        f"| {lv['concurrency']} | {lv['ok']}/{lv['requests']} | {lv['throughput_images_per_s']} "
        f"| {lv['latency_ms_p50']} | {lv['latency_ms_p99']} | {lv['mean_batch_size']} |"
        for lv in report["levels"]
    )
    machine, bundle, best = report["machine"], report["bundle"], report["saturation"]
    settings = report["settings"]
    load_before, load_after = loads
    return (
        f"# Service load benchmark\n\n"
        f"`{report['command']}`\n\n"
        f"Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['platform']}, "
        f"model on {machine['device']}; the load client runs on the same cores over loopback.\n"
        f"Bundle {bundle['name']} ({bundle['model_arch']}, k={bundle['k']}); "
        f"max batch {settings['max_batch_size']}, max wait {settings['max_wait_ms']} ms; "
        "CIFAR-10 test JPEGs.\n\n"
        f"| concurrency | ok/requests | images/s | p50 ms | p99 ms | mean batch |\n"
        f"| --- | --- | --- | --- | --- | --- |\n{rows}\n\n"
        f"Saturation: {best['throughput_images_per_s']} images/s at concurrency "
        f"{best['concurrency']} (p50 {best['latency_ms_p50']} ms, "
        f"p99 {best['latency_ms_p99']} ms).\n\n"
        f"Load average (1 min) before/after the run: {load_before:.2f} / {load_after:.2f}; "
        f"other jobs sharing the cores inflate latencies and lower throughput.\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    load_before = os.getloadavg()[0]
    levels, bundle = _load_levels(args)
    loads = (load_before, os.getloadavg()[0])
    report = _report(args, levels, bundle, loads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(report, loads))
    return 0


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m bench.load_service"))
