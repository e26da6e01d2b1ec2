"""The detector configurations the evaluation compares, and how each becomes a Guard: a bundle
built by the index builder (cached under the evaluation's cache, reused while its stamp
matches), or a view of a built bundle's statistics thresholded on that bundle's threshold part
(the layer study and the ablations: no build of their own); and the scores a configuration
gives a batch of features."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.core.calibration import threshold_for_retention
from app.core.detector import Combination
from app.core.errors import StaleWorkDirError
from app.core.features import PIXEL_LAYERS, BatchFeatures
from app.core.guard import Guard
from app.core.manifest import Manifest
from app.core.models import file_sha256
from app.core.processing import ProcessingKind
from app.core.scoring import ScoreFunction
from app.core.statistics import KnnVote
from evaluation.data import source_stamp
from evaluation.options import EvaluateOptions, Log

# Every statistic the ablations draw on, in one bundle (built once, not committed).
ALL_STATISTICS: tuple[str, ...] = (
    "vote@last",
    "mahalanobis@blocks",
    "knn_distance@blocks",
    "margin@logits",
    "mahalanobis@pixels.highpass",
    "mahalanobis@pixels.loghighpass",
)


# The v2 presets evaluated for the CIFAR models: the default (round 13's), round 11's default
# (the doubted flip margin) and the opt-in ones with the flip margin, the median margin and the
# JPEG margin (each a second forward pass for every query).
V2_PRESETS: tuple[str, ...] = ("v2", "v2-dflip", "v2-flip", "v2-median", "v2-jpeg")


# Holdout of the training split for detectors with a reference part and a threshold part.
V2_HOLDOUT_FRACTION = 0.1


@dataclass(frozen=True)
class DetectorConfig:
    """One detector the evaluation compares: its table name, the study it belongs to, and what
    the builder makes of it (layers, processing, k, combination, a preset or statistics)."""

    name: str
    study: str  # table2 | layers | k | multilayer | v2 | ablation
    layers: tuple[str, ...]
    processing: ProcessingKind = "pca_whiten"
    k: int = 1000
    combination: str = "single"
    preset: str | None = None
    statistics: tuple[str, ...] = ()


def paper_config(default_layer: str) -> DetectorConfig:
    """The paper's detector as the builder made it before v2 (PCA + whiten, last stage)."""
    return DetectorConfig(f"pca_whiten-{default_layer}-k1000", "table2", (default_layer,))


def detector_configs(default_layer: str, layers: tuple[str, ...]) -> list[DetectorConfig]:
    configs = [
        DetectorConfig(f"{kind}-{default_layer}-k1000", "table2", (default_layer,), kind)
        for kind in ("none", "l2", "pca_whiten")
    ]
    configs += [
        DetectorConfig(f"pca_whiten-{default_layer}-k{k}", "k", (default_layer,), k=k)
        for k in (50, 200, 5000)
    ]
    configs.append(
        DetectorConfig(
            f"fisher-{'+'.join(layers)}-k1000", "multilayer", tuple(layers), combination="fisher"
        )
    )
    return configs


def threshold_values(bundle: Path, manifest: Manifest) -> np.ndarray:
    """(n, S) statistics of the correctly classified threshold-part images of a bundle."""
    name = manifest.calibration.threshold_statistics_file
    if name is None:
        raise ValueError(f"{bundle} keeps no per-statistic threshold values")
    values: np.ndarray = np.load(bundle / name, allow_pickle=False)
    return values


def _view(
    guard: Guard, detector_columns: list[int], combination: Combination | None, values: np.ndarray
) -> Guard:
    """A detector made of some of a bundle's statistics, thresholded on the bundle's threshold
    part at the bundle's retention (exactly what the builder would have calibrated)."""
    detector = guard.detector.subset(detector_columns, combination)
    retention = guard.manifest.calibration.operating_retention
    threshold = threshold_for_retention(detector.combine(values[:, detector_columns]), retention)
    return Guard(guard.manifest, guard.network, detector, threshold, guard.index_device)


def layer_views(
    config: DetectorConfig, bundle: Path, guard: Guard, skip: str
) -> list[tuple[DetectorConfig, Guard]]:
    """The layer study without extra builds: each layer's vote inside the multi-layer bundle is
    exactly the single-layer detector the builder makes for that layer (same processing fit,
    index, k and score function), thresholded on the bundle's threshold part."""
    if config.study != "multilayer":
        return []
    values = threshold_values(bundle, guard.manifest)
    views = []
    for column, name in enumerate(guard.layers):
        if name == skip:
            continue
        view_config = DetectorConfig(f"{config.processing}-{name}-k{config.k}", "layers", (name,))
        views.append((view_config, _view(guard, [column], None, values)))
    return views


