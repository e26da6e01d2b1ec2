"""Stateful detection: fingerprint time, store time, Redis memory per query, throughput on/off.

1. *Fingerprint*: ``StatefulDetector.fingerprints`` (8-bit conversion, window hashes, sketch,
   digest) on decoded CIFAR-10 test images, one at a time and in batches of ``FINGERPRINT_BATCH``
   (the service screens a model batch at a time in process, whatever is waiting up to 64 on the
   screening thread with Redis).
2. *Stores*: ``--queries`` distinct CIFAR-10 training photos through the in-process store and
   the Redis store (a fresh redis-server, no persistence) capped at ``--cap``: time per
   check-and-store, and Redis ``used_memory`` as the store fills (bytes per stored query) and
   once it is full (steady state: the cap and the sweep hold it).
3. *Service*: ``advguard serve`` with stateful detection off and on, in process and with Redis
   (tracker and fingerprints), under closed-loop load of CIFAR-10 test JPEGs (``--images``
   distinct, from ``--clients`` ids): both variants run at once and are loaded in turn, short
   slices for several rounds, so the drifting load of a shared machine hits both alike; the
   throughput ratio is the figure.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch
from PIL import Image

from app.cli import at_least
from app.core.features import image_to_pixels
from app.core.guard import Guard
from app.core.images import decode_image
from app.core.models import PRESETS
from app.core.stateful.defaults import DEFAULT_RULE, default_scheme
from app.core.stateful.hashes import pixel_digests
from app.core.stateful.schemes import WindowHashScheme
from app.core.stateful.store import FingerprintStore, InProcessFingerprintStore
from app.service.fingerprints import RedisFingerprintStore
from app.service.settings import DEFAULT_BUNDLE
from app.service.stateful import StatefulDetector
from bench.common import (
    busy_interpreter,
    interval_verdict,
    ratio_by_round,
    ratio_cell,
    start_redis,
    write_results,
)
from bench.load_service import CIFAR_TAR, test_jpegs
from bench.service_load import Fill, Interleaving, interleaved, requests_of
from evaluation.honest_traffic import train_photos

SECRET = b"bench-secret"
# every benchmarked service: overload 503s answered at once, one stateful secret
SERVICE_ENV = {"ADVGUARD_SHED_DELAY_MS": "0", "ADVGUARD_STATEFUL_SECRET": SECRET.decode()}
THROUGHPUT_TARGET = 0.90  # stateful on / off (issue 13)
RATE = 100.0  # queries per second of the stores' timeline: all stay within the default TTL


def query_photos(count: int) -> np.ndarray:
    """``count`` distinct-looking queries from the 50,000 CIFAR-10 training photos: beyond
    them, the photos again, mirrored on odd rounds (a mirror reverses every window: a new
    fingerprint) and unchanged on even ones (by then their first copies have left a store
    capped below 100,000)."""
    photos = train_photos(CIFAR_TAR, min(count, 50_000))
    rounds = [photos if r % 2 == 0 else photos[..., ::-1] for r in range(-(-count // len(photos)))]
    return np.ascontiguousarray(np.concatenate(rounds)[:count])


FINGERPRINT_BATCH = 32
IMAGENET_FINGERPRINT_PROCESSES = 2  # the service's ADVGUARD_STATEFUL_FINGERPRINT_PROCESSES
IMAGENET_IMAGES = 320  # ten batches of 32 at 224x224 for each setting
BUSY_THREAD_IMAGES = 64  # two batches of 32 beside a busy interpreter thread, on its thread


def ms(values: list[float]) -> dict[str, float]:
    array = np.asarray(values) * 1000.0
    return {
        "mean": round(float(array.mean()), 4),
        "p50": round(float(np.percentile(array, 50)), 4),
        "p99": round(float(np.percentile(array, 99)), 4),
    }


def fingerprint_times(
    pixels: list[torch.Tensor],
    processes: int = 0,
    single: bool = True,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """``StatefulDetector.fingerprints`` per query, one at a time (``single``) and in batches
    of ``FINGERPRINT_BATCH`` (a screened batch's size), with ``processes`` fingerprint worker
    processes (``ADVGUARD_STATEFUL_FINGERPRINT_PROCESSES``; they take large images only) or
    the large images' window hashes on ``device`` (a GPU's, as the service's under auto)."""
    scheme = default_scheme(SECRET)
    detector = StatefulDetector(
        scheme,
        DEFAULT_RULE,
        InProcessFingerprintStore(scheme),
        "silent",
        fingerprint_processes=processes,
        fingerprint_device=device,
    )
    detector.fingerprints(pixels[:FINGERPRINT_BATCH])  # warm: hash tables, worker processes
    alone = []
    for p in pixels if single else []:
        t0 = time.perf_counter()
        detector.fingerprint(p)
        alone.append(time.perf_counter() - t0)
    batched = []
    for start in range(0, len(pixels) - FINGERPRINT_BATCH + 1, FINGERPRINT_BATCH):
        t0 = time.perf_counter()
        detector.fingerprints(pixels[start : start + FINGERPRINT_BATCH])
        batched.append((time.perf_counter() - t0) / FINGERPRINT_BATCH)
    detector.close()
    return {
        "images": len(pixels),
        "processes": processes,
        **({"ms": ms(alone)} if single else {}),
        "batch": FINGERPRINT_BATCH,
        "batch_ms": ms(batched),
    }


def fingerprint_cost(guard: Guard, jpegs: list[bytes]) -> dict[str, Any]:
    return fingerprint_times([guard.pixels(decode_image(data)) for data in jpegs])


def fingerprint_cost_imagenet(jpegs: list[bytes]) -> dict[str, Any]:
    """The fingerprint at ImageNet's input size: CIFAR-10 photos upscaled to 256 px and
    preprocessed like an ImageNet bundle's uploads (resize 256, crop 224), 150,528 values a
    query instead of 3,072 (no ImageNet here; the cost depends on the size, not on what the
    photo shows). On the screening thread and on the worker processes, each alone and beside a
    busy interpreter thread (``busy_interpreter``)."""
    preset = PRESETS["imagenet"]
    pixels = []
    for data in jpegs:
        picture = decode_image(data).resize(
            (preset.resize, preset.resize), Image.Resampling.BICUBIC
        )
        pixels.append(image_to_pixels(picture, preset))
    processes = IMAGENET_FINGERPRINT_PROCESSES
    pooled = fingerprint_times(pixels, processes)
    busy = {}
    # on the thread ~0.2 s a query: two batches; on the processes all ten
    for label, count, images in (("thread", 0, BUSY_THREAD_IMAGES), ("processes", processes, None)):
        with busy_interpreter():
            busy[label] = fingerprint_times(pixels[:images], count, single=False)
    return fingerprint_times(pixels) | {"side": preset.crop, "processes": pooled, "busy": busy}


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


BUSY_QUERIES = 3000  # one client's queries after the stores are full


def store_cost(photos: np.ndarray, cap: int, per_client: int) -> dict[str, Any]:
    """Both stores on the same queries (client ids cycling over 1,000, ``RATE`` queries a
    second, so that the cap, not the TTL, bounds everyone's queries): time per query, and the
    Redis store's memory as it fills and past its cap. Then, on the full stores,
    ``BUSY_QUERIES`` more (the photos flipped upside down: new fingerprints) from one busy
    client, each compared with that client's last ``per_client`` queries too."""
    scheme = default_scheme(SECRET)
    n = len(photos)
    busy = min(BUSY_QUERIES, n)
    everyone = _prints(scheme, photos)
    busy_prints = _prints(scheme, np.ascontiguousarray(photos[:busy, :, ::-1, :]))
    memory = InProcessFingerprintStore(scheme, max_fingerprints=cap, per_client=per_client)
    in_process = _timed(memory, everyone, lambda i: f"c{i % 1000}", 0)
    in_process_busy = _timed(memory, busy_prints, lambda i: "busy", n)
    with tempfile.TemporaryDirectory() as workdir:
        server, url = start_redis(Path(workdir), None)
        try:
            client = redis.Redis.from_url(url)
            red = RedisFingerprintStore(
                url, scheme, max_fingerprints=cap, per_client=per_client, timeout_s=5.0
            )
            base = used_memory(client)
            samples: list[tuple[int, int]] = []

            def sample(i: int) -> None:
                if (i + 1) % max(1, n // 40) == 0:
                    samples.append((i + 1, used_memory(client) - base))
                if i + 1 == cap:  # Redis's own time is counted from the full store on
                    client.config_resetstat()

            in_redis = _timed(red, everyone, lambda i: f"c{i % 1000}", 0, sample)
            script = client.info("commandstats").get("cmdstat_evalsha", {})
            entries = len(red)
            redis_busy = _timed(red, busy_prints, lambda i: "busy", n)
        finally:
            server.terminate()
            server.wait(10)
    at_cap = [used for stored, used in samples if stored <= cap]
    past_cap = [used for stored, used in samples if stored > cap]
    full = at_cap[-1] if at_cap else samples[-1][1]
    return {
        "queries": n,
        "cap": cap,
        "per_client": per_client,
        "clients": min(n, 1000),
        "in_process_ms": ms(in_process),
        "in_process_ms_full": ms(in_process[cap:]) if n > cap else None,
        "redis_ms": ms(in_redis),
        "redis_ms_full": ms(in_redis[cap:]) if n > cap else None,
        # Redis's own time in the script per query on the full store (INFO commandstats)
        "redis_script_ms_full": script["usec_per_call"] / 1000 if n > cap and script else None,
        "busy_queries": busy,
        "in_process_ms_busy_client": ms(in_process_busy),
        "redis_ms_busy_client": ms(redis_busy),
        "redis_used_memory_base_bytes": base,
        "redis_used_memory_samples": samples,
        "redis_bytes_at_cap": full,
        "redis_bytes_per_stored_query": round(full / min(cap, n), 1),
        "redis_bytes_past_cap_max": max(past_cap) if past_cap else None,
        "redis_entries_at_end": entries,
    }


Prints = tuple[np.ndarray, np.ndarray, list[bytes]]  # sketches, index keys, digests


def _prints(scheme: WindowHashScheme, photos: np.ndarray) -> Prints:
    chunks = range(0, len(photos), 2000)
    parts = [scheme.fingerprints_and_keys(photos[i : i + 2000]) for i in chunks]
    sketches = np.concatenate([part[0] for part in parts])
    keys = np.concatenate([part[1] for part in parts])
    return sketches, keys, pixel_digests(photos)


def _timed(
    store: FingerprintStore,
    prints: Prints,
    client_of: Callable[[int], str],
    start: int,
    after: Callable[[int], None] | None = None,
) -> list[float]:
    """Seconds per check-and-store of each query, the i-th stored at ``(start + i) / RATE``."""
    sketches, keys, digests = prints
    times = []
    for i in range(len(digests)):
        t0 = time.perf_counter()
        store.check_and_store(
            client_of(i), sketches[i], digests[i], (start + i) / RATE, None, keys[i]
        )
        times.append(time.perf_counter() - t0)
        if after is not None:
            after(i)
    return times


def throughput(args: argparse.Namespace, jpegs: list[bytes]) -> dict[str, Any]:
    base = dict(SERVICE_ENV)
    if args.torch_threads:
        base["ADVGUARD_TORCH_THREADS"] = str(args.torch_threads)
    backends = ["memory"] if args.no_redis_service else ["memory", "redis"]
    fill = None
    if args.fill:  # the training photos: none of them is among the timed test uploads
        photos = test_jpegs(args.fill, split="train")
        fill = Fill(requests_of(photos, args.clients), args.fill, frozenset({"on"}))
    runs: dict[str, Any] = {}
    for backend in backends:
        with tempfile.TemporaryDirectory() as workdir:
            env = dict(base)
            server = None
            if backend == "redis":
                server, url = start_redis(Path(workdir), None)
                env["ADVGUARD_REDIS_URL"] = url
            try:
                envs = {
                    state: {**env, "ADVGUARD_STATEFUL_ENABLED": str(state == "on").lower()}
                    for state in ("off", "on")
                }
                pid = None if server is None else server.pid
                plan = Interleaving(args.rounds, args.slice, args.concurrency, args.device)
                requests = requests_of(jpegs, args.clients)
                runs[backend] = interleaved(envs, requests, plan, backend, pid, fill)
            finally:
                if server is not None:
                    server.terminate()
                    server.wait(10)
    ratios = {
        backend: round(
            run["on"]["throughput_images_per_s"] / run["off"]["throughput_images_per_s"], 3
        )
        for backend, run in runs.items()
    }
    cpu_ratios = {
        backend: round(run["off"]["cpu_ms_per_request"] / run["on"]["cpu_ms_per_request"], 3)
        for backend, run in runs.items()
    }
    by_round = {
        backend: ratio_by_round(
            run["on"]["per_round_images_per_s"], run["off"]["per_round_images_per_s"]
        )
        for backend, run in runs.items()
    }
    return {
        "runs": runs,
        "on_over_off": ratios,
        "on_over_off_by_round": by_round,
        "cpu_off_over_on": cpu_ratios,
    }


def table(results: dict[str, Any], args: argparse.Namespace) -> str:
    """The results file's Markdown: the cost table, then the service's throughput (when run)."""
    lines = [
        "Stateful detection's cost (issue 13). **The machine was shared** with other engineers' "
        f"jobs (load average {results['loadavg_before'][0]:.1f} before, "
        f"{results['loadavg_after'][0]:.1f} after, 2 cores): absolute times are noisy"
        + ("; the on/off variants were measured together." if "throughput" in results else "."),
        "",
        "| figure | value |",
        "|---|---|",
        *_fingerprint_rows(results["fingerprint"], results["fingerprint_imagenet"]),
        *_store_rows(results["stores"]),
    ]
    tp = results.get("throughput")
    if tp:
        lines += _throughput_section(tp, args)
    return "\n".join(lines)


def _fingerprint_rows(cifar: dict[str, Any], imagenet: dict[str, Any]) -> list[str]:
    """The cost table's fingerprint rows: at 32x32, then at ImageNet's size."""
    fp = cifar["ms"]
    return [
        f"| fingerprint per query (8-bit pixels, window hashes, sketch, digest; 32x32) | "
        f"{fp['mean']:.3f} ms mean, {fp['p99']:.3f} ms p99 |",
        f"| the same, in batches of {cifar['batch']} | "
        f"{cifar['batch_ms']['mean']:.3f} ms mean per query |",
        f"| fingerprint per query at ImageNet's {imagenet['side']}x{imagenet['side']} (CIFAR-10 "
        f"photos upscaled) | {imagenet['ms']['mean']:.2f} ms mean, {imagenet['ms']['p99']:.2f} ms "
        f"p99; in batches of {imagenet['batch']}: {imagenet['batch_ms']['mean']:.2f} ms on the "
        f"screening thread, {imagenet['processes']['batch_ms']['mean']:.2f} ms on "
        f"{imagenet['processes']['processes']} worker processes |",
        f"| the same batches beside a busy interpreter thread (the event loop at saturation): "
        f"on the screening thread / on the worker processes | "
        f"{imagenet['busy']['thread']['batch_ms']['mean']:.2f} / "
        f"{imagenet['busy']['processes']['batch_ms']['mean']:.2f} ms per query (median "
        f"{imagenet['busy']['processes']['batch_ms']['p50']:.2f} over "
        f"{imagenet['busy']['processes']['images'] // imagenet['batch']} batches) |",
    ]


def _store_rows(st: dict[str, Any]) -> list[str]:
    """The cost table's rows of both stores: time per query and Redis's memory."""
    lines = [
        f"| in-process store, check + store per query (index; cap {st['cap']:,}, full) | "
        f"{(st['in_process_ms_full'] or st['in_process_ms'])['mean']:.3f} ms mean |",
        f"| Redis store, check + store per query (one script on one Redis, then the candidates' "
        f"records; loopback, full) | "
        f"{(st['redis_ms_full'] or st['redis_ms'])['mean']:.3f} ms mean, "
        f"{(st['redis_ms_full'] or st['redis_ms'])['p99']:.3f} ms p99 |",
        *(
            [
                f"| of which Redis's own time in the script (INFO commandstats, full) | "
                f"{st['redis_script_ms_full']:.3f} ms per query |"
            ]
            if st.get("redis_script_ms_full") is not None
            else []
        ),
        f"| the same, {st['busy_queries']:,} queries of one busy client on the full stores (each "
        f"also compared with its last {st['per_client']} queries): in process / Redis | "
        f"{st['in_process_ms_busy_client']['mean']:.3f} / "
        f"{st['redis_ms_busy_client']['mean']:.3f} ms mean |",
        f"| Redis memory per stored query (used_memory at the cap / cap) | "
        f"{st['redis_bytes_per_stored_query']:,.0f} bytes |",
        f"| Redis memory at the cap ({st['cap']:,} queries, {st['clients']:,} clients' strings) "
        f"| {st['redis_bytes_at_cap'] / 1e6:.1f} MB |",
    ]
    if st["redis_bytes_past_cap_max"] is not None:
        lines.append(
            f"| Redis memory at steady state (up to {st['queries']:,} queries, cap "
            f"{st['cap']:,}) | at most {st['redis_bytes_past_cap_max'] / 1e6:.1f} MB |"
        )
    return lines


def _throughput_section(tp: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The service's throughput with the stateful detector on and off, per backend."""
    who = f"{args.clients:,} client ids in turn" if args.clients else "one client"
    lines = [
        "",
        f"Service: both variants started together and loaded in turn ({args.rounds} rounds "
        f"of {args.slice:g} s each, concurrency {args.concurrency}, {who})"
        + _fill_words(tp, args)
        + ".",
        "",
        "| service | stateful off | on | on / off | on / off by round (95% interval) "
        "| CPU per request, off / on (service + Redis) |",
        "|---|---|---|---|---|---|",
    ]
    for backend, ratio in tp["on_over_off"].items():
        off, on = tp["runs"][backend]["off"], tp["runs"][backend]["on"]
        cpu_ratio = tp["cpu_off_over_on"][backend]
        by_round = tp.get("on_over_off_by_round", {}).get(backend)  # None: an older run
        verdict = interval_verdict(by_round, THROUGHPUT_TARGET)
        lines.append(
            f"| {backend} tracker and store | {off['throughput_images_per_s']:.0f} img/s | "
            f"{on['throughput_images_per_s']:.0f} img/s (stateful stage "
            f"{on['stateful_stage_ms_mean']:.2f} ms) | {ratio:.0%} | "
            f"{ratio_cell(by_round)} (target {THROUGHPUT_TARGET:.0%}: **{verdict}**) | "
            f"{off['cpu_ms_per_request']:.2f} / {on['cpu_ms_per_request']:.2f} ms: "
            f"{cpu_ratio:.0%} |"
        )
    per_round = "; ".join(
        f"{backend}: {run['off']['per_round_images_per_s']} / {run['on']['per_round_images_per_s']}"
        for backend, run in tp["runs"].items()
    )
    return [
        *lines,
        "",
        f"Throughput per round (img/s), off then on: {per_round}. On these shared cores "
        "throughput swings between slices, so the target is read on the by-round interval (met "
        "only when the whole interval clears it); pool the rounds of several runs of the same "
        f"code with `advguard bench pool_rounds --target {THROUGHPUT_TARGET:g}`. The CPU per "
        "request is steadier, and shown beside it.",
    ]


def _fill_words(tp: dict[str, Any], args: argparse.Namespace) -> str:
    """How the screened services' stores were filled before the timed slices (none: nothing)."""
    if not getattr(args, "fill", 0):
        return "; the screened services' stores held only the run's own queries"
    sent = [run["on"]["filled"]["sent"] for run in tp["runs"].values() if "filled" in run["on"]]
    return (
        f"; each screened service was first sent {args.fill:,} distinct CIFAR-10 training photos, "
        f"untimed ({', '.join(f'{n:,}' for n in sent)} sent in all), so that its store held them"
        " when the timed slices began"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--queries", type=at_least(1), default=20_000, help="store benchmark queries"
    )
    parser.add_argument("--cap", type=at_least(1), default=10_000, help="the stores' global cap")
    parser.add_argument(
        "--per-client",
        type=at_least(1),
        default=256,
        help="the stores' queries kept per client (default: %(default)s)",
    )
    parser.add_argument(
        "--images",
        type=at_least(1),
        default=10_000,
        help="distinct service uploads, sent in turn across a variant's slices",
    )
    parser.add_argument(
        "--concurrency",
        type=at_least(1),
        default=32,
        help="clients in flight (default: %(default)s)",
    )
    parser.add_argument("--rounds", type=at_least(1), default=6, help="load slices per variant")
    parser.add_argument("--slice", type=float, default=5.0, help="seconds per load slice")
    parser.add_argument(
        "--clients",
        type=at_least(0),
        default=1000,
        help="X-Client-ID values in turn; 0: one client",
    )
    parser.add_argument(
        "--device", default="cpu", help="the services' device: cuda / cpu (default: %(default)s)"
    )
    parser.add_argument("--no-service", action="store_true", help="skip the throughput runs")
    parser.add_argument(
        "--torch-threads",
        type=at_least(0),
        default=0,
        help="the services' torch threads; 0: torch's",
    )
    parser.add_argument(
        "--no-redis-service",
        action="store_true",
        help="throughput runs with the in-process stores only, none with Redis",
    )
    parser.add_argument(
        "--fill",
        type=at_least(0),
        default=0,
        help="untimed uploads of distinct CIFAR-10 training photos sent to each screened service "
        "before its warm-up, from the same client ids, so that the timed slices read a store "
        "that holds them (the default ring: 50000); 0: none (default: %(default)s)",
    )
    parser.add_argument(
        "--out", default="stateful_cost", help="results file name under bench/results"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    load_before = os.getloadavg()
    guard = Guard.load(DEFAULT_BUNDLE, device="cpu")
    jpegs = test_jpegs(args.images)
    results: dict[str, Any] = {"loadavg_before": load_before}
    results["fingerprint"] = fingerprint_cost(guard, jpegs[:2000])
    results["fingerprint_imagenet"] = fingerprint_cost_imagenet(jpegs[:IMAGENET_IMAGES])
    print("fingerprint:", results["fingerprint"], results["fingerprint_imagenet"], flush=True)
    results["stores"] = store_cost(query_photos(args.queries), args.cap, args.per_client)
    print("stores:", {k: v for k, v in results["stores"].items() if "samples" not in k}, flush=True)
    if not args.no_service:
        results["throughput"] = throughput(args, jpegs)
        print("throughput:", results["throughput"]["on_over_off"], flush=True)
    results["loadavg_after"] = os.getloadavg()
    results["settings"] = vars(args)
    path = write_results(args.out, results, table(results, args))
    print(path.read_text())
    return 0


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m bench.stateful_cost"))
