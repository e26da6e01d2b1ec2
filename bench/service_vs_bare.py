"""What the service costs over the bare model and search, in one run on one machine.

(a) ``advguard serve`` with the guard (demo bundle, ``--device``), closed-loop load of CIFAR-10
    test JPEGs at each ``--concurrency`` for ``--seconds``: throughput, p50/p99 latency, and where
    a request's time goes (the service's stage histograms and its Server-Timing header);
(a') the same with the guard on a second bundle (``--compare-bundle``, e.g. the paper's one-vote
    detector next to a combined one), so two detectors' costs come from the same run;
(a-) the guard of (a) without the query-attack screening (``ADVGUARD_STATEFUL_ENABLED=false``):
    the per-image detector's own cost, apart from issue 13's fingerprints;
(b) the same service with the guard off (``ADVGUARD_GUARD_ENABLED=false``: model only);
(a, SETTING) with ``--also ADVGUARD_NAME=VALUE`` (repeatable), (a) with that setting changed,
    in the interleaved run only: what a default buys, measured beside it (for example
    ``ADVGUARD_SEARCH_THREADS=2``, ``ADVGUARD_MAX_BATCH_SIZE=64``);
(c) the in-process limit, no HTTP: the bundle's Guard on pixels decoded beforehand, model +
    search (``infer``, ``score``, ``decide``, as the batcher runs them) at each batch size of
    ``--batch-sizes``; the best is the limit. Model only (``Guard.classify``) likewise, the limit
    for (b). Decoding alone (the service's per-image work before the batcher) is timed too.

The detector's time by stage, in process on pixels decoded beforehand at ``--stage-batch``
images per batch, for each bundle: mean ms per image of the model forward (``Guard.infer``), of
each statistic kind (vote, mahalanobis, knn_distance; summed over the bundle's statistics of that
kind) and of the p-value combination. The services' histograms only split model from search; this
says which statistics the search time goes to.

Saturation of a service is its best throughput over the concurrency levels. Ratios against the
targets: a/b >= 90% (the guard's own cost) and a/c >= 70% (the service's overhead over the bare
limit); issue 12's target for a combined detector: guarded throughput >= 85% of the unguarded one
in the same run (a/b, a-/b and a'/b). Run one after the other, the services meet different
slices of a shared machine's drifting load, so the ratios are also measured *interleaved*
(``--rounds`` slices of ``--slice`` seconds per service, all services up at once, loaded in
turn), with the CPU time each service spent per answered request. Requests come from
``--clients`` ids in turn. The load client is ``bench.common.RawConnection`` (one
keep-alive connection per worker, prebuilt requests) and shares the cores with the service; (c)
and the stages are measured with nothing else running. Writes bench/results/service_vs_bare.json
and .md.

    .venv/bin/python -m bench.service_vs_bare --compare-bundle PAPER_BUNDLE
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.cli import at_least
from app.core import search
from app.core.guard import Guard
from app.core.images import decode_image
from app.core.statistics import STATISTIC_KINDS
from app.service.metrics import SCREENING_PARTS
from app.service.settings import DEFAULT_BUNDLE
from bench.common import (
    interval_verdict,
    ratio_by_round,
    ratio_cell,
    write_results,
)
from bench.load_service import test_jpegs
from bench.service_load import Interleaving, interleaved, pct, requests_of, run_service

DEFAULT_THREADS = torch.get_num_threads()
A_OVER_B_TARGET = 0.9  # the guard's own cost
A_OVER_C_TARGET = 0.7  # the service's overhead over the bare limit
GUARDED_OVER_UNGUARDED_TARGET = 0.85  # issue 12: a combined detector's cost, a/b and a'/b
ROLE_LABELS = {"a": "(a)", "a_prime": "(a')", "a_minus": "(a-)", "b": "(b)"}
SERVICES = {  # the services compared, by role
    "a": "(a) guard on",
    "a_prime": "(a') guard on, compare bundle",
    "a_minus": "(a-) guard on, no query screening",
    "b": "(b) guard off",
}


ALSO = "a+"  # role of (a) with an ``--also`` setting: ``a+ADVGUARD_NAME=VALUE``


def service_name(role: str) -> str:
    """A service's name in the tables, by role (``ALSO`` roles carry their setting)."""
    if role.startswith(ALSO):
        return f"(a) guard on, {role[len(ALSO) :]}"
    return SERVICES[role]


