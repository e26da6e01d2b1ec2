"""Memory of both client trackers under client-id rotation: 100,000 distinct ids, loopback only.

Without API keys every ``X-Client-ID`` value is a new client, so a client that rotates ids grows
whatever tracks clients. This drives ``--ids`` distinct ids (one honest request each; every
``--attacker-every``-th id an attacker sending ``--attacker-requests`` low-scoring requests, so
that it is flagged) straight through the trackers, without HTTP:

1. ``memory``: the in-process tracker at its default cap (``ADVGUARD_TRACKER_MAX_CLIENTS``);
2. ``memory-capped``: the in-process tracker capped at ``--cap`` ids, to show the plateau;
3. ``redis``: the Redis tracker on a redis-server without maxmemory (what one client costs);
4. ``redis-maxmemory``: the Redis tracker on a redis-server with ``--maxmemory`` and
   ``volatile-lru``, as deployed (docker-compose.yml, deploy/k8s/redis.yaml).

Beside each tracker, the blend test's memory (on by default in the service,
``ADVGUARD_STATEFUL_BLENDS``) keeps each id's queries as the service would: one entry (a 1,536-byte
sketch, its digest and answer) per request, in process capped at its default
``ADVGUARD_STATEFUL_BLEND_CLIENTS``, in Redis one list per client in the same server (so that
``maxmemory`` bounds both); ``--no-blends`` drives the trackers alone.

Each phase runs in a fresh Python process (RSS only grows within a process, and this one has
imported torch), which records its own RSS, the tracker's size and, for Redis, ``used_memory``
and evicted keys every ``--sample-every`` ids, and at the end checks that every attacker is still
flagged. Writes bench/results/client_rotation.json and .md.

    .venv/bin/python -m bench.client_rotation
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis

from app.cli import at_least
from app.core.flagging import FlagPolicy
from app.core.stateful.blends import (
    SKETCH_SIDE,
    BlendEntry,
    BlendMemory,
    BlendRule,
    InProcessBlendMemory,
)
from app.core.stateful.match_rule import Answer
from app.service.blend_memory import RedisBlendMemory
from app.service.redis_tracker import RedisTracker
from app.service.settings import Settings
from app.service.tracking import DEFAULT_MAX_CLIENTS, ClientTracker, InMemoryTracker, Observation

PHASES = ("memory", "memory-capped", "redis", "redis-maxmemory")
# Honest traffic scores about the demo bundle's honest mean (0.42); attackers score far lower.
HONEST_SCORE = 0.42
ATTACKER_SCORE = 0.1
POLICY = FlagPolicy("mean", threshold=0.3, min_requests=10)


def rss_bytes() -> int:
    """This process's resident set size (/proc/self/status, VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# --------------------------------------------------------------------------- one phase (child)


# the service's defaults (ADVGUARD_STATEFUL_BLEND_CLIENTS, ADVGUARD_STATEFUL_TTL_S)
BLEND_CLIENTS: int = Settings.model_fields["stateful_blend_clients"].default
BLEND_TTL_S: float = Settings.model_fields["stateful_ttl_s"].default
SKETCHES = 256  # distinct sketch contents, copied per entry (each entry owns its array)
ANSWER = Answer("accepted", 3, 0.9, HONEST_SCORE)


class Queries:
    """Each request's entry in the blend memory, as the service keeps it: a sketch of its own
    (a copy: the service's entries do not share arrays across batches), a digest, an answer."""

    def __init__(self, memory: BlendMemory | None) -> None:
        self.memory = memory
        rng = np.random.default_rng(0)
        shape = (SKETCHES, 3 * SKETCH_SIDE * SKETCH_SIDE)
        self.sketches = rng.integers(0, 256, size=shape).astype(np.float16)
        self.sent = 0

    def keep(self, client_id: str, requests: int, at: float) -> None:
        if self.memory is None:
            return
        entries = []
        for _ in range(requests):
            digest = self.sent.to_bytes(16, "little")
            entries.append(BlendEntry(self.sketches[self.sent % SKETCHES].copy(), digest, ANSWER))
            self.sent += 1
        self.memory.keep({client_id: entries}, at)


