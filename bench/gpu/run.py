"""Every GPU check of issue 15 in one run, sized to end inside 8 minutes on one H200.

Started by ``bench/gpu/run.sh`` (which installs the carried wheels first); ``--dry-run`` runs the
same code on the CPU with tiny sizes (about a minute; CI does). Steps, in order, each isolated
(an error is recorded and the next step runs):

- ``environment``: versions, the GPU, faiss's GPU count, what the service imports;
- ``parity`` (``bench.gpu.parity``): the demo bundle on cuda against cpu, 2,000 CIFAR-10 test
  images: identical decisions, statistics within 1e-3 of their spread;
- ``search`` (``bench.gpu.search_check``): exact GPU search (torch backend; faiss-gpu where
  installed) returns the CPU flat index's neighbours on the demo bundle and at 1.28M x 256, and
  its ms/query at batch 1/64/256, k = 1000, beside faiss-cpu on the same machine;
- ``builder`` (``bench.builder_speed.measure``): extraction rate of a ResNet-50 (random weights)
  over 20,000 synthetic 500x375 JPEGs with 14 DataLoader workers, against the bare forward rate
  of the same model in the same run; its bundle feeds the next step;
- ``service`` (``bench.gpu.service_check``): that bundle with a synthetic 1.28M x 256 index,
  served under load with the guard on (micro-batch sweep), off, and the in-process limit, after
  trying bf16/fp16 autocast and channels_last.

Sizing (estimates for one H200 with 16 cores; the run's own step times land in results.json):
wheel install ~10 s (22 MB, nothing compiled). parity ~15 s: CUDA start-up ~5 s, ResNet-20 on
2,000 32 px images is ~0.1 GFLOP per batch, three searches of 2,000 x 45,000 x 64. search ~45 s:
clusters generated in numpy ~6 s; the GPU search reads 1.3 GB per batch (~0.3 ms at 4 TB/s)
plus top-k, 20 timed batches per size are under 2 s; faiss-cpu needs ~0.1 / 1.5 / 5 s per batch
of 1 / 64 / 256, so it gets 3 repeats (~20 s); 64 queries' neighbours ~1 s. builder ~45 s:
files written ~3 s (256 distinct encodings), bare forward 2 x 5 s, extraction at ~2,500
images/s (14 workers decoding ~5 ms each) ~8 s, PCA + class densities + calibration ~10 s.
service ~190 s: bundle (1.3 GB index written and hashed) ~5 s, six execution variants ~20 s,
in-process sweep ~10 s, five services (start ~15 s: bundle hashed twice, CUDA, ResNet-50;
3 s warm-up; 8 s of load) ~140 s. Sum ~300 s (the first run on an H200 took 222 s); the
budget (``--budget-s``, 420 s by default) skips any step whose estimate no longer fits in what
is left, so the run writes its results and
ends well inside the device's 10-minute command limit even when the machine is slower than
planned, instead of being killed with nothing written.

Results (``--out``, default bench/results/gpu; ``$OUT`` on the device machine): results.json
(every number, rewritten after each step) and summary.md (the tables); run.sh adds run.log.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "gpu"
DEMO_BUNDLE = REPO / "bundles" / "cifar10-resnet20"
CIFAR_CARRIED = REPO / ".gpudata" / "cifar10-test-2000.tar.gz"
CIFAR_SHARED = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
STEPS = ("environment", "parity", "search", "builder", "service", "host")
SERVICE_IMPORTS: tuple[str, ...] = ("fastapi", "starlette", "uvicorn", "pydantic", "multipart")
SERVICE_IMPORTS += ("pydantic_settings", "redis", "prometheus_client", "httpx", "faiss", "PIL")
DISTRIBUTIONS: tuple[str, ...] = ("torch", "torchvision", "numpy", "pillow", "faiss-cpu")
DISTRIBUTIONS += ("fastapi", "uvicorn", "pydantic", "starlette", "prometheus-client", "httpx")


@dataclass(frozen=True)
class Sizes:
    """Everything the run's duration depends on; FULL for the GPU, DRY for ``--dry-run``."""

    parity_images: int
    search_rows: int
    search_dim: int
    search_k: int
    search_batches: tuple[int, ...]
    search_repeats: int
    cpu_repeats: int
    compare_queries: int
    arch: str
    classes: int
    builder_images: int
    builder_image_size: tuple[int, int]
    distinct_images: int
    builder_workers: int
    builder_batch: int
    builder_k: int
    holdout_fraction: float
    forward_seconds: float
    decode_images: int
    service_rows: int
    service_image_size: int
    service_images: int
    max_batch_sizes: tuple[int, ...]
    in_process_batches: tuple[int, ...]
    concurrency: int
    service_seconds: float
    warmup_seconds: float
    min_seconds: float
    execution_batch: int
    stage_batch: int
    host_uploads: int
    host_rounds: int
    host_batches: int
    host_processes: tuple[int, ...]
    estimates_s: tuple[tuple[str, float], ...]  # per step, for the budget
    budget_s: float