def ablation_columns(names: list[str]) -> Iterator[tuple[str, list[int], Combination | None]]:
    """(label, columns, combination) of every ablation of the all-statistics bundle: each
    statistic family alone, each candidate preset with each combination, layer subsets."""
    from index_builder.detectors import CANDIDATE_COMBINATIONS

    families = _statistic_families(names)
    _add_boundary_and_noise(families, names)
    for label, columns in families.items():
        if len(columns) == 1:
            yield label, columns, None
            continue
        for combination in CANDIDATE_COMBINATIONS:
            yield f"{label} [{combination}]", columns, combination


def _columns_where(names: list[str], predicate: Callable[[str], bool]) -> list[int]:
    """The columns of the statistics whose names ``predicate`` keeps."""
    return [i for i, name in enumerate(names) if predicate(name)]


def _statistic_families(names: list[str]) -> dict[str, list[int]]:
    """Label -> columns of the vote, the class-conditional distances and their layer subsets
    (the vote is column 0, at the last block; a stage ends at a block named ``*.2``)."""

    def block_maha(name: str) -> bool:  # a block's Mahalanobis, not the pixels'
        return name.startswith("mahalanobis@") and name.split("@")[1] not in PIXEL_LAYERS

    last = names[0].split("@")[1]
    stage_ends = {n.split("@")[1] for n in names if n.split("@")[1].endswith(".2")} | {last}
    maha_last = _columns_where(names, lambda n: n == f"mahalanobis@{last}")
    maha_blocks = _columns_where(names, block_maha)
    maha_stages = _columns_where(names, lambda n: block_maha(n) and n.split("@")[1] in stage_ends)
    knn_last = _columns_where(
        names, lambda n: n.startswith("knn_distance") and n.endswith(f"@{last}")
    )
    knn_blocks = _columns_where(names, lambda n: n.startswith("knn_distance"))
    return {
        "vote (paper)": [0],
        "mahalanobis@last": maha_last,
        "knn_distance@last": knn_last,
        "mahalanobis@blocks": maha_blocks,
        "knn_distance@blocks": knn_blocks,
        "vote+mahalanobis@blocks": [0, *maha_blocks],
        "vote+mahalanobis@stages": [0, *maha_stages],
        "vote+knn_distance@last": [0, *knn_last],
        "vote+knn_distance@blocks": [0, *knn_blocks],
        "vote+mahalanobis@blocks+knn_distance@last": [0, *maha_blocks, *knn_last],
    }


def _add_boundary_and_noise(families: dict[str, list[int]], names: list[str]) -> None:
    """The boundary statistic (margin) and the noise statistics (the pixels' high-pass energy,
    raw and in log space), each alone and added to every family that holds the vote: the
    candidates' "+margin", "+hp" and "+lhp" variants (the two noise statistics never together)."""
    from index_builder.detectors import HIGHPASS_STATISTIC, LOG_HIGHPASS_STATISTIC

    def with_vote() -> list[tuple[str, list[int]]]:
        return [(label, columns) for label, columns in families.items() if 0 in columns]

    def add(alone: str, suffix: str, extra: list[int], bases: list[tuple[str, list[int]]]) -> None:
        families[alone] = extra
        families.update(
            {f"{label.removesuffix(' (paper)')}+{suffix}": [*c, *extra] for label, c in bases}
        )

    margin = _columns_where(names, lambda n: n.startswith("margin@"))
    if margin:
        add("margin", "margin", margin, with_vote())
    noise_bases = with_vote()
    for alone, suffix in ((HIGHPASS_STATISTIC, "hp"), (LOG_HIGHPASS_STATISTIC, "lhp")):
        extra = [i for i, name in enumerate(names) if name == alone]
        if extra:
            add(alone, suffix, extra, noise_bases)


def statistic_views(bundle: Path) -> list[tuple[DetectorConfig, Guard]]:
    guard = Guard.load(bundle, device="cpu")
    values = threshold_values(bundle, guard.manifest)
    views = []
    for label, columns, combination in ablation_columns(guard.detector.names):
        config = DetectorConfig(
            label,
            "ablation",
            tuple(dict.fromkeys(guard.detector.names[i].split("@")[1] for i in columns)),
            combination=combination or "single",
            statistics=tuple(guard.detector.names[i] for i in columns),
        )
        views.append((config, _view(guard, columns, combination, values)))
    return views


@dataclass(frozen=True)
class BuildPlan:
    """Where one configuration's bundle goes, what it is stamped with (a stamp that matches
    lets the cached bundle be reused), and its feature work directory."""

    out: Path
    stamp: dict[str, Any]
    work_dir: Path
    v2: bool
    holdout: float


