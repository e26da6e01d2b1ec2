"""Command-line options of the builder job (`advguard build`, `python -m index_builder`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.calibration import DEFAULT_RETENTION
from app.core.errors import AdvguardError
from app.core.manifest import COMBINATIONS
from app.core.processing import DEFAULT_PCA_DIMS, PROCESSING_KINDS
from app.core.scoring import SCORE_FUNCTIONS
from app.core.search import INDEX_TYPES
from app.core.statistics import DEFAULT_CLASS_K

if TYPE_CHECKING:
    from index_builder.build import BuildReport
    from index_builder.config import BuildConfig


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """``advguard build``'s options, in the groups its ``--help`` shows them by."""
    _add_input_arguments(parser.add_argument_group("images, model and output"))
    _add_detector_arguments(parser.add_argument_group("detector"))
    _add_index_arguments(parser.add_argument_group("features and index"))
    _add_calibration_arguments(parser.add_argument_group("calibration"))
    _add_run_arguments(parser.add_argument_group("run"))


Options = argparse._ActionsContainer  # a parser or an argument group: both add arguments


def _add_input_arguments(group: Options) -> None:
    group.add_argument(
        "--source",
        type=Path,
        required=True,
        help="ImageFolder directory or .tar/.tar.gz of that layout",
    )
    group.add_argument("--split", help="split folder inside the source (e.g. train)")
    group.add_argument(
        "--arch", required=True, help="resnet20..resnet110 (CIFAR) or a torchvision model name"
    )
    group.add_argument("--weights", type=Path, required=True, help="local state-dict file")
    group.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    group.add_argument("--name", help="bundle name (default: the out directory's name)")
    group.add_argument("--license-file", type=Path, help="licence notice copied into the bundle")


def _add_detector_arguments(group: Options) -> None:
    group.add_argument(
        "--detector",
        help="detector preset: v2 (default: the paper's vote + the stage outputs' Mahalanobis "
        "distances + the logit margin + the Mahalanobis distances of the "
        "pixels' and the colour channels' high-pass energy + the suspect JPEG margin, the "
        "margin on the image stored as a JPEG at quality 75, read (a JPEG round trip and a "
        "second pass) only for the fifth of authentic queries the other statistics doubt most; "
        "harmonic mean p-value), v2-dflip (round 11's default: the same with the doubted flip "
        "margin, the mirrored image's margin for the fifth of queries the model is least sure "
        "of, instead), "
        "v2-flip (the vote + the stage outputs' Mahalanobis distances + the margin + the two "
        "high-pass energies + the flip margin, a second pass for every query), v2-median "
        "(the same with the median margin, the margin on the image median-filtered over 2x2 "
        "pixels, instead of the flip margin: a second pass for every query), v2-jpeg (the vote "
        "+ the stage outputs' Mahalanobis distances + the colour channels' high-pass energy + "
        "the JPEG margin: a JPEG round trip and a second pass for every query), paper (the "
        "paper's one DW-kNN vote at the last layer) or a selection candidate",
    )
    group.add_argument(
        "--layer",
        action="append",
        dest="layers",
        default=[],
        help="feature layer with the paper's vote (module name), repeatable; overrides --detector",
    )
    group.add_argument(
        "--statistic",
        action="append",
        dest="statistics",
        default=[],
        help="explicit statistic kind@layer (vote, mahalanobis, knn_distance, margin, "
        "doubt_margin, suspect_margin; layer aliases @blocks, @stages, @last, and @logits for "
        "the margin; the pixel pseudo-layers pixels.highpass, pixels.loghighpass and "
        "pixels.chromahighpass for mahalanobis, flip.logits, the mirrored image's logits, for "
        "margin, or for doubt_margin: the same margin read only where the first pass's margin "
        "is below its held-out 20%% quantile), median.logits, the logits of the image "
        "median-filtered over 2x2 pixels, and jpeg.logits, those of the image stored as a JPEG "
        "at quality 75, for margin, or for suspect_margin: the same margin read, and the JPEG "
        "pass run, only for the queries whose other statistics combine below their held-out "
        "20%% quantile); repeatable; overrides --detector",
    )
    group.add_argument(
        "--combination",
        choices=COMBINATIONS,
        help="how several statistics' p-values combine: fisher, hmp, min_p; single for one "
        "statistic (default: the preset's; hmp for --statistic lists, fisher for several --layer)",
    )
    group.add_argument(
        "--k", type=int, default=1000, help="neighbours the vote reads (default: %(default)s)"
    )
    group.add_argument(
        "--score",
        dest="score_function",
        choices=SCORE_FUNCTIONS,
        default="dwknn",
        help="the vote's score (default: %(default)s, the paper's distance-weighted kNN)",
    )
    group.add_argument(
        "--class-k",
        type=int,
        default=DEFAULT_CLASS_K,
        help="knn_distance's k (default: %(default)s)",
    )


def _add_index_arguments(group: Options) -> None:
    group.add_argument(
        "--processing",
        choices=PROCESSING_KINDS,
        default="pca_whiten",
        help="what the indexed features go through (default: %(default)s, the paper's)",
    )
    group.add_argument(
        "--pca-dims",
        type=int,
        default=DEFAULT_PCA_DIMS,
        help="dimensions kept by PCA (default: %(default)s)",
    )
    group.add_argument(
        "--index",
        dest="index_type",
        choices=INDEX_TYPES,
        default="flat",
        help="FAISS index of the vote's search: flat is exact (default: %(default)s)",
    )
    group.add_argument("--nlist", type=int, default=4096, help="IVF lists")
    group.add_argument(
        "--nprobe", type=int, default=256, help="IVF lists searched per query (bench.search_ivf)"
    )


