"""The service on the GPU under load: guard on, guard off and the in-process limit, in one run.

The bundle is ResNet-50 with random weights (224 px) whose vote searches a synthetic
1.28M x 256 flat index (``bench.gpu.synthetic.enlarge_bundle``) with the torch exact search on
the GPU; the Mahalanobis statistics are numpy on the CPU, as in production. Steps, in order:

1. Execution of the model (in process): fp32, bf16 and fp16 autocast, each with and without
   channels_last, on the same images at one batch size. A variant is eligible only if every
   decision (predicted class and accepted/rejected) equals fp32's; the eligible variant with the
   highest model-only rate is kept for everything after (these settings change the model alone,
   so its own rate ranks them; the guarded rate is reported beside it). On random weights the
   logits of different classes are close, so a lower precision may well flip a prediction: then
   fp32 is kept, which is the answer the check exists to give.
2. (c) the in-process limit: ``bench.service_vs_bare.in_process`` at each batch size (model +
   search, and model only), and the detector's time by stage (``stage_times``).
3. (a) ``advguard serve`` with the guard, one run per ``ADVGUARD_MAX_BATCH_SIZE`` of the sweep,
   closed-loop load at one concurrency (``run_service``); (b) the same with the guard off, and
   (a-) the guard without the query screening (issue 13's stateful detection, which the default
   service runs), both at the sweep's largest batch size (``compared_size``), which (a) is
   compared at too: one size for all, not (a)'s best, which on a noisy machine may be a size
   that starves the others (on 2026-11-30 (a) peaked at 32 by 2%, and (a-) ran at 54% of (b)
   there). Deadline shedding is off
   (``ADVGUARD_LATENCY_BUDGET_MS=0``) and the queue holds every client, so the figures are
   throughput, not the admission policy. Requests come from ``CLIENT_IDS`` client ids in turn,
   as in ``bench.service_vs_bare``; the client tracker is the in-process one (no Redis on that
   machine), and with the model on the GPU the screening runs on its own thread.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.core.features import Precision
from app.core.guard import Guard, Verdict
from app.core.images import decode_image
from bench.service_load import run_service
from bench.service_vs_bare import in_process, ratio, saturation, stage_times
from bench.service_vs_bare import time_batches as timed

VARIANTS: tuple[tuple[Precision, bool], ...] = (
    ("fp32", False),
    ("fp32", True),
    ("bf16", False),
    ("bf16", True),
    ("fp16", False),
    ("fp16", True),
)
CLIENT_IDS = 1000  # X-Client-ID values in turn, as bench.service_vs_bare's default


def verdicts(guard: Guard, pixels: torch.Tensor, batch: int) -> list[Verdict]:
    found: list[Verdict] = []
    for start in range(0, pixels.shape[0], batch):
        found += guard.classify_pixels(pixels[start : start + batch])
    return found


def guarded_run(guard: Guard) -> Callable[[torch.Tensor], None]:
    def run(batch: torch.Tensor) -> None:
        features = guard.infer(batch)
        guard.decide(features, guard.score(features))

    return run


def variant_row(
    guard: Guard,
    pixels: list[torch.Tensor],
    reference: list[Verdict],
    batch: int,
    min_s: float,
) -> dict[str, Any]:
    """Decisions against fp32's and the rates of the network's current execution settings."""
    found = verdicts(guard, torch.stack(pixels), batch)
    pairs = list(zip(found, reference, strict=True))
    same_prediction = [f.predicted_class == r.predicted_class for f, r in pairs]
    same_decision = [
        f.predicted_class == r.predicted_class and f.accepted == r.accepted for f, r in pairs
    ]
    return {
        "predictions_identical": sum(same_prediction),
        "decisions_identical": sum(same_decision),
        "max_abs_score_difference": max(abs(f.score - r.score) for f, r in pairs),
        "model_only": timed(guard.classify, pixels, batch, min_s),
        "model_and_search": timed(guarded_run(guard), pixels, batch, min_s),
    }


def choose_execution(
    guard: Guard,
    jpegs: list[bytes],
    batch: int,
    min_s: float,
    variants: tuple[tuple[Precision, bool], ...] = VARIANTS,
) -> dict[str, Any]:
    """Every variant of ``variants``; leaves the guard on the one kept (see the docstring)."""
    pixels = [guard.pixels(decode_image(data)) for data in jpegs]
    guard.network.set_execution("fp32", False)
    reference = verdicts(guard, torch.stack(pixels), batch)
    rows = []
    for precision, channels_last in variants:
        row: dict[str, Any] = {"precision": precision, "channels_last": channels_last}
        try:
            guard.network.set_execution(precision, channels_last)
            row |= variant_row(guard, pixels, reference, batch, min_s)
        except (RuntimeError, NotImplementedError) as exc:  # a kernel this device lacks
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        print("execution:", row, flush=True)
        rows.append(row)
    eligible = [r for r in rows if r.get("decisions_identical") == len(pixels)]
    kept = max(eligible, key=lambda r: r["model_only"]["images_per_s"], default=rows[0])
    guard.network.set_execution(kept["precision"], kept["channels_last"])
    return {
        "images": len(pixels),
        "batch_size": batch,
        "variants": rows,
        "kept": {"precision": kept["precision"], "channels_last": kept["channels_last"]},
    }


def service_env(
    bundle: Path, kept: dict[str, Any], concurrency: int, extra: dict[str, str] | None = None
) -> dict[str, str]:
    return (extra or {}) | {
        "ADVGUARD_BUNDLE": str(bundle),
        "ADVGUARD_SEARCH_BACKEND": "torch",
        "ADVGUARD_MODEL_PRECISION": kept["precision"],
        "ADVGUARD_CHANNELS_LAST": str(kept["channels_last"]).lower(),
        "ADVGUARD_LATENCY_BUDGET_MS": "0",
        "ADVGUARD_QUEUE_SIZE": str(max(concurrency, 1)),
    }


@dataclass(frozen=True)
class InProcess:
    """What the guard does with nothing else running, measured before any service starts: the
    execution settings kept, the model + search limit (c) by batch size, the detector's stages."""

    load_s: float
    execution: dict[str, Any]
    limit: dict[str, Any]
    stages: dict[str, Any]
    index_device: str


