"""What one build is asked to do (``BuildConfig``, the CLI's options), and the checks that
refuse a configuration before any image is read: values out of range, a licence notice that
could replace a bundle file, and output, staging or work directories holding what the build did
not write (it replaces the first two and deletes the last)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.core.calibration import (
    DEFAULT_RETENTION,
    RETENTIONS,
    retention_key,
)
from app.core.detector import Combination
from app.core.errors import ConfigError
from app.core.processing import (
    DEFAULT_PCA_DIMS,
    ProcessingKind,
)
from app.core.scoring import ScoreFunction
from app.core.search import IndexType
from app.core.statistics import (
    DEFAULT_CLASS_K,
)


@dataclass(frozen=True)
class BuildConfig:
    source: Path
    arch: str
    weights: Path
    out: Path
    split: str | None = None
    layers: tuple[str, ...] = ()
    processing: ProcessingKind = "pca_whiten"
    pca_dims: int = DEFAULT_PCA_DIMS
    index_type: IndexType = "flat"
    nlist: int = 4096
    nprobe: int = 256  # 0.3% of verdicts differ from exact at 1.28M x 256 (bench.search_ivf)
    k: int = 1000
    score_function: ScoreFunction = "dwknn"
    holdout_fraction: float = 0.1
    calibration_source: Path | None = None
    calibration_split: str | None = None
    per_class_limit: int | None = None
    retention: float = DEFAULT_RETENTION
    batch_size: int = 256
    num_workers: int = 2
    chunk_size: int = 8192
    work_dir: Path | None = None
    device: str | None = None
    seed: int = 0
    name: str | None = None
    license_file: Path | None = None
    keep_work_dir: bool = False
    # the detector: a preset (index_builder.detectors), or explicit kind@layer statistics, or
    # (older form) explicit layers with one vote each; combination None: the preset's own
    detector: str | None = None
    statistics: tuple[str, ...] = ()
    combination: Combination | None = None
    class_k: int = DEFAULT_CLASS_K


# What the builder itself puts in its work directory: one chunk store per image source, and in a
# torchrun build each other rank's store beside it (``source.rank1``: index_builder.distributed).
WORK_ENTRIES = frozenset({"source", "calibration"})


def written_by_the_builder(name: str) -> bool:
    """Whether a work directory's entry is one the builder writes (a killed build leaves them,
    and a resumed one reads them)."""
    store, _, rank = name.partition(".rank")
    return store in WORK_ENTRIES and (rank == "" or rank.isdigit())


# The kinds of file a bundle is made of (weights, manifest and sources, arrays, indexes).
BUNDLE_SUFFIXES = frozenset({".pth", ".json", ".npy", ".npz", ".faiss"})


def _left_by_a_build(staging: Path, license_name: str | None) -> bool:
    """Whether ``staging`` holds only what a build writes there (an interrupted write's bundle
    files, and this build's licence notice): the next build may replace it."""
    if not staging.is_dir():
        return False
    return all(
        path.is_file() and (path.suffix.lower() in BUNDLE_SUFFIXES or path.name == license_name)
        for path in staging.iterdir()
    )


def check_config(config: BuildConfig) -> None:
    """Refuse, before any image is read, the options the build would otherwise trip on only
    after the extraction (values out of range), and the paths it would destroy: the write
    replaces ``out`` and the work directory is deleted at the end, so neither may hold anything
    but a bundle and the builder's own chunks."""
    problems = [*_value_problems(config), *_license_problems(config), *_path_problems(config)]
    if problems:
        raise ConfigError("; ".join(problems))


def _value_problems(config: BuildConfig) -> list[str]:
    """The numeric options out of range, each as the message that names it."""
    counts = {
        "--k": config.k,
        "--pca-dims": config.pca_dims,
        "--class-k": config.class_k,
        "--batch-size": config.batch_size,
        "--chunk-size": config.chunk_size,
        "--nlist": config.nlist,
        "--nprobe": config.nprobe,
    }
    problems = [
        f"{name} must be at least 1 (got {value})" for name, value in counts.items() if value < 1
    ]
    if config.per_class_limit is not None and config.per_class_limit < 1:
        problems.append(f"--per-class-limit must be at least 1 (got {config.per_class_limit})")
    if config.num_workers < 0:
        problems.append(f"--workers must be at least 0 (got {config.num_workers})")
    if config.calibration_source is None and not 0.0 < config.holdout_fraction < 1.0:
        problems.append(
            f"--holdout-fraction must be between 0 and 1 (got {config.holdout_fraction})"
        )
    offered = sorted(retention_key(r) for r in RETENTIONS)
    if retention_key(config.retention) not in offered:
        problems.append(f"--retention must be one of {', '.join(offered)} (got {config.retention})")
    return problems


def _license_problems(config: BuildConfig) -> list[str]:
    """A licence notice that is missing, or named so that it could replace a bundle file."""
    license_file = config.license_file
    if license_file is None:
        return []
    if not license_file.is_file():
        return [f"--license-file {license_file} is not a file"]
    if license_file.suffix.lower() in BUNDLE_SUFFIXES:
        return [
            f"--license-file {license_file.name}: a {license_file.suffix} name could replace a "
            "bundle file; give the notice a text name (LICENSE, NOTICE.txt, ...)"
        ]
    return []


def _path_problems(config: BuildConfig) -> list[str]:
    """The output, staging and work directories the build would replace or delete while they
    hold something it did not write."""
    problems = []
    out = config.out
    if out.exists() and not out.is_dir():
        problems.append(f"--out {out} exists and is not a directory")
    elif out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        problems.append(
            f"--out {out} holds files and is not a bundle: the build would replace it; choose a "
            "new or empty directory, or a bundle to rebuild"
        )
    staging = out.with_name(out.name + ".staging")
    license_name = config.license_file.name if config.license_file is not None else None
    if staging.exists() and not _left_by_a_build(staging, license_name):
        problems.append(
            f"{staging} exists and is not a bundle left by an interrupted build: the build "
            "writes the bundle there first and would replace it; move it away"
        )
    work_dir = config.work_dir or out.with_name(out.name + ".work")
    if work_dir.exists() and not work_dir.is_dir():
        problems.append(f"work directory {work_dir} exists and is not a directory")
    elif work_dir.is_dir():
        foreign = sorted(p.name for p in work_dir.iterdir() if not written_by_the_builder(p.name))
        if foreign:
            problems.append(
                f"work directory {work_dir} holds files the build did not write "
                f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}): the build "
                "deletes its work directory when done; pass a new or empty --work-dir"
            )
    return problems