def build_plan(
    options: EvaluateOptions, weights: Path, config: DetectorConfig, model_name: str
) -> BuildPlan:
    from index_builder.detectors import PRESETS as DETECTOR_PRESETS
    from index_builder.detectors import candidate_presets

    v2 = bool(config.preset or config.statistics)
    holdout = V2_HOLDOUT_FRACTION if v2 else 0.05
    # a preset is stamped with what it means today, so a changed preset is rebuilt
    preset = {**DETECTOR_PRESETS, **candidate_presets()}.get(config.preset or "")
    stamp: dict[str, Any] = {
        "weights": file_sha256(weights),
        "layers": list(config.layers),
        "processing": config.processing,
        "k": config.k,
        "combination": config.combination,
        "preset": config.preset,
        "preset_means": None if preset is None else [list(preset.statistics), preset.combination],
        "statistics": list(config.statistics),
        "holdout": holdout,
        "seed": options.seed,  # the holdout's draw
        "source": source_stamp(options.source),
    }
    limit = options.build_per_class_limit
    stamp["per_class_limit"] = limit
    # feature chunks are kept per set of statistics: a different set extracts other layers
    what = json.dumps([stamp["preset_means"], stamp["statistics"]]).encode()
    work_name = f"{config.name}-{hashlib.sha256(what).hexdigest()[:8]}"
    limited = "" if limit is None else f"-first{limit}"
    work_dir = (
        options.cache_dir
        / "work"
        / model_name
        / ((work_name if v2 else "+".join(config.layers)) + limited)
    )
    out = options.cache_dir / "bundles" / model_name / config.name
    return BuildPlan(out, stamp, work_dir, v2, holdout)


def build_configuration(
    options: EvaluateOptions,
    arch: str,
    weights: Path,
    config: DetectorConfig,
    model_name: str,
    log: Log,
) -> Path:
    """Build (or reuse from the cache) the bundle of one detector configuration."""
    from index_builder.build import build_bundle
    from index_builder.config import BuildConfig

    plan = build_plan(options, weights, config, model_name)
    stamp_file = plan.out / "evaluation-config.json"
    reusable = (plan.out / "manifest.json").is_file() and stamp_file.is_file()
    if reusable and json.loads(stamp_file.read_text()) == plan.stamp:
        return plan.out
    log(f"building bundle {config.name}")
    build = BuildConfig(
        source=options.source,
        split="train",
        arch=arch,
        weights=weights,
        out=plan.out,
        layers=config.layers,
        processing=config.processing,
        k=config.k,
        score_function="dwknn",
        holdout_fraction=plan.holdout,
        work_dir=plan.work_dir,
        keep_work_dir=True,
        seed=options.seed,
        per_class_limit=options.build_per_class_limit,
        name=f"{model_name}-{config.name}",
        detector=config.preset,
        statistics=config.statistics,
        combination=None if plan.v2 or config.combination == "single" else "fisher",
    )
    try:
        build_bundle(build, progress=False)
    except StaleWorkDirError as stale:
        # the evaluation's own cache: another build's chunks (the source archive written again,
        # as a fresh copy of ../shared is) are nobody's work to keep
        log(f"{stale}: in the evaluation's cache, so started afresh")
        shutil.rmtree(plan.work_dir)
        build_bundle(build, progress=False)
    stamp_file.write_text(json.dumps(plan.stamp))
    return plan.out


# (id of a statistic object, id of a feature batch) -> its values: the ablation views share the
# statistics of one bundle, so each statistic is computed once per set, not once per view.
StatisticMemo = dict[tuple[int, int], np.ndarray]


def guard_scores(
    guard: Guard,
    batch: BatchFeatures,
    score_function: ScoreFunction | None,
    memo: StatisticMemo | None = None,
) -> np.ndarray:
    """Scores of the predicted classes through the guard's own detector; a single vote's score
    function may be varied at query time (Table 2's kNN / W-kNN / DW-kNN rows)."""
    detector = guard.detector
    vote = detector.statistics[0]
    if (
        detector.combination == "single"
        and isinstance(vote, KnnVote)
        and score_function not in (None, vote.score_function)
    ):
        varied: np.ndarray = vote.values(batch.features, batch.predictions, score_function)
        return varied
    if memo is None:
        return guard.score(batch)
    columns = []
    for s in detector.statistics:
        key = (id(s), id(batch))
        if key not in memo:
            memo[key] = s.values(batch.features, batch.predictions)
        columns.append(memo[key])
    return detector.combine(np.stack(columns, axis=1))