def in_process_stage(
    bundle: Path,
    jpegs: list[bytes],
    device: str,
    in_process_batches: tuple[int, ...],
    min_s: float,
    execution_batch: int,
    stage_batch: int,
    variants: tuple[tuple[Precision, bool], ...],
) -> InProcess:
    """Load the guard, choose its execution settings, time (c) and the detector's stages; the
    guard is released (and the GPU's cache emptied) before the services start."""
    started = time.perf_counter()
    guard = Guard.load(bundle, device=device, search_backend="torch")
    load_s = time.perf_counter() - started
    execution = choose_execution(guard, jpegs, execution_batch, min_s, variants)
    limit = in_process(guard, jpegs, list(in_process_batches), min_s)
    pixels = [guard.pixels(decode_image(data)) for data in jpegs]
    stages = stage_times(guard, pixels, stage_batch, min_s)
    index_device = guard.index_device
    del guard, pixels
    if device == "cuda":
        torch.cuda.empty_cache()
    return InProcess(load_s, execution, limit, stages, index_device)


@dataclass(frozen=True)
class Served:
    """The services under load: (a) at each max batch size, the one compared, (b), (a-), (a+)."""

    sweep: list[dict[str, Any]]
    best: dict[str, Any]
    compared: dict[str, Any]
    unguarded: dict[str, Any]
    unscreened: dict[str, Any]
    changed: list[dict[str, Any]]

    @property
    def errors(self) -> list[str]:
        rows = [*self.sweep, self.unguarded, self.unscreened, *self.changed]
        return [row["error"] for row in rows if "error" in row]


def served_stage(
    env: dict[str, str],
    load: argparse.Namespace,
    jpegs: list[bytes],
    max_batch_sizes: tuple[int, ...],
    warmup_s: float,
    also: tuple[tuple[str, str], ...],
) -> Served:
    """(a) at each max batch size, then at the compared size (b) guard off, (a-) guard on
    without the screening and (a+) each ``also`` setting."""
    sweep = [
        {
            "max_batch_size": size,
            **served(
                {**env, "ADVGUARD_MAX_BATCH_SIZE": str(size)},
                load,
                jpegs,
                f"(a) guard on, max batch {size}",
                warmup_s,
            ),
        }
        for size in max_batch_sizes
    ]
    ran = [row for row in sweep if "error" not in row]
    best = max(ran, key=saturation) if ran else sweep[0]
    compared = compared_size(sweep)
    off_env = {**env, "ADVGUARD_MAX_BATCH_SIZE": str(compared["max_batch_size"])}
    off_env["ADVGUARD_GUARD_ENABLED"] = "false"
    unguarded = served(off_env, load, jpegs, "(b) guard off", warmup_s)
    unscreened_env = {**off_env, "ADVGUARD_GUARD_ENABLED": "true"}
    unscreened_env["ADVGUARD_STATEFUL_ENABLED"] = "false"
    unscreened = served(unscreened_env, load, jpegs, "(a-) guard on, screening off", warmup_s)
    on_env = {**env, "ADVGUARD_MAX_BATCH_SIZE": str(compared["max_batch_size"])}
    changed = [
        {
            "setting": f"{name}={value}",
            **served({**on_env, name: value}, load, jpegs, f"(a+) {name}={value}", warmup_s),
        }
        for name, value in also
    ]
    return Served(sweep, best, compared, unguarded, unscreened, changed)