def drive(
    tracker: ClientTracker,
    queries: Queries,
    args: argparse.Namespace,
    sample: Callable[[int], dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[str]]:
    """Send every id through ``tracker`` (and its queries to the blend memory); a sample at 0
    and every ``sample_every`` ids."""
    samples = [sample(0)]
    attackers: list[str] = []
    now = time.time()
    for i in range(1, args.ids + 1):
        client_id = f"rotating-{i:07d}"
        at = now + i * 1e-3
        if i % args.attacker_every == 0:
            attackers.append(client_id)
            for j in range(args.attacker_requests):
                tracker.record(Observation(client_id, ATTACKER_SCORE, False, at + j * 1e-6))
            queries.keep(client_id, args.attacker_requests, at)
        else:
            tracker.record(Observation(client_id, HONEST_SCORE, True, at))
            queries.keep(client_id, 1, at)
        if i % args.sample_every == 0:
            samples.append(sample(i))
            print(json.dumps({"phase": args.phase, **samples[-1]}), file=sys.stderr, flush=True)
    return samples, attackers


def run_phase(args: argparse.Namespace) -> dict[str, Any]:
    """One phase in this process: its samples, and how many attackers are still flagged."""
    started = time.perf_counter()
    tracker: ClientTracker
    store: redis.Redis | None = None
    blends: BlendMemory | None = None
    if args.phase.startswith("memory"):
        cap = args.cap if args.phase == "memory-capped" else DEFAULT_MAX_CLIENTS
        memory = tracker = InMemoryTracker(POLICY, max_clients=cap)
        in_process = InProcessBlendMemory(
            BlendRule(),
            max_clients=BLEND_CLIENTS,
            ttl_s=BLEND_TTL_S,
        )
        blends = None if args.no_blends else in_process

        def sample(ids: int) -> dict[str, Any]:
            return {
                "ids": ids,
                "t_s": round(time.perf_counter() - started, 2),
                "rss_bytes": rss_bytes(),
                "entries": len(memory),
                "evicted": memory.evicted,
                "blend_clients": len(in_process),
            }

    else:
        tracker = RedisTracker(args.redis_url, POLICY, timeout_s=5.0)
        if not args.no_blends:
            blends = RedisBlendMemory(args.redis_url, BlendRule(), ttl_s=BLEND_TTL_S, timeout_s=5.0)
        store = redis.Redis.from_url(args.redis_url, socket_timeout=5.0)
        redis_store = store

        def sample(ids: int) -> dict[str, Any]:
            memory_info = redis_store.info("memory")
            return {
                "ids": ids,
                "t_s": round(time.perf_counter() - started, 2),
                "rss_bytes": rss_bytes(),
                "redis_used_memory": int(memory_info["used_memory"]),
                "redis_used_memory_rss": int(memory_info["used_memory_rss"]),
                "redis_keys": int(redis_store.dbsize()),
                "redis_evicted_keys": int(redis_store.info("stats")["evicted_keys"]),
            }

    samples, attackers = drive(tracker, Queries(blends), args, sample)
    flagged = {stats.client_id for stats in tracker.flagged_clients()}
    result = {
        "phase": args.phase,
        "samples": samples,
        "attackers": len(attackers),
        "attackers_still_flagged": sum(client_id in flagged for client_id in attackers),
        "flagged_listed": len(flagged),
        "seconds": round(time.perf_counter() - started, 1),
    }
    tracker.close()
    if isinstance(blends, RedisBlendMemory):
        blends.close()
    if store is not None:
        store.close()
    return result


# --------------------------------------------------------------------------- the run (parent)


def child(args: argparse.Namespace, phase: str, redis_url: str | None) -> dict[str, Any]:
    """Run one phase in a fresh interpreter (``--phase``) and read back its JSON."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, "-m", "bench.client_rotation", "--phase", phase]
        command += ["--out", out.name, "--ids", str(args.ids), "--cap", str(args.cap)]
        command += ["--sample-every", str(args.sample_every)]
        command += ["--attacker-every", str(args.attacker_every)]
        command += ["--attacker-requests", str(args.attacker_requests)]
        command += ["--no-blends"] if args.no_blends else []
        if redis_url:
            command += ["--redis-url", redis_url]
        subprocess.run(command, check=True, cwd=Path(__file__).resolve().parent.parent)
        result: dict[str, Any] = json.loads(Path(out.name).read_text())
        return result


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Growth from the first sample to the last, and per id."""
    first, last = result["samples"][0], result["samples"][-1]
    ids = max(last["ids"], 1)
    summary = {
        "rss_mb_start": round(first["rss_bytes"] / 2**20, 1),
        "rss_mb_end": round(last["rss_bytes"] / 2**20, 1),
        "rss_bytes_per_id": round((last["rss_bytes"] - first["rss_bytes"]) / ids),
    }
    if "redis_used_memory" in last:
        summary |= {
            "redis_used_memory_mb_start": round(first["redis_used_memory"] / 2**20, 2),
            "redis_used_memory_mb_end": round(last["redis_used_memory"] / 2**20, 2),
            "redis_used_memory_mb_max": round(
                max(s["redis_used_memory"] for s in result["samples"]) / 2**20, 2
            ),
            "redis_bytes_per_id": round(
                (last["redis_used_memory"] - first["redis_used_memory"]) / ids
            ),
            "redis_keys_end": last["redis_keys"],
            "redis_evicted_keys": last["redis_evicted_keys"],
        }
    else:
        summary |= {
            "entries_end": last["entries"],
            "evicted": last["evicted"],
            "blend_clients_end": last.get("blend_clients", 0),
        }
    return summary


def table(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> str:
    mb = 2**20
    head = (
        "| ids | memory: RSS MB (entries) | memory-capped: RSS MB (entries) "
        "| redis: used_memory MB (keys) | redis-maxmemory: used_memory MB (keys, evicted) |"
    )
    rows = [head, "| --- | --- | --- | --- | --- |"]
    samples = {phase: result["samples"] for phase, result in results.items()}
    for k, base in enumerate(samples["memory"]):
        m, c = base, samples["memory-capped"][k]
        r, x = samples["redis"][k], samples["redis-maxmemory"][k]
        rows.append(
            f"| {base['ids']:,} | {m['rss_bytes'] / mb:.1f} ({m['entries']:,}) "
            f"| {c['rss_bytes'] / mb:.1f} ({c['entries']:,}) "
            f"| {r['redis_used_memory'] / mb:.2f} ({r['redis_keys']:,}) "
            f"| {x['redis_used_memory'] / mb:.2f} ({x['redis_keys']:,}, "
            f"{x['redis_evicted_keys']:,}) |"
        )
    s = {phase: result["summary"] for phase, result in results.items()}
    flags = ", ".join(
        f"{phase} {r['attackers_still_flagged']}/{r['attackers']}" for phase, r in results.items()
    )
    blends = (
        "Trackers alone (`--no-blends`)."
        if args.no_blends
        else (
            "With the blend test's memory beside each tracker, as the service keeps it by "
            "default: an entry of 1,571 bytes per request, the last 8 per client; in process "
            f"for at most {BLEND_CLIENTS:,} clients (`ADVGUARD_STATEFUL_BLEND_CLIENTS`; "
            f"{s['memory']['blend_clients_end']:,} held at the end), in Redis a list per client "
            "with a 1-hour TTL in the same server."
        )
    )
    return (
        f"{args.ids:,} distinct client ids, one honest request each; every "
        f"{args.attacker_every:,}th id an attacker sending {args.attacker_requests} low-scoring "
        f"requests (flagged: mean policy, 10 requests). {blends} Trackers driven directly (no "
        f"HTTP); each phase in a fresh process. In-process: RSS of that process. Redis: "
        f"redis-server 7 `used_memory` (no persistence); the client process's RSS stays flat "
        f"({s['redis']['rss_mb_start']} -> {s['redis']['rss_mb_end']} MB).\n\n"
        + "\n".join(rows)
        + "\n\n"
        f"- in-process, default cap ({DEFAULT_MAX_CLIENTS:,}): RSS +"
        f"{s['memory']['rss_mb_end'] - s['memory']['rss_mb_start']:.1f} MB at "
        f"{args.ids:,} ids, **{s['memory']['rss_bytes_per_id']} bytes per client**; at the cap "
        f"that is the most the store can hold.\n"
        f"- in-process capped at {args.cap:,}: RSS +"
        f"{s['memory-capped']['rss_mb_end'] - s['memory-capped']['rss_mb_start']:.1f} MB, flat "
        f"once full ({s['memory-capped']['evicted']:,} least recently seen unflagged clients "
        f"evicted).\n"
        f"- Redis: used_memory +"
        f"{s['redis']['redis_used_memory_mb_end'] - s['redis']['redis_used_memory_mb_start']:.2f}"
        f" MB at {args.ids:,} ids, **{s['redis']['redis_bytes_per_id']} bytes per client** "
        f"(statistics hash with its TTL{'' if args.no_blends else ', blend list with its TTL'}; "
        f"flagged clients add a flag hash and an index entry).\n"
        f"- Redis with `maxmemory {args.maxmemory}` and `volatile-lru`: used_memory at most "
        f"{s['redis-maxmemory']['redis_used_memory_mb_max']} MB, "
        f"{s['redis-maxmemory']['redis_evicted_keys']:,} keys evicted (statistics"
        f"{'' if args.no_blends else ' and blend lists'}: both expire; flags do not).\n"
        f"- Attackers still flagged at the end: {flags}.\n"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ids",
        type=at_least(1),
        default=100_000,
        help="distinct client ids driven through each tracker (default: %(default)s)",
    )
    parser.add_argument(
        "--sample-every",
        type=at_least(1),
        default=10_000,
        help="ids between samples (default: %(default)s)",
    )
    parser.add_argument(
        "--cap", type=at_least(1), default=20_000, help="memory-capped's max_clients"
    )
    parser.add_argument("--maxmemory", default="8mb", help="redis-maxmemory's maxmemory")
    parser.add_argument(
        "--attacker-every",
        type=at_least(1),
        default=1000,
        help="every Nth id is an attacker (default: %(default)s)",
    )
    parser.add_argument(
        "--attacker-requests",
        type=at_least(0),
        default=10,
        help="low-scoring requests per attacker (default: %(default)s)",
    )
    parser.add_argument(
        "--no-blends",
        action="store_true",
        help="the trackers alone, without the blend test's memory (on in the service by default)",
    )
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # the child's part
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.phase:
        Path(args.out).write_text(json.dumps(run_phase(args)))
        return 0

    # bench.common imports torch: only here, in the parent, never in a phase
    from bench.common import start_redis, write_results

    load_before = os.getloadavg()
    results: dict[str, dict[str, Any]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="advguard-rotation-"))
    try:
        for phase in PHASES:
            process, url = None, None
            if phase.startswith("redis"):
                bound = args.maxmemory if phase == "redis-maxmemory" else None
                process, url = start_redis(workdir, bound)
            try:
                results[phase] = child(args, phase, url)
            finally:
                if process is not None:
                    process.kill()
                    process.wait(10)
            results[phase]["summary"] = summarise(results[phase])
            print(phase, json.dumps(results[phase]["summary"]), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    config = {k: v for k, v in vars(args).items() if k not in ("phase", "out", "redis_url")}
    path = write_results(
        "client_rotation",
        {
            "config": config,
            "load_average_before_after": [load_before, os.getloadavg()],
            "phases": results,
        },
        table(args, results),
    )
    print(path.read_text())
    return 0


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m bench.client_rotation"))