def role_label(role: str) -> str:
    """A service's short label, by role."""
    if role.startswith(ALSO):
        return f"(a, {role[len(ALSO) :]})"
    return ROLE_LABELS[role]


def also_setting(text: str) -> str:
    """``--also``'s argument: ``ADVGUARD_NAME=VALUE``."""
    name, sep, _ = text.partition("=")
    if not sep or not name.startswith("ADVGUARD_") or not name[len("ADVGUARD_") :]:
        raise argparse.ArgumentTypeError(f"expected ADVGUARD_NAME=VALUE, got {text!r}")
    return text


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


# --------------------------------------------------------------------------- detector stages


def decoded(guard: Guard, jpegs: list[bytes]) -> list[torch.Tensor]:
    """The guard's pixels of every JPEG (each bundle with its own preprocessing)."""
    return [guard.pixels(decode_image(data)) for data in jpegs]


def one_batch_stages(guard: Guard, pixels: torch.Tensor) -> tuple[float, list[float], float]:
    """Seconds of one batch's model forward, of each statistic (in the detector's order) and of
    the combination: ``Detector.score`` split where its work is. A suspect margin's seconds
    include its deferred second pass over the suspects (``Guard.look_again``)."""
    detector = guard.detector
    t0 = time.perf_counter()
    batch = guard.infer(pixels)
    model = time.perf_counter() - t0
    values = np.full((len(batch.predictions), len(detector.statistics)), np.nan)
    statistic_seconds = [0.0] * len(detector.statistics)
    features = batch.features
    look_again = guard.look_again(batch)
    for i in [*detector.plain_columns, *detector.suspect_columns]:
        t0 = time.perf_counter()
        if i in detector.suspect_columns and look_again is not None:
            needed = [layer for layer in detector.deferred_layers if layer not in features]
            if needed:
                features = {**features, **look_again(detector.suspects(values))}
        values[:, i] = detector.statistics[i].values(features, batch.predictions)
        statistic_seconds[i] = time.perf_counter() - t0
    t0 = time.perf_counter()
    detector.combine(values)
    return model, statistic_seconds, time.perf_counter() - t0


def stage_times(
    guard: Guard, pixels: list[torch.Tensor], batch: int, min_s: float
) -> dict[str, Any]:
    """Mean ms per image of each stage of a verdict on ``batch``-image batches cycling through
    ``pixels``, for at least ``min_s`` seconds and 2 batches after one warm-up batch: the model
    forward, each statistic kind present (summed over its statistics, and each statistic alone)
    and the combination. A combined detector is worth its cost only if one knows which of its
    statistics the cost is; the service's histograms lump them together as "search"."""
    detector = guard.detector
    names = detector.names
    kinds = [statistic.kind for statistic in detector.statistics]
    n = len(pixels)

    def stacked(k: int) -> torch.Tensor:
        return torch.stack([pixels[(k * batch + j) % n] for j in range(batch)])

    one_batch_stages(guard, stacked(0))
    model, combination = 0.0, 0.0
    per_statistic = [0.0] * len(names)
    batches = 0
    started = time.perf_counter()
    while batches < 2 or time.perf_counter() - started < min_s:
        batch_model, batch_statistics, batch_combination = one_batch_stages(
            guard, stacked(batches + 1)
        )
        model += batch_model
        combination += batch_combination
        per_statistic = [
            total + s for total, s in zip(per_statistic, batch_statistics, strict=True)
        ]
        batches += 1
    images = batches * batch

    def ms(seconds: float) -> float:
        return round(seconds / images * 1000.0, 4)

    by_kind = {
        kind: ms(sum(s for s, k in zip(per_statistic, kinds, strict=True) if k == kind))
        for kind in STATISTIC_KINDS
        if kind in kinds
    }
    detector_ms = ms(sum(per_statistic) + combination)
    return {
        "batch_size": batch,
        "batches": batches,
        "images": images,
        "combination": detector.combination,
        "statistic_count": {kind: kinds.count(kind) for kind in by_kind},
        "model_ms": ms(model),
        "statistic_ms": by_kind,
        "combination_ms": ms(combination),
        "detector_ms": detector_ms,
        "total_ms": round(ms(model) + detector_ms, 4),
        "by_statistic_ms": {
            name: ms(seconds) for name, seconds in zip(names, per_statistic, strict=True)
        },
    }