def run(
    bundle: Path,
    jpegs: list[bytes],
    device: str,
    max_batch_sizes: tuple[int, ...],
    in_process_batches: tuple[int, ...],
    concurrency: int,
    seconds: float,
    min_s: float,
    execution_batch: int,
    stage_batch: int,
    warmup_s: float,
    variants: tuple[tuple[Precision, bool], ...] = VARIANTS,
    extra_env: dict[str, str] | None = None,
    also: tuple[tuple[str, str], ...] = (),
) -> dict[str, Any]:
    """in process -> services -> ratios. ``extra_env``: settings of every service; ``also``:
    one more guarded service (a+) per setting, changed from (a)'s, at (a)'s batch size (e.g.
    the interpreter's switch interval)."""
    measured = in_process_stage(
        bundle, jpegs, device, in_process_batches, min_s, execution_batch, stage_batch, variants
    )
    env = service_env(bundle, measured.execution["kept"], concurrency, extra_env)
    load = argparse.Namespace(device=device, concurrency=[concurrency], seconds=seconds)
    services = served_stage(env, load, jpegs, max_batch_sizes, warmup_s, also)
    a = saturation(services.compared) if "error" not in services.compared else None
    b = saturation(services.unguarded) if "error" not in services.unguarded else None
    a_minus = saturation(services.unscreened) if "error" not in services.unscreened else None
    c = measured.limit["limit"]["images_per_s"]
    return {
        "bundle": bundle.name,
        "device": device,
        "index_device": measured.index_device,
        "load_seconds": round(measured.load_s, 1),
        "images": len(jpegs),
        "image_size": _image_size(jpegs[0]),
        "concurrency": concurrency,
        "seconds_per_level": seconds,
        "execution": measured.execution,
        "in_process": measured.limit,
        "detector_stages": measured.stages,
        "guard_on_sweep": services.sweep,
        "best_max_batch_size": services.best["max_batch_size"],
        "compared_max_batch_size": services.compared["max_batch_size"],
        "guard_off": services.unguarded,
        "guard_without_screening": services.unscreened,
        "guard_on_also": services.changed,
        "extra_env": extra_env or {},
        "client_ids": CLIENT_IDS,
        "a_images_per_s": a,
        "a_minus_images_per_s": a_minus,
        "b_images_per_s": b,
        "c_images_per_s": c,
        "a_over_b": None if a is None or b is None else ratio(a, b),
        "a_minus_over_b": None if a_minus is None or b is None else ratio(a_minus, b),
        "a_over_c": None if a is None else ratio(a, c),
        "errors": services.errors,
    }


def compared_size(sweep: list[dict[str, Any]]) -> dict[str, Any]:
    """The sweep's run at its largest batch size, or, if that one failed, the largest that
    ran (the first if none did)."""
    ran = [row for row in sweep if "error" not in row] or sweep[:1]
    return max(ran, key=lambda row: int(row["max_batch_size"]))


def served(
    env: dict[str, str], load: argparse.Namespace, jpegs: list[bytes], label: str, warmup_s: float
) -> dict[str, Any]:
    """One ``run_service``; a service that fails to start or breaks under load is recorded as
    an error, so the runs that did work (and the in-process figures) are kept."""
    started = time.perf_counter()
    try:
        result = run_service(env, load, jpegs, label, warmup_s, clients=CLIENT_IDS)
    except Exception as exc:  # a subprocess and sockets: anything may go wrong there
        print(f"{label}: {type(exc).__name__}: {exc}", flush=True)
        result = {"env": env, "error": f"{type(exc).__name__}: {exc}"[:500]}
    return {**result, "wall_seconds": round(time.perf_counter() - started, 1)}


def _screening_line(results: dict[str, Any]) -> str:
    """Where (a)'s screening spent its time (``advguard_screening_seconds_total``: pixels,
    hash, match, record)."""
    best = next(
        (
            row
            for row in results["guard_on_sweep"]
            if row.get("max_batch_size") == results["compared_max_batch_size"]
            and "error" not in row
        ),
        None,
    )
    parts = None if best is None else best["saturation"].get("screening_ms_per_query")
    if not parts:
        return ""
    spent = ", ".join(f"{part} {ms}" for part, ms in parts.items())
    busy = best["saturation"].get("screening_busy")  # type: ignore[index]
    return f"(a)'s screening, ms per screened query: {spent}; busy {busy} of one thread.\n\n"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _image_size(data: bytes) -> str:
    width, height = decode_image(data).size
    return f"{width}x{height}"


