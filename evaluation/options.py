"""What one ``advguard evaluate`` run is asked to do: the attacks' parameters (the reported
ones and the quick run's), and the run's options, shared by the evaluation's pipeline
(``evaluation.run``), its configurations (``evaluation.configurations``) and the selection run
(``evaluation.selection``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

Log = Callable[[str], None]


@dataclass(frozen=True)
class AttackParams:
    """The attacks' budgets and steps (pixels in [0, 1]): the reported sets', or the quick
    run's (``QUICK_ATTACKS``). Each is part of its cached adversarials' key."""

    fgsm_eps: float = 8 / 255
    lbfgs_c_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    lbfgs_binary_steps: int = 2
    lbfgs_maxiter: int = 10
    pgd_eps: float = 8 / 255
    pgd_alpha: float = 2 / 255
    pgd_steps: int = 10
    pgd_l2_eps: float = 0.5
    pgd_l2_alpha: float = 0.1
    cw_c: float = 1.0
    cw_kappa: float = 0.0
    cw_steps: int = 30
    cw_lr: float = 0.02
    adaptive_eps: float = 8 / 255
    adaptive_alpha: float = 2 / 255
    adaptive_steps: int = 10
    adaptive_weight: float = 1.0
    # the smooth adaptive attack (PGD-L2 from the photo): the PGD-L2 set's budget, 50 steps of
    # 2.5 eps / steps (fixed before it was first run, 2026-12-01)
    adaptive_l2_eps: float = 0.5
    adaptive_l2_alpha: float = 0.025
    adaptive_l2_steps: int = 50


QUICK_ATTACKS = AttackParams(
    lbfgs_c_grid=(1e-2, 1e-1, 1.0),
    lbfgs_binary_steps=1,
    lbfgs_maxiter=8,
    pgd_steps=5,
    cw_steps=10,
    cw_lr=0.05,
    adaptive_alpha=2 / 255,
    adaptive_steps=5,
    adaptive_l2_alpha=0.25,
    adaptive_l2_steps=5,
)


@dataclass(frozen=True)
class EvaluateOptions:
    """One ``advguard evaluate`` run: the model (a bundle, or an architecture and weights), the
    images, the caches, which studies and attacks run, and where the reports go."""

    source: Path
    out: Path
    bundle: Path | None = None
    arch: str | None = None
    weights: Path | None = None
    name: str | None = None
    cache_dir: Path = Path(".cache/evaluation")
    per_class: int = 100
    split_per_class_limit: int | None = None
    # training images per class in the bundles the evaluation builds (None: all of them); a
    # smaller build for pipeline checks, never for reported figures
    build_per_class_limit: int | None = None
    quick: bool = False
    studies: bool = True
    # only the paper's default detector and v2 (no Table 2 grid, k sweep, Fisher or ablations)
    v2_only: bool = False
    adaptive: bool = True  # the white-box attacks (the slowest stage on a CPU)
    seed: int = 0
    attack: AttackParams = field(default_factory=AttackParams)
    batch_size: int = 250
    # models whose exported adversarials are judged by this one (transfer sets)
    transfer_from: tuple[str, ...] = ()


def quick_options(options: EvaluateOptions) -> EvaluateOptions:
    return replace(
        options,
        quick=True,
        per_class=5,
        split_per_class_limit=30,
        studies=False,
        attack=QUICK_ATTACKS,
    )


# --------------------------------------------------------------------------- test-photo studies

REPO = Path(__file__).resolve().parent.parent
CIFAR_SOURCE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def add_photo_study_arguments(parser: argparse.ArgumentParser, bundle_help: str, out: str) -> None:
    """The options of a study of bundles on the first test photos of each class
    (``evaluation.honest_edits``, ``evaluation.stored_adversarials``): the bundles, the CIFAR-10
    source, the photos per class, the decoded-split cache and the results directory
    (``evaluation/results/<out>`` by default). ``checked_photo_count`` refuses a bad count."""
    parser.add_argument("--bundle", type=Path, action="append", required=True, help=bundle_help)
    add_test_split_arguments(parser)
    parser.add_argument(
        "--per-class",
        type=int,
        default=100,
        help="first test photos of each class (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "evaluation" / "results" / out,
        help="results directory: results.json and table.md (default: %(default)s)",
    )


def add_test_split_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the CIFAR-10 test split comes from (``--source``) and where its decoded copy is
    cached (``--cache-dir``): ``load_split``'s arguments."""
    parser.add_argument(
        "--source",
        type=Path,
        default=CIFAR_SOURCE,
        help="CIFAR-10 ImageFolder directory or tar with a test/ split (default: %(default)s)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=REPO / ".cache" / "evaluation" / "data",
        help="decoded image splits cached here (default: %(default)s)",
    )


def write_study(out: Path, result: dict[str, object], table: str) -> None:
    """A study's results directory: ``results.json`` (every figure and the command) and
    ``table.md`` (the table a reader opens), the table also printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "table.md").write_text(table)
    print(table)


def checked_photo_count(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.per_class < 1:
        parser.error("--per-class must be at least 1")
