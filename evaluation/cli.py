"""``advguard evaluate``: the paper's evaluation on a bundle's model (see ``evaluation.run``)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from app.cli import at_least

DEFAULT_SOURCE = Path("../shared/data/cifar10-jpeg.tar.gz")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--bundle", type=Path, help="bundle whose model is evaluated")
    model.add_argument("--arch", help="or: an architecture (with --weights); a bundle is built")
    parser.add_argument("--weights", type=Path, help="weights file for --arch")
    parser.add_argument("--name", help="results name (default: the bundle's name)")
    parser.add_argument(
        "--source",
        type=Path,
        default=DEFAULT_SOURCE,
        help="CIFAR-10 ImageFolder directory or tar with train/ and test/ splits",
    )
    parser.add_argument(
        "--out", type=Path, help="results directory (default: evaluation/results/<name>)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(".cache/evaluation"),
        help="bundles, predictions and attack sets kept between runs (default: %(default)s)",
    )
    parser.add_argument(
        "--per-class", type=at_least(1), default=100, help="authentic images per class"
    )
    parser.add_argument(
        "--no-studies",
        action="store_true",
        help="only the given bundle (score functions at query time): no builds",
    )
    parser.add_argument(
        "--v2-only",
        action="store_true",
        help="only the paper's default detector and the v2 presets (v2, v2-dflip, v2-flip, "
        "v2-median, v2-jpeg): no Table 2 grid, k sweep or ablations",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small subset, short attacks, no builds (CI)"
    )
    parser.add_argument(
        "--no-adaptive", action="store_true", help="skip the white-box adaptive attacks"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="the holdout's, images' and attacks' draws (default: 0)"
    )
    parser.add_argument("--threads", type=at_least(1), help="torch CPU threads")
    parser.add_argument(
        "--transfer-from",
        action="append",
        default=[],
        help="judge this evaluated model's exported adversarials too (e.g. cifar10-resnet56)",
    )
    parser.add_argument(
        "--select",
        action="store_true",
        help="only apply the v2 selection rule on selection images (evaluation/selection.py)",
    )


def run_evaluate(args: argparse.Namespace) -> int:
    import torch

    from evaluation.options import EvaluateOptions, quick_options
    from evaluation.run import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.arch and not args.weights:
        print("advguard evaluate: error: --arch needs --weights", file=sys.stderr)
        return 2
    name = args.name or (args.bundle.name if args.bundle else f"cifar10-{args.arch}")
    out = args.out or Path("evaluation/results") / (name + ("-quick" if args.quick else ""))
    options = EvaluateOptions(
        source=args.source,
        out=out,
        bundle=args.bundle,
        arch=args.arch,
        weights=args.weights,
        name=name,
        cache_dir=args.cache_dir,
        per_class=args.per_class,
        studies=not args.no_studies,
        v2_only=args.v2_only,
        adaptive=not args.no_adaptive,
        seed=args.seed,
        transfer_from=tuple(args.transfer_from),
    )
    if args.quick:
        options = quick_options(options)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    if args.select:
        from evaluation.selection import select

        select(replace(options, out=args.out or Path("evaluation/results/selection-5")), log)
        return 0
    evaluate(options, log)
    return 0


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bundle",
        type=Path,
        default=Path("bundles/cifar10-resnet20"),
        help="bundle whose scores the policies read (default: %(default)s)",
    )
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="CIFAR-10 test split")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(".cache/evaluation"),
        help="where `advguard evaluate` keeps its attack sets (default: %(default)s)",
    )
    parser.add_argument(
        "--sets", type=Path, help="exported attack sets (default: from `advguard evaluate`)"
    )
    parser.add_argument("--out", type=Path, help="default: evaluation/results/simulation-<name>")
    parser.add_argument(
        "--honest-clients", type=at_least(1), default=2000, help="simulated honest clients"
    )
    parser.add_argument("--attack-clients", type=at_least(1), default=300, help="per attacker kind")
    parser.add_argument("--requests", type=at_least(1), default=200, help="per client")
    parser.add_argument(
        "--mix-every", type=at_least(1), default=5, help="mixed: 1 adversarial in N"
    )
    parser.add_argument(
        "--max-false-flag-rate",
        type=float,
        default=0.005,
        help="share of honest clients a policy may flag to be chosen as the default",
    )
    parser.add_argument(
        "--warm-ups",
        type=at_least(1),
        nargs="*",
        default=[20, 50],
        help="also attackers with this many honest requests first (the default's rule reads "
        "each attack's slowest median over these histories)",
    )
    parser.add_argument(
        "--class-clients",
        type=at_least(0),
        default=200,
        help="also honest clients whose photos are all of one class, per class (0: none); "
        "together they must stay within --max-false-flag-rate for a policy to be the default",
    )
    parser.add_argument(
        "--raw-scores",
        action="store_true",
        help="policies average the guard's raw scores, as a service with "
        "ADVGUARD_FLAG_PER_CLASS=false does (default: per-class p-values where the bundle "
        "has the classes)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the traffic's draws (default: 0)")
    live = parser.add_argument_group("end to end over HTTP (a running service, loopback only)")
    live.add_argument("--url", help="e.g. http://127.0.0.1:8000; adds the live run")
    live.add_argument("--admin-token", default="", help="the service's admin token, if it has one")
    live.add_argument(
        "--admin-url",
        help="the service's admin listener (client statistics), e.g. http://127.0.0.1:9000; "
        "default: --url's host on port 9000",
    )
    live.add_argument(
        "--live-honest-clients", type=at_least(0), default=40, help="honest clients sent"
    )
    live.add_argument(
        "--live-attack-clients", type=at_least(0), default=2, help="per attacker kind"
    )
    live.add_argument("--live-requests", type=at_least(1), default=60, help="per client")
    live.add_argument("--live-seconds", type=float, default=600.0, help="time bound")
    live.add_argument("--concurrency", type=at_least(1), default=8, help="requests in flight")


def run_simulate(args: argparse.Namespace) -> int:
    from evaluation.simulate_cli import simulate

    return simulate(args)


def register(commands: Any) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="reproduce the paper's evaluation (Table 2, Figures 2-4) and beyond"
    )
    add_evaluate_arguments(evaluate)
    evaluate.set_defaults(run=run_evaluate)
    simulate = commands.add_parser(
        "simulate", help="measure per-client flag policies on simulated honest and attack traffic"
    )
    add_simulate_arguments(simulate)
    simulate.set_defaults(run=run_simulate)