def detector_stages(
    threads: int,
    bundles: list[tuple[str, Path, Guard]],
    jpegs: list[bytes],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """The stage times of every bundle with ``threads`` intra-op torch threads, one row each."""
    threads = use_threads(threads)
    rows = []
    for role, path, guard in bundles:
        timed = stage_times(guard, decoded(guard, jpegs), args.stage_batch, args.min_seconds)
        row = {"role": role, "bundle": path.name, "torch_threads": threads, **timed}
        print("detector stages:", row, flush=True)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- report


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def use_threads(threads: int) -> int:
    """Set ``threads`` intra-op torch threads (0: torch's default, one per core) in this process;
    returns the count set, which the services get too (ADVGUARD_TORCH_THREADS)."""
    torch.set_num_threads(threads or DEFAULT_THREADS)
    return torch.get_num_threads()


def saturation(service: dict[str, Any]) -> float:
    best: float = service["saturation"]["throughput_images_per_s"]
    return best


def run_variant(
    threads: int, args: argparse.Namespace, guard: Guard, jpegs: list[bytes]
) -> dict[str, Any]:
    """(c), (a), (a'), (a-) and (b) with ``threads`` intra-op torch threads, in the benchmark
    process and in the services. The services' concurrency sweeps run one after the other; then
    (unless ``--rounds 0``) all of them at once, loaded in turn in short slices, so that the
    drifting load of a shared machine hits each alike: those are the ratios to read. (c) is
    timed again at the end to show the machine's drift."""
    threads = use_threads(threads)
    label = f"{threads} torch threads"
    bare = in_process(guard, jpegs, args.batch_sizes, args.min_seconds)
    envs = service_envs(args, threads)
    swept = {
        role: run_service(env, args, jpegs, f"{SERVICES[role]}, {label}", clients=args.clients)
        for role, env in envs.items()
    }
    guarded, unscreened, unguarded = swept["a"], swept["a_minus"], swept["b"]
    compared = swept.get("a_prime")
    together = None
    if args.rounds > 0:
        plan = Interleaving(args.rounds, args.slice, max(args.concurrency), args.device)
        together = interleaved(
            {**envs, **also_envs(args, envs["a"])},
            requests_of(jpegs, args.clients),
            plan,
            label,
        )
    pixels = decoded(guard, jpegs)

    def model_and_search(batch: torch.Tensor) -> None:
        features = guard.infer(batch)
        guard.decide(features, guard.score(features))

    best = bare["limit"]["batch_size"]
    bare["limit_again_after"] = time_batches(model_and_search, pixels, best, args.min_seconds)
    a, b = saturation(guarded), saturation(unguarded)
    a_prime = None if compared is None else saturation(compared)
    return {
        "torch_threads": threads,
        "service_guard_on": guarded,
        "service_guard_on_compare": compared,
        "service_guard_on_unscreened": unscreened,
        "service_guard_off": unguarded,
        "in_process": bare,
        "a_over_b": ratio(a, b),
        "a_prime_over_b": None if a_prime is None else ratio(a_prime, b),
        "a_unscreened_over_b": ratio(saturation(unscreened), b),
        "a_over_a_prime": None if a_prime is None else ratio(a, a_prime),
        "a_over_c": ratio(a, bare["limit"]["images_per_s"]),
        "interleaved": None if together is None else interleaved_ratios(together),
    }


def service_envs(args: argparse.Namespace, threads: int) -> dict[str, dict[str, str]]:
    """The services compared, by role: (a), (a') when a compare bundle is given, (a-), (b)."""
    env = {
        "ADVGUARD_BUNDLE": str(args.bundle),
        "ADVGUARD_TORCH_THREADS": str(threads),
        "ADVGUARD_SEARCH_THREADS": str(args.search_threads),
    }
    envs = {"a": env}
    if args.compare_bundle is not None:
        envs["a_prime"] = {**env, "ADVGUARD_BUNDLE": str(args.compare_bundle)}
    envs["a_minus"] = {**env, "ADVGUARD_STATEFUL_ENABLED": "false"}
    envs["b"] = {**env, "ADVGUARD_GUARD_ENABLED": "false"}
    return envs


def also_envs(args: argparse.Namespace, guarded: dict[str, str]) -> dict[str, dict[str, str]]:
    """(a) with each ``--also`` setting, by role (interleaved run only)."""
    envs = {}
    for setting in args.also or []:
        name, _, value = setting.partition("=")
        envs[ALSO + setting] = {**guarded, name: value}
    return envs


def interleaved_ratios(together: dict[str, Any]) -> dict[str, Any]:
    """Each service of an interleaved run against (b): throughput ratio and the inverse ratio
    of CPU per answered request (the steadier of the two on shared cores)."""
    off = together["b"]
    return {
        "services": together,
        "throughput_over_b": {
            role: ratio(run["throughput_images_per_s"], off["throughput_images_per_s"])
            for role, run in together.items()
        },
        "b_cpu_over_cpu": {
            role: ratio(off["cpu_ms_per_request"], run["cpu_ms_per_request"])
            for role, run in together.items()
        },
        "throughput_over_b_by_round": {
            role: ratio_by_round(run["per_round_images_per_s"], off["per_round_images_per_s"])
            for role, run in together.items()
        },
    }


# --------------------------------------------------------------------------- markdown


def percent(value: float | None) -> str:
    """``88.0%``; ``-`` when not measured. A point ratio is shown, never judged: targets are
    judged on a by-round interval (``round_verdict``)."""
    if value is None:
        return "-"
    return f"{value:.1%}"


def service_rows(name: str, threads: int, service: dict[str, Any] | None) -> list[str]:
    out = []
    for lv in service["levels"] if service else []:
        st = lv["stage_ms_mean"]
        out.append(
            f"| {name} | {threads} | {lv['concurrency']} | {lv['throughput_images_per_s']} "
            f"| {lv['latency_ms_p50']} / {lv['latency_ms_p99']} | {lv['in_app_ms_mean']} "
            f"| {st['decode']} / {st['queue']} / {st['model']} / {st['search']} "
            f"| {lv['mean_batch_size']} | {lv['statuses']} |"
        )
    return out


def ratio_table(variants: list[dict[str, Any]], compare: str) -> str:
    rows = [
        f"| {v['torch_threads']} | {saturation(v['service_guard_on'])} "
        f"| {saturation(v['service_guard_on_compare']) if v['service_guard_on_compare'] else '-'} "
        f"| {saturation(v['service_guard_on_unscreened'])} "
        f"| {saturation(v['service_guard_off'])} | {v['in_process']['limit']['images_per_s']} "
        f"| {percent(v['a_over_b'])} | {percent(v['a_unscreened_over_b'])} "
        f"| {percent(v['a_prime_over_b'])} "
        f"| {percent(v['a_over_a_prime'])} | {percent(v['a_over_c'])} |"
        for v in variants
    ]
    return (
        f"| torch threads | (a) guard on images/s | (a') guard on, {compare} images/s "
        "| (a-) guard on, no query screening images/s | (b) guard off images/s "
        "| (c) in-process limit | a / b (target 90%) | a- / b | a' / b | a / a' "
        "| a / c (target 70%) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
        "| --- |\n" + "\n".join(rows)
    )


def issue_target_line(variants: list[dict[str, Any]], compare: str) -> str:
    """Issue 12's cost target, guarded throughput >= 85% of the unguarded one in the same run,
    for each bundle at each thread setting."""
    parts = []
    for v in variants:
        if v["interleaved"] is not None:  # the steadier comparison, when it ran
            run = v["interleaved"]
            checks = [
                f"{role_label(role)} {percent(run['throughput_over_b'][role])} of the "
                f"throughput ({by_round(run, role)} by round: "
                f"{round_verdict(run, role)}), "
                f"{percent(run['b_cpu_over_cpu'][role])} by CPU per request"
                for role in run["services"]
                if role != "b"
            ]
            parts.append(f"{v['torch_threads']} torch threads, interleaved: " + ", ".join(checks))
        checks = [
            f"(a) {percent(v['a_over_b'])}",
            "(a-) without query screening " + percent(v["a_unscreened_over_b"]),
        ]
        if v["a_prime_over_b"] is not None:
            checks.append(f"(a') {compare} {percent(v['a_prime_over_b'])}")
        parts.append(
            f"{v['torch_threads']} torch threads, best levels (one level each, no interval: "
            "no verdict): " + ", ".join(checks)
        )
    return (
        "Issue 12 target, guarded throughput >= 85% of the unguarded one (b) in the same run, "
        "judged on the by-round interval (met only when all of it clears 85%; pool runs with "
        "`advguard bench pool_rounds --target 0.85`): " + "; ".join(parts) + "."
    )


def round_verdict(run: dict[str, Any], role: str) -> str:
    """Issue 12's target read on a service's by-round interval (``interval_verdict``)."""
    found = run.get("throughput_over_b_by_round", {}).get(role)
    return interval_verdict(found, GUARDED_OVER_UNGUARDED_TARGET)


def by_round(run: dict[str, Any], role: str) -> str:
    """``87.1% (85.0-89.3%)``: a service's throughput over (b) round by round, with its
    interval (``bench.common.paired_ratio``); ``-`` for runs written before it."""
    return ratio_cell(run.get("throughput_over_b_by_round", {}).get(role))


def interleaved_table(variants: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The services run at once and loaded in turn: throughput and CPU per request against (b),
    and issue 12's target read on both."""
    rows = []
    for v in variants:
        run = v["interleaved"]
        if run is None:
            continue
        for role, service in run["services"].items():
            to_b, cpu_to_b = run["throughput_over_b"][role], run["b_cpu_over_cpu"][role]
            judged = "" if role == "b" else f": {round_verdict(run, role)}"
            screening = service.get("screening_ms_per_query", {})
            spent = " / ".join(str(screening.get(part, 0)) for part in SCREENING_PARTS)
            rows.append(
                f"| {service_name(role)} | {v['torch_threads']} "
                f"| {service['throughput_images_per_s']} | {percent(to_b)} "
                f"| {by_round(run, role)}{judged} | {service['cpu_ms_per_request']} "
                f"| {percent(cpu_to_b)} "
                f"| {spent if any(screening.values()) else '-'} "
                f"| {service['per_round_images_per_s']} |"
            )
    if not rows:
        return "Interleaved comparison: not run (`--rounds 0`)."
    who = f"{args.clients:,} client ids in turn" if args.clients else "one client"
    return (
        f"Interleaved: every service started at once and loaded in turn, {args.rounds} slices "
        f"of {args.slice:g} s each at concurrency {max(args.concurrency)} (the order flipped "
        f"every round), {who}. On shared cores the CPU per answered request is the steadier "
        "figure; issue 12's target (>= 85% of (b)) is judged on the by-round interval. By "
        "round: the geometric mean "
        "of each round's ratio of the two slices, run in the same round, with a bootstrap interval "
        "over rounds (`bench.common.paired_ratio`). The query screening's time "
        f"per screened query ({' / '.join(SCREENING_PARTS)}, ms) is the service's "
        "`advguard_screening_seconds_total`.\n\n"
        "| service | torch threads | images/s | / (b) | / (b) by round (95% interval) "
        "| CPU ms per request | (b)'s CPU / this CPU | screening ms per query "
        "| images/s per slice |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows)
    )


def stage_table(stages: list[dict[str, Any]], batch: int) -> str:
    def cell(row: dict[str, Any], kind: str) -> str:
        if kind not in row["statistic_ms"]:
            return "-"
        return f"{row['statistic_ms'][kind]} ({row['statistic_count'][kind]})"

    rows = [
        f"| {ROLE_LABELS[row['role']]} {row['bundle']} | {row['torch_threads']} "
        f"| {row['model_ms']} | "
        + " | ".join(cell(row, kind) for kind in STATISTIC_KINDS)
        + f" | {row['combination_ms']} ({row['combination']}) | {row['detector_ms']} "
        f"| {row['total_ms']} |"
        for row in stages
    ]
    return (
        f"Detector time by stage, in process on pixels decoded beforehand, batches of {batch}: "
        "mean ms per image (statistics: summed over the bundle's statistics of the kind, their "
        "count in brackets; each statistic alone is in the JSON).\n\n"
        f"| bundle | torch threads | model | {' | '.join(STATISTIC_KINDS)} | combination "
        "| detector | model + detector |\n"
        f"| --- | --- | --- | {' | '.join('---' for _ in STATISTIC_KINDS)} | --- | --- | --- |\n"
        + "\n".join(rows)
    )


def also_note(args: argparse.Namespace) -> str:
    if not args.also:
        return ""
    return f" (and (a) with {', '.join(args.also)}: interleaved run only)"


def markdown(
    args: argparse.Namespace,
    variants: list[dict[str, Any]],
    stages: list[dict[str, Any]],
    ratios: dict[str, Any],
    load: tuple[tuple[float, ...], tuple[float, ...]],
) -> str:
    compare = args.compare_bundle.name if args.compare_bundle is not None else "(none)"
    services = []
    for v in variants:
        threads = v["torch_threads"]
        services += service_rows("(a) guard on", threads, v["service_guard_on"])
        services += service_rows(
            f"(a') guard on, {compare}", threads, v["service_guard_on_compare"]
        )
        services += service_rows(
            "(a-) guard on, no query screening", threads, v["service_guard_on_unscreened"]
        )
        services += service_rows("(b) guard off", threads, v["service_guard_off"])
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
    sizes = " | ".join(str(size) for size in args.batch_sizes)
    a_best, c_best = ratios["best_a"], ratios["best_c"]
    load_before, load_after = load
    return (
        f"CIFAR-10 test JPEGs ({args.images}), bundle `{args.bundle.name}` (a), compare bundle "
        f"`{compare}` (a'), model on {args.device}, faiss search threads "
        f"{args.search_threads}{also_note(args)}. Services: closed-loop load for "
        f"{args.seconds} s per level, one keep-alive connection per client (raw asyncio client, "
        "on the same cores as the service); saturation = the best level. In process: no HTTP, "
        "pixels decoded beforehand.\n\n"
        f"{ratio_table(variants, compare)}\n\n"
        f"{issue_target_line(variants, compare)}\n\n"
        f"{interleaved_table(variants, args)}\n\n"
        f"Best service (a) over best in-process limit (c): {a_best} / {c_best} images/s = "
        f"{ratios['best_a_over_best_c']:.1%}.\n\n"
        f"{stage_table(stages, args.stage_batch)}\n\n"
        "| service | torch threads | concurrency | images/s | p50 / p99 ms | mean ms in app "
        "| mean ms decode / queue / model / search (per request) | mean batch | statuses |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
        + "\n".join(services)
        + "\n\nIn process, images/s (model + search / model only) by batch size:\n\n"
        f"| torch threads | {sizes} | limit (batch) |\n"
        f"| --- | {' | '.join('---' for _ in args.batch_sizes)} | --- |\n"
        f"{bare_rows}\n\n"
        f"Decoding alone: {variants[0]['in_process']['decode_images_per_s_one_thread']} images/s "
        "on one thread.\n\n"
        f"Load average (1/5/15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
        f"after: {', '.join(f'{x:.2f}' for x in load_after)} on {os.cpu_count()} cores.\n"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--concurrency",
        type=at_least(1),
        nargs="+",
        default=[8, 32],
        help="clients in flight, a sweep level each; the highest also interleaved "
        "(default: %(default)s)",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="per concurrency level")
    parser.add_argument(
        "--batch-sizes",
        type=at_least(1),
        nargs="+",
        default=[1, 2, 4, 8, 16, 32, 64, 128, 256],
        help="batch sizes of the in-process limit (c); the best is the limit "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--min-seconds", type=float, default=1.0, help="per batch size, and per bundle's stages"
    )
    parser.add_argument(
        "--stage-batch",
        type=at_least(1),
        default=32,
        help="batch size of the detector's stage times",
    )
    parser.add_argument(
        "--torch-threads",
        type=at_least(0),
        nargs="+",
        default=[0, 1],
        help="intra-op torch threads, one run of (c), (a), (a'), (b) each; 0: torch's default",
    )
    parser.add_argument(
        "--search-threads",
        type=at_least(1),
        default=search.SERVING_THREADS,
        help="faiss CPU search threads, in this process (c, stages) and in every service",
    )
    parser.add_argument(
        "--also",
        type=also_setting,
        action="append",
        metavar="ADVGUARD_NAME=VALUE",
        help="also interleave (a) with this setting changed (repeatable)",
    )
    parser.add_argument(
        "--images",
        type=at_least(1),
        default=10_000,
        help="distinct CIFAR-10 test uploads, sent in turn across a service's slices (all 10,000: "
        "a run sends each about twice, so most queries are not resends)",
    )
    parser.add_argument(
        "--clients",
        type=at_least(0),
        default=1000,
        help="X-Client-ID values in turn (0: one client)",
    )
    parser.add_argument(
        "--rounds",
        type=at_least(0),
        default=6,
        help="interleaved slices per service at the highest concurrency (0: sweeps only)",
    )
    parser.add_argument("--slice", type=float, default=5.0, help="seconds per interleaved slice")
    parser.add_argument(
        "--device",
        default="cpu",
        help="the model's device, in process and in the services (default: %(default)s)",
    )
    parser.add_argument(
        "--bundle",
        type=Path,
        default=DEFAULT_BUNDLE,
        help="bundle of (a), (a-), (b), (c) and the stages (default: the demo's)",
    )
    parser.add_argument(
        "--compare-bundle",
        type=Path,
        default=None,
        help="a second bundle served as (a') and timed by stage (e.g. the paper's detector)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    search.set_threads(args.search_threads)
    load_before = os.getloadavg()
    jpegs = test_jpegs(args.images)
    guard = Guard.load(args.bundle, device=args.device)
    bundles = [("a", args.bundle, guard)]
    if args.compare_bundle is not None:
        compare_guard = Guard.load(args.compare_bundle, device=args.device)
        bundles.append(("a_prime", args.compare_bundle, compare_guard))
    stages: list[dict[str, Any]] = []
    variants = []
    for threads in args.torch_threads:
        stages += detector_stages(threads, bundles, jpegs, args)
        variants.append(run_variant(threads, args, guard, jpegs))
    load_after = os.getloadavg()

    # the in-process limit is the best over every thread setting; the service's best likewise
    c_best = max(v["in_process"]["limit"]["images_per_s"] for v in variants)
    a_best = max(saturation(v["service_guard_on"]) for v in variants)
    ratios = {
        "a_over_b_target": A_OVER_B_TARGET,
        "a_over_c_target": A_OVER_C_TARGET,
        "guarded_over_unguarded_target": GUARDED_OVER_UNGUARDED_TARGET,
        "by_threads": {
            str(v["torch_threads"]): {
                key: v[key] for key in ("a_over_b", "a_prime_over_b", "a_over_a_prime", "a_over_c")
            }
            for v in variants
        },
        "best_a": a_best,
        "best_c": c_best,
        "best_a_over_best_c": ratio(a_best, c_best),
    }
    results = {
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "variants": variants,
        "detector_stages": stages,
        "ratios": ratios,
    }
    table = markdown(args, variants, stages, ratios, (load_before, load_after))
    write_results("service_vs_bare", results, table)
    print(table)
    return 0


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m bench.service_vs_bare"))