def _variant_rows(results: dict[str, Any]) -> str:
    """One row per model execution tried (precision, memory format), or its error."""
    return "\n".join(
        f"| {r['precision']}{' + channels_last' if r['channels_last'] else ''} | "
        + (
            f"error: {r['error'][:60]} | | | |"
            if "error" in r
            else f"{r['decisions_identical']} / {results['execution']['images']} | "
            f"{r['max_abs_score_difference']:.2e} | {r['model_only']['images_per_s']} | "
            f"{r['model_and_search']['images_per_s']} |"
        )
        for r in results["execution"]["variants"]
    )


def _sweep_rows(results: dict[str, Any]) -> str:
    """One row per guard-on max batch size of the sweep, or its error."""
    return "\n".join(
        f"| {row['max_batch_size']} | error: {row['error'][:80]} | | | |"
        if "error" in row
        else f"| {row['max_batch_size']} | {saturation(row)} | "
        f"{row['saturation']['latency_ms_p50']} / {row['saturation']['latency_ms_p99']} | "
        f"{row['saturation']['mean_batch_size']} | {row['saturation']['statuses']} |"
        for row in results["guard_on_sweep"]
    )


def _setup_line(results: dict[str, Any]) -> str:
    """What ran: bundle, devices, images, load and any extra environment."""
    return (
        f"Bundle `{results['bundle']}` (model on {results['device']}, index on "
        f"{results['index_device']}, torch exact search), {results['images']} synthetic "
        f"{results['image_size']} px JPEGs, {results['concurrency']} closed-loop connections "
        f"for {results['seconds_per_level']} s per run, {results['client_ids']:,} client ids "
        "in turn"
        + "".join(f", {name}={value}" for name, value in results.get("extra_env", {}).items())
        + ".\n\n"
    )


def _services_table(results: dict[str, Any]) -> str:
    """The services side by side, (a) to (c), and their ratios."""
    limit = results["in_process"]["limit"]
    model_only = results["in_process"]["limit_model_only"]
    return (
        f"| | images/s |\n| --- | --- |\n"
        f"| (a) service, guard on with query screening (max batch "
        f"{results['compared_max_batch_size']}; best in the sweep: "
        f"{results['best_max_batch_size']}) | {results['a_images_per_s']} |\n"
        f"| (a-) service, guard on, no query screening | {results['a_minus_images_per_s']} |\n"
        f"| (b) service, guard off | {results['b_images_per_s']} |\n"
        f"| (c) in process, model + search (batch {limit['batch_size']}) "
        f"| {results['c_images_per_s']} |\n"
        f"| in process, model only (batch {model_only['batch_size']}) "
        f"| {model_only['images_per_s']} |\n"
        + "".join(
            f"| (a+) guard on, {row['setting']} | "
            + (f"error: {row['error'][:60]}" if "error" in row else f"{saturation(row)}")
            + " |\n"
            for row in results.get("guard_on_also", [])
        )
        + "\n"
        f"a / b = {_percent(results['a_over_b'])}, a- / b = "
        f"{_percent(results['a_minus_over_b'])}, a / c = {_percent(results['a_over_c'])}.\n\n"
    )


def table(results: dict[str, Any]) -> str:
    """The run's summary: set-up, services, the screening, the sweep, guard off, the model's
    executions and the detector's stages."""
    kept = results["execution"]["kept"]
    off = results["guard_off"].get("saturation", {})
    stages = results["detector_stages"]
    return (
        _setup_line(results) + _services_table(results) + f"{_screening_line(results)}"
        "Guard-on sweep of ADVGUARD_MAX_BATCH_SIZE:\n\n"
        "| max batch | images/s | p50 / p99 ms | mean batch | statuses |\n"
        f"| --- | --- | --- | --- | --- |\n{_sweep_rows(results)}\n\n"
        f"Guard off at max batch {results['compared_max_batch_size']}: "
        f"{results['b_images_per_s']} "
        f"images/s, p50 / p99 {off.get('latency_ms_p50')} / {off.get('latency_ms_p99')} ms"
        f"{'; ' + results['guard_off']['error'] if 'error' in results['guard_off'] else ''}.\n\n"
        f"Model execution (batch {results['execution']['batch_size']}, decisions against "
        f"fp32's); kept: **{kept['precision']}"
        f"{' + channels_last' if kept['channels_last'] else ''}**.\n\n"
        "| execution | same decisions | max score difference | model only images/s "
        "| model + search images/s |\n| --- | --- | --- | --- | --- |\n"
        f"{_variant_rows(results)}\n\n"
        f"Detector by stage at batch {stages['batch_size']}, ms per image: model "
        f"{stages['model_ms']}, "
        + ", ".join(f"{kind} {ms}" for kind, ms in stages["statistic_ms"].items())
        + f", combination {stages['combination_ms']}."
    )