FULL = Sizes(
    parity_images=2000,
    search_rows=1_281_167,
    search_dim=256,
    search_k=1000,
    search_batches=(1, 64, 256),
    search_repeats=20,
    cpu_repeats=3,
    compare_queries=64,
    arch="resnet50",
    classes=10,
    builder_images=20_000,
    builder_image_size=(500, 375),
    distinct_images=256,
    builder_workers=14,
    builder_batch=256,
    builder_k=1000,
    holdout_fraction=0.1,
    forward_seconds=5.0,
    decode_images=500,
    service_rows=1_281_167,
    service_image_size=224,
    service_images=512,
    max_batch_sizes=(32, 64, 128),
    in_process_batches=(32, 64, 128, 256),
    concurrency=256,
    service_seconds=8.0,
    warmup_seconds=3.0,
    min_seconds=1.0,
    execution_batch=128,
    stage_batch=64,
    host_uploads=48,
    host_rounds=3,
    host_batches=10,
    host_processes=(2, 6),
    estimates_s=(
        ("environment", 5),
        ("parity", 30),
        ("search", 60),
        ("builder", 60),
        ("service", 200),
        ("host", 40),
    ),
    budget_s=420.0,
)
DRY = Sizes(
    parity_images=48,
    search_rows=4000,
    search_dim=64,
    search_k=50,
    search_batches=(1, 8, 16),
    search_repeats=2,
    cpu_repeats=1,
    compare_queries=16,
    arch="resnet20",
    classes=3,
    builder_images=90,
    builder_image_size=(40, 30),
    distinct_images=12,
    builder_workers=2,
    builder_batch=32,
    builder_k=20,
    holdout_fraction=0.25,
    forward_seconds=0.2,
    decode_images=20,
    service_rows=4000,
    service_image_size=32,
    service_images=8,
    max_batch_sizes=(4, 16),
    in_process_batches=(4, 16),
    concurrency=8,
    service_seconds=1.0,
    warmup_seconds=0.5,
    min_seconds=0.05,
    execution_batch=4,
    stage_batch=8,
    host_uploads=4,
    host_rounds=1,
    host_batches=1,
    host_processes=(2,),
    estimates_s=(
        ("environment", 1),
        ("parity", 5),
        ("search", 5),
        ("builder", 10),
        ("service", 30),
        ("host", 5),
    ),
    budget_s=600.0,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Options only (no torch import): run.sh validates them before installing anything."""
    parser = argparse.ArgumentParser(
        prog="bench/gpu/run.sh", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (CI)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result directory")
    parser.add_argument(
        "--only", type=_steps, default=STEPS, help=f"comma-separated steps of {','.join(STEPS)}"
    )
    parser.add_argument("--budget-s", type=float, help="seconds for every step together")
    parser.add_argument("--cifar", type=Path, help="CIFAR-10 JPEG tar (test/<class>/<file>)")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch directory")
    parser.add_argument(
        "--max-batch-sizes", type=_sizes, help="service: ADVGUARD_MAX_BATCH_SIZE sweep, e.g. 64,128"
    )
    parser.add_argument(
        "--service-seconds", type=float, help="service: seconds of load per service"
    )
    parser.add_argument(
        "--execution",
        type=_execution,
        help="service: one model execution (fp32, bf16, fp16, each +cl for channels_last) "
        "instead of choosing among all six",
    )
    parser.add_argument(
        "--service-env",
        type=_setting,
        action="append",
        default=[],
        metavar="ADVGUARD_NAME=VALUE",
        help="service: a setting of every service (repeatable)",
    )
    parser.add_argument(
        "--also",
        type=_setting,
        action="append",
        default=[],
        metavar="ADVGUARD_NAME=VALUE",
        help="service: one more guarded service (a+) with this setting changed (repeatable)",
    )
    parser.add_argument("--parse-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    return args


def _steps(text: str) -> tuple[str, ...]:
    chosen = tuple(step.strip() for step in text.split(",") if step.strip())
    unknown = sorted(set(chosen) - set(STEPS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown steps {unknown}; choose from {STEPS}")
    return tuple(step for step in STEPS if step in chosen)


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 64,128, got {text!r}")
    return sizes


EXECUTIONS = ("fp32", "bf16", "fp16")


def _execution(text: str) -> tuple[str, bool]:
    precision, _, layout = text.partition("+")
    if precision not in EXECUTIONS or layout not in ("", "cl"):
        raise argparse.ArgumentTypeError(f"expected one of {EXECUTIONS}, each optionally +cl")
    return precision, layout == "cl"


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("ADVGUARD_") or not name[9:].replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"expected ADVGUARD_NAME=VALUE, got {text!r}")
    return name, value


def cifar_tar(given: Path | None) -> Path:
    """The carried 2,000-image subset, else the full archive beside the checkout."""
    for candidate in (given, CIFAR_CARRIED, CIFAR_SHARED):
        if candidate is not None and candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no CIFAR-10 archive: run python -m bench.gpu.prepare ({CIFAR_CARRIED})"
    )


class Run:
    """The results of one run, written to ``out`` after every step."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, device: str) -> None:
        self.args, self.sizes, self.device = args, sizes, device
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.budget_s = args.budget_s or sizes.budget_s
        self.estimates = dict(sizes.estimates_s)
        self.state: dict[str, Any] = {}  # values passed between steps (vectors, bundles)
        self.results: dict[str, Any] = {
            "command": " ".join(["bench/gpu/run.sh", *sys.argv[1:]]),
            "dry_run": args.dry_run,
            "device": device,
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "budget_s": self.budget_s,
            "install_seconds": _float_env("ADVGUARD_GPU_INSTALL_S"),
            "sizes": asdict(sizes),
            "steps": {},
        }
        self.tables: dict[str, str] = {}

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def step(self, name: str, body: Callable[[], tuple[dict[str, Any], str]]) -> None:
        """Run one step unless the budget cannot hold it; record ok / partial (it finished, but
        parts of it failed: its results list them under "errors") / error / skipped."""
        record: dict[str, Any]
        if self.left_s() < self.estimates[name]:
            record = {"status": "skipped", "reason": f"{self.left_s():.0f} s left of the budget"}
        else:
            print(f"== {name} ({self.left_s():.0f} s left)", flush=True)
            started = time.monotonic()
            try:
                results, table = body()
                record = {"status": "partial" if results.get("errors") else "ok"}
                record["results"] = results
                self.tables[name] = table
            except Exception as exc:  # one step's failure must not cost the others
                record = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
                record["traceback"] = traceback.format_exc()[-4000:]
                print(record["traceback"], file=sys.stderr, flush=True)
            record["seconds"] = round(time.monotonic() - started, 1)
        self.results["steps"][name] = record
        self.write()

    def write(self) -> None:
        self.results["seconds"] = round(time.monotonic() - self.started, 1)
        text = json.dumps(self.results, indent=2, default=str) + "\n"
        (self.out / "results.json").write_text(text)
        (self.out / "summary.md").write_text(summary(self.results, self.tables))


def _float_env(name: str) -> float | None:
    value = os.environ.get(name)
    return float(value) if value else None


def summary(results: dict[str, Any], tables: dict[str, str]) -> str:
    """The tables, one section per step, with its status and time."""
    environment = results["steps"].get("environment", {}).get("results", {})
    kind = "dry run (CPU, tiny sizes)" if results["dry_run"] else "full run"
    lines = [
        "# GPU checks (issue 15)",
        "",
        f"{kind} on {environment.get('gpu') or results['device']}; torch "
        f"{environment.get('versions', {}).get('torch', '?')}; started {results['started_at']}; "
        f"{results.get('seconds', 0):.0f} s of a {results['budget_s']:.0f} s budget"
        + (
            f" (+ {results['install_seconds']:.0f} s installing wheels)"
            if results.get("install_seconds")
            else ""
        )
        + f". Command: `{results['command']}`. What each figure means: docs/deploy.md, "
        "GPU verification.",
    ]
    for name in STEPS:
        record = results["steps"].get(name)
        if record is None:
            continue
        status = record["status"]
        lines += ["", f"## {name}: {status} ({record.get('seconds', 0)} s)", ""]
        if status in ("ok", "partial") and name in tables:
            lines.append(tables[name])
        elif status == "error":
            lines.append(f"    {record['error']}")
        elif status == "skipped":
            lines.append(f"Skipped: {record['reason']}.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- steps


def environment(run: Run) -> tuple[dict[str, Any], str]:
    import importlib
    import importlib.metadata

    import torch

    from app.core import search
    from bench.gpu.parity import cudnn_conv_fp32_precision

    versions: dict[str, str | None] = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    imports = {}
    for module in SERVICE_IMPORTS:
        try:
            importlib.import_module(module)
            imports[module] = "ok"
        except Exception as exc:  # a broken carried wheel shows here, not mid-service
            imports[module] = f"{type(exc).__name__}: {exc}"
    cuda = torch.cuda.is_available()
    results = {
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if cuda
        else None,
        "cuda": torch.version.cuda,
        "cudnn_conv_fp32_precision": cudnn_conv_fp32_precision(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "faiss_gpus": search.gpu_count(),
        "versions": versions,
        "imports": imports,
        "nvidia_smi": _nvidia_smi(),
    }
    missing = [m for m, state in imports.items() if state != "ok"]
    table = (
        f"Python {results['python']}, {results['cores']} cores, GPU {results['gpu']} "
        f"({results['gpu_memory_gib']} GiB), CUDA {results['cuda']}, faiss GPUs "
        f"{results['faiss_gpus']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f". Service imports: {'all ok' if not missing else 'FAILED ' + ', '.join(missing)}."
    )
    return results, table


def _nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm"
    done = subprocess.run(
        ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True
    )
    return done.stdout.strip() or done.stderr.strip()


def parity_step(run: Run) -> tuple[dict[str, Any], str]:
    from bench.gpu import parity
    from bench.load_service import test_jpegs

    jpegs = test_jpegs(run.sizes.parity_images, cifar_tar(run.args.cifar))
    run.state["cifar_jpegs"] = jpegs
    results = parity.run(DEMO_BUNDLE, jpegs, run.device)
    return results, parity.table(results)


def search_step(run: Run) -> tuple[dict[str, Any], str]:
    from bench.gpu import search_check
    from bench.load_service import test_jpegs

    s = run.sizes
    jpegs = run.state.get("cifar_jpegs") or test_jpegs(s.parity_images, cifar_tar(run.args.cifar))
    demo = search_check.demo_neighbours(DEMO_BUNDLE, jpegs, run.device)
    scale, vectors, labels = search_check.at_scale(
        s.search_rows,
        s.search_dim,
        s.search_k,
        s.search_batches,
        s.search_repeats,
        s.cpu_repeats,
        s.compare_queries,
        run.device,
    )
    run.state["vectors"], run.state["labels"] = vectors, labels
    results = {"demo_bundle": demo, "scale": scale, "passed": demo["passed"] and scale["passed"]}
    return results, search_check.table(demo, scale)


def builder_step(run: Run) -> tuple[dict[str, Any], str]:
    from bench import builder_speed
    from bench.gpu import synthetic

    s, work = run.sizes, run.state["work"]
    started = time.perf_counter()
    folder = synthetic.jpeg_folder(
        work / "images", s.builder_images, s.classes, s.builder_image_size, s.distinct_images
    )
    weights = synthetic.random_weights(s.arch, s.classes, work / "weights.pth")
    generate_s = time.perf_counter() - started
    bundle = work / "builder-bundle"
    results = builder_speed.measure(
        folder,
        None,
        s.arch,
        weights,
        batch_size=s.builder_batch,
        workers=s.builder_workers,
        forward_seconds=s.forward_seconds,
        decode_images=s.decode_images,
        device=run.device,
        keep_bundle=bundle,
        k=s.builder_k,
        holdout_fraction=s.holdout_fraction,
    )
    shutil.rmtree(folder, ignore_errors=True)
    run.state["builder_bundle"] = bundle
    results |= {
        "source": "synthetic ImageFolder",
        "image_size": list(s.builder_image_size),
        "distinct_encodings": s.distinct_images,
        "generate_seconds": round(generate_s, 1),
    }
    return results, builder_speed.table(results)


def service_step(run: Run) -> tuple[dict[str, Any], str]:
    from app.core.bundle import read_manifest
    from bench.gpu import service_check, synthetic
    from bench.search_scale import clustered

    s, work = run.sizes, run.state["work"]
    small = Path(run.state.get("builder_bundle") or fallback_bundle(run))
    started = time.perf_counter()
    dims = next(
        layer.output_dim
        for layer in read_manifest(small).detector.layers
        if layer.index_file is not None
    )
    vectors, labels = run.state.get("vectors"), run.state.get("labels")
    if vectors is None or labels is None or vectors.shape != (s.service_rows, dims):
        vectors, labels = clustered(s.service_rows, dims, seed=0)
    bundle = synthetic.enlarge_bundle(small, work / "service-bundle", vectors, labels)
    run.state.pop("vectors", None)
    enlarge_s = time.perf_counter() - started
    size = (s.service_image_size, s.service_image_size)
    jpegs = synthetic.jpegs(s.service_images, size, seed=7, classes=s.classes)
    results = service_check.run(
        bundle,
        jpegs,
        run.device,
        max_batch_sizes=s.max_batch_sizes,
        in_process_batches=s.in_process_batches,
        concurrency=s.concurrency,
        seconds=s.service_seconds,
        min_s=s.min_seconds,
        execution_batch=s.execution_batch,
        stage_batch=s.stage_batch,
        warmup_s=s.warmup_seconds,
        variants=(run.args.execution,) if run.args.execution else service_check.VARIANTS,
        extra_env=dict(run.args.service_env),
        also=tuple(run.args.also),
    )
    results |= {"index_rows": int(vectors.shape[0]), "enlarge_seconds": round(enlarge_s, 1)}
    return results, service_check.table(results)


def host_step(run: Run) -> tuple[dict[str, Any], str]:
    import torch

    from bench.gpu import host_check

    s = run.sizes
    device = torch.device(run.device)  # the dry run's CPU rehearses the device path too
    return host_check.run(s.host_uploads, s.host_rounds, s.host_batches, s.host_processes, device)


def fallback_bundle(run: Run) -> Path:
    """A small bundle of the same model when the builder step did not leave one."""
    from bench.gpu import synthetic
    from index_builder.build import build_bundle
    from index_builder.config import BuildConfig

    s, work = run.sizes, Path(run.state["work"])
    folder = synthetic.jpeg_folder(
        work / "fallback-images", s.classes * 40, s.classes, s.builder_image_size, s.classes * 4
    )
    weights = synthetic.random_weights(s.arch, s.classes, work / "weights.pth")
    out = work / "fallback-bundle"
    config = BuildConfig(
        source=folder,
        arch=s.arch,
        weights=weights,
        out=out,
        device=run.device,
        k=s.builder_k,
        holdout_fraction=0.25,
        num_workers=min(s.builder_workers, 4),
        batch_size=s.builder_batch,
    )
    build_bundle(config, progress=False)
    return out


def _bound(
    body: Callable[[Run], tuple[dict[str, Any], str]], run: Run
) -> Callable[[], tuple[dict[str, Any], str]]:
    return lambda: body(run)


STEP_BODIES: dict[str, Callable[[Run], tuple[dict[str, Any], str]]] = {
    "environment": environment,
    "parity": parity_step,
    "search": search_step,
    "builder": builder_step,
    "service": service_step,
    "host": host_step,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.parse_only:
        return 0
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("run.sh: no CUDA device here; use --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    sizes = DRY if args.dry_run else FULL
    if args.max_batch_sizes:
        sizes = dataclasses.replace(sizes, max_batch_sizes=args.max_batch_sizes)
    if args.service_seconds:
        sizes = dataclasses.replace(sizes, service_seconds=args.service_seconds)
    run = Run(args, sizes, device)
    work = args.work or Path(tempfile.mkdtemp(prefix="advguard-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    run.state["work"] = work
    try:
        for name in args.only:
            run.step(name, _bound(STEP_BODIES[name], run))
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    run.write()
    statuses = {name: record["status"] for name, record in run.results["steps"].items()}
    print(f"results in {run.out}: {statuses}", flush=True)
    return 1 if {"error", "partial"} & set(statuses.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