def _add_calibration_arguments(group: Options) -> None:
    group.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.1,
        help="share of the source's images held out for calibration instead of indexed "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--calibration-source",
        type=Path,
        help="separate calibration images (e.g. ILSVRC val) instead of a holdout",
    )
    group.add_argument("--calibration-split", help="split folder inside --calibration-source")
    group.add_argument(
        "--per-class-limit",
        type=int,
        help="the first this many images of each class, in name order (default: all)",
    )
    group.add_argument(
        "--retention",
        type=float,
        default=DEFAULT_RETENTION,
        help="share of authentic images kept: 0.90/0.95/0.98/0.99",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the holdout's, the calibration split's and the IVF training sample's "
        "draws (default: %(default)s)",
    )


def _add_run_arguments(group: Options) -> None:
    group.add_argument(
        "--batch-size", type=int, default=256, help="images per forward pass (default: %(default)s)"
    )
    group.add_argument(
        "--workers",
        dest="num_workers",
        type=int,
        default=2,
        help="image-loading processes (default: %(default)s)",
    )
    group.add_argument(
        "--chunk-size",
        type=int,
        default=8192,
        help="images per feature chunk on disk: an interrupted build resumes at chunk "
        "granularity (default: %(default)s)",
    )
    group.add_argument("--work-dir", type=Path, help="chunk directory (default: <out>.work)")
    group.add_argument(
        "--keep-work-dir", action="store_true", help="keep the feature chunks after the build"
    )
    group.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    group.add_argument("--quiet", action="store_true", help="no progress bar")


def config_of(args: argparse.Namespace) -> BuildConfig:
    """The build's configuration, from ``advguard build``'s arguments."""
    from index_builder.config import BuildConfig

    return BuildConfig(
        source=args.source,
        split=args.split,
        arch=args.arch,
        weights=args.weights,
        out=args.out,
        layers=tuple(args.layers),
        processing=args.processing,
        pca_dims=args.pca_dims,
        index_type=args.index_type,
        nlist=args.nlist,
        nprobe=args.nprobe,
        k=args.k,
        score_function=args.score_function,
        combination=args.combination,
        detector=args.detector,
        statistics=tuple(args.statistics),
        class_k=args.class_k,
        holdout_fraction=args.holdout_fraction,
        calibration_source=args.calibration_source,
        calibration_split=args.calibration_split,
        per_class_limit=args.per_class_limit,
        retention=args.retention,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        chunk_size=args.chunk_size,
        work_dir=args.work_dir,
        keep_work_dir=args.keep_work_dir,
        device=args.device,
        seed=args.seed,
        name=args.name,
        license_file=args.license_file,
    )


def built(config: BuildConfig, progress: bool) -> BuildReport | None:
    """Build the bundle, sharded over the ranks under torchrun; None on a rank other than 0
    (its chunks are delivered to rank 0, which writes the bundle)."""
    from index_builder.build import build_bundle
    from index_builder.distributed import build_bundle_distributed, launched_by_torchrun

    if launched_by_torchrun():
        return build_bundle_distributed(config, progress=progress)
    return build_bundle(config, progress=progress)


def summary_of(report: BuildReport) -> dict[str, Any]:
    """The one JSON line ``advguard build`` prints."""
    manifest = report.manifest
    return {
        "bundle": str(report.bundle),
        "indexed": manifest.counts.indexed,
        "holdout": manifest.counts.holdout,
        "skipped": manifest.counts.skipped,
        "holdout_accuracy": round(manifest.calibration.accuracy, 4),
        "threshold": manifest.calibration.threshold,
        "extract_images_per_second": round(report.images_per_second, 1),
        "seconds": round(report.seconds, 1),
    }


def run_build(args: argparse.Namespace) -> int:
    """Arguments -> configuration -> bundle (or a one-line error, exit 2) -> summary."""
    try:
        report = built(config_of(args), progress=not args.quiet)
    except AdvguardError as exc:
        print(f"advguard build: error: {exc}", file=sys.stderr)
        return 2
    if report is not None:
        for line in unreadable_lines(report):
            print(line, file=sys.stderr)
        print(json.dumps(summary_of(report)))
    return 0


SHOWN_UNREADABLE = 5  # unreadable images named on stderr; the bundle's skipped.json has all


def unreadable_lines(report: BuildReport) -> list[str]:
    """What the builder tells its user of the images it skipped: how many, where the list is,
    and the first few with their reasons."""
    from index_builder.build import SKIPPED_FILE

    found = report.unreadable
    if not found:
        return []
    lines = [
        f"advguard build: skipped {len(found)} unreadable image(s), each listed with its reason "
        f"in {report.bundle / SKIPPED_FILE}:"
    ]
    lines += [f"  {u.image}: {u.reason}" for u in found[:SHOWN_UNREADABLE]]
    if len(found) > SHOWN_UNREADABLE:
        lines.append(f"  ... and {len(found) - SHOWN_UNREADABLE} more")
    return lines


def register(commands: Any) -> None:
    build = commands.add_parser("build", help="build a bundle (features, index, calibration)")
    add_build_arguments(build)
    build.set_defaults(run=run_build)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m index_builder", description=__doc__)
    add_build_arguments(parser)
    return run_build(parser.parse_args(argv))
