"""The builder job: a labelled image source -> a verified bundle directory.

Steps: list the source -> split a deterministic per-class holdout -> extract features in chunks
-> fit the processing on the indexed features -> build the FAISS index -> score the held-out
correctly classified images with the same Detector the service uses -> thresholds -> bundle.
"""

from __future__ import annotations

import hashlib
import math
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

import app
from app.core import search
from app.core.bundle import write_manifest
from app.core.calibration import DEFAULT_RETENTION, calibrate, retention_key
from app.core.detector import Detector, LayerIndex, MultiLayerDetector
from app.core.errors import SourceError
from app.core.features import FeatureNetwork, pick_device
from app.core.manifest import (
    CalibrationSpec,
    Combination,
    CountsSpec,
    DetectorSpec,
    LayerSpec,
    Manifest,
    ModelSpec,
    PreprocessingSpec,
    ProvenanceSpec,
)
from app.core.models import PRESETS, describe_architecture, file_sha256, load_model
from app.core.processing import (
    DEFAULT_PCA_DIMS,
    FeatureProcessing,
    ProcessingKind,
    fit_processing,
)
from app.core.scoring import ScoreFunction
from app.core.search import IndexType
from index_builder.extract import ChunkStore, ExtractionReport, check_fingerprint, extract_features
from index_builder.sources import Entry, ImageSource, open_source

WEIGHTS_FILE = "model.pth"
LABELS_FILE = "labels.npy"
CALIBRATION_SCORES_FILE = "calibration_scores.npy"
HONEST_SCORES_FILE = "calibration_honest_scores.npy"


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
    holdout_fraction: float = 0.05
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
    combination: Combination = "single"


@dataclass(frozen=True)
class _BuiltLayer:
    name: str
    input_dim: int
    processing: FeatureProcessing
    index: Any
    detector: Detector
    calibration_scores: np.ndarray  # correctly classified held-out images
    honest_scores: np.ndarray  # every held-out image, the model's errors included


@dataclass(frozen=True)
class BuildReport:
    bundle: Path
    manifest: Manifest
    extraction: list[ExtractionReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        images = sum(r.images + r.skipped for r in self.extraction)
        seconds = sum(r.seconds for r in self.extraction)
        return images / seconds if seconds > 0 else 0.0


def holdout_mask(entries: list[Entry], fraction: float, seed: int) -> np.ndarray:
    """Deterministic per-class holdout: the ``fraction`` of each class with the smallest hash.

    Hashing (seed, key) rather than sampling keeps the choice stable when a class grows.
    """
    mask = np.zeros(len(entries), dtype=bool)
    if fraction <= 0:
        return mask
    by_class: dict[int, list[tuple[str, int]]] = {}
    for position, entry in enumerate(entries):
        digest = hashlib.sha1(f"{seed}:{entry.key}".encode()).hexdigest()
        by_class.setdefault(entry.label, []).append((digest, position))
    for members in by_class.values():
        if len(members) < 2:
            continue
        take = max(1, math.floor(fraction * len(members) + 0.5))
        for _, position in sorted(members)[:take]:
            mask[position] = True
    return mask


def _software() -> dict[str, str]:
    return {
        "advguard": app.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "faiss": search.faiss_version(),
        "numpy": np.__version__,
    }


def _rows(store: ChunkStore, layer: str, select: np.ndarray) -> Iterator[tuple[range, np.ndarray]]:
    """(span, selected feature rows) per chunk, memory-mapped; ``select`` is over all positions."""
    for chunk in range(store.n_chunks):
        chosen = _chosen(store, chunk, select)
        if chosen.any():
            yield store.span(chunk), np.asarray(store.load(chunk, f"features_{layer}")[chosen])


def _chosen(store: ChunkStore, chunk: int, select: np.ndarray) -> np.ndarray:
    """Rows of ``chunk`` that are selected and were decoded successfully."""
    span = store.span(chunk)
    mask: np.ndarray = select[span.start : span.stop] & np.asarray(store.load(chunk, "ok"))
    return mask


def _gather(store: ChunkStore, name: str, select: np.ndarray) -> np.ndarray:
    """One stored array's selected rows over all chunks, concatenated (small sets only)."""
    parts = [
        np.asarray(store.load(c, name)[mask])
        for c in range(store.n_chunks)
        if (mask := _chosen(store, c, select)).any()
    ]
    return np.concatenate(parts)


def _select(store: ChunkStore, per_position: np.ndarray, select: np.ndarray) -> np.ndarray:
    """Per-position values (e.g. labels) for the selected, decoded rows, in chunk order."""
    return np.concatenate(
        [
            per_position[store.span(c).start : store.span(c).stop][_chosen(store, c, select)]
            for c in range(store.n_chunks)
        ]
    )


def _extract(
    config: BuildConfig,
    network: FeatureNetwork,
    source: ImageSource,
    entries: list[Entry],
    work_root: Path,
    fingerprint: dict[str, object],
    progress: bool,
    on_chunk_written: Callable[[int], None] | None,
) -> tuple[ChunkStore, ExtractionReport]:
    check_fingerprint(work_root, fingerprint)
    store = ChunkStore(work_root, len(entries), config.chunk_size, list(network.layers))
    preset = PRESETS[describe_architecture(config.arch).preset]
    report = extract_features(
        network,
        source,
        entries,
        store,
        preset,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        progress=progress,
        on_chunk_written=on_chunk_written,
    )
    return store, report


# Signature of ``_extract``; ``index_builder.distributed`` passes one that shards the chunks
# across torch.distributed ranks and gathers them on rank 0.
Extractor = Callable[
    [
        BuildConfig,
        FeatureNetwork,
        ImageSource,
        list[Entry],
        Path,
        dict[str, object],
        bool,
        Callable[[int], None] | None,
    ],
    tuple[ChunkStore, ExtractionReport],
]


def build_bundle(
    config: BuildConfig,
    progress: bool = True,
    on_chunk_written: Callable[[int], None] | None = None,
    extractor: Extractor | None = None,
) -> BuildReport:
    started = time.perf_counter()
    extract = extractor or _extract
    info = describe_architecture(config.arch)
    preset = PRESETS[info.preset]
    layers = list(config.layers) or [info.default_layer]
    combination = config.combination
    if combination == "single" and len(layers) != 1:
        raise ValueError(
            "a single-layer bundle indexes exactly one feature layer; "
            "for several, choose a combination (e.g. fisher)"
        )
    if combination != "single" and (len(layers) < 2 or len(set(layers)) != len(layers)):
        raise ValueError(f"combination {combination!r} needs two distinct layers or more")
    cal_rows: list[np.ndarray] = []

    source = open_source(config.source, config.split)
    listing = source.listing(config.per_class_limit)
    entries = listing.entries
    num_classes = len(listing.classes)
    model = load_model(config.arch, config.weights, num_classes)
    device = pick_device(config.device)
    network = FeatureNetwork(model, layers, preset).to(device).eval()
    weights_sha = file_sha256(config.weights)
    work_dir = config.work_dir or config.out.with_name(config.out.name + ".work")

    def fingerprint(src: ImageSource, items: list[Entry]) -> dict[str, object]:
        keys = hashlib.sha256("\n".join(e.key for e in items).encode()).hexdigest()
        return {
            "source": src.description,
            "entries": len(items),
            "entries_sha256": keys,
            "weights_sha256": weights_sha,
            "arch": config.arch,
            "layers": layers,
            "chunk_size": config.chunk_size,
        }

    store, main_report = extract(
        config,
        network,
        source,
        entries,
        work_dir / "source",
        fingerprint(source, entries),
        progress,
        on_chunk_written,
    )
    reports = [main_report]
    labels_all = np.array([e.label for e in entries], dtype=np.int64)
    if config.calibration_source is None:
        held_out = holdout_mask(entries, config.holdout_fraction, config.seed)
        if not held_out.any():
            raise SourceError("the holdout is empty: too few images per class to calibrate")
        cal_store, cal_labels, cal_select = store, labels_all, held_out
    else:
        held_out = np.zeros(len(entries), dtype=bool)
        cal_source = open_source(config.calibration_source, config.calibration_split)
        cal_listing = cal_source.listing()
        if cal_listing.classes != listing.classes:
            raise SourceError("the calibration source's classes differ from the indexed source's")
        cal_store, cal_report = extract(
            config,
            network,
            cal_source,
            cal_listing.entries,
            work_dir / "calibration",
            fingerprint(cal_source, cal_listing.entries),
            progress,
            None,
        )
        reports.append(cal_report)
        cal_labels = np.array([e.label for e in cal_listing.entries], dtype=np.int64)
        cal_select = np.ones(len(cal_listing.entries), dtype=bool)

    indexed = ~held_out
    index_labels = _select(store, labels_all, indexed)
    cal_predictions = _gather(cal_store, "predictions", cal_select)
    cal_truth = _select(cal_store, cal_labels, cal_select)
    correct = cal_predictions == cal_truth
    if not correct.any():
        raise SourceError("no held-out image is classified correctly: cannot calibrate")

    built: list[_BuiltLayer] = []
    for layer in layers:
        input_dim = next(rows.shape[1] for _, rows in _rows(store, layer, indexed))
        processing = fit_processing(
            config.processing,
            (rows for _, rows in _rows(store, layer, indexed)),
            input_dim,
            config.pca_dims,
        )
        training_sample = None
        if config.index_type == "ivf":
            sample = np.concatenate([processing.apply(r) for _, r in _rows(store, layer, indexed)])
            rng = np.random.default_rng(config.seed)
            training_sample = sample[rng.permutation(len(sample))[: config.nlist * 64]]
        index = search.new_index(
            processing.output_dim, config.index_type, config.nlist, training_sample
        )
        search.add_vectors(
            index, (processing.apply(rows) for _, rows in _rows(store, layer, indexed))
        )
        if config.index_type == "ivf":
            search.set_nprobe(index, config.nprobe)
        if index_labels.shape[0] != search.index_size(index):
            raise AssertionError("index rows and labels are out of step")
        detector = Detector(
            LayerIndex(layer, processing, index), index_labels, config.k, config.score_function
        )
        cal_features = _gather(cal_store, f"features_{layer}", cal_select)
        honest_layer_scores = detector.score(cal_features, cal_predictions)
        built.append(
            _BuiltLayer(
                layer,
                input_dim,
                processing,
                index,
                detector,
                honest_layer_scores[correct],
                honest_layer_scores,
            )
        )
        if combination != "single":
            cal_rows.append(cal_features)

    if combination == "single":
        honest_scores = built[0].honest_scores
    else:
        combined = MultiLayerDetector(
            [b.detector for b in built], [b.calibration_scores for b in built], combination
        )
        honest_scores = combined.score(
            {b.name: rows for b, rows in zip(built, cal_rows, strict=True)},
            cal_predictions,
        )
    cal_scores = honest_scores[correct]
    calibration = calibrate(cal_scores)
    operating_key = retention_key(config.retention)
    if operating_key not in calibration.thresholds:
        raise ValueError(f"retention must be one of {sorted(calibration.thresholds)}")

    out = config.out
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copyfile(config.weights, staging / WEIGHTS_FILE)
    layer_specs = []
    layer_files = []
    for b in built:
        safe_layer = b.name.replace(".", "_")
        layer_spec = LayerSpec(
            name=b.name,
            input_dim=b.input_dim,
            processing=config.processing,
            output_dim=b.processing.output_dim,
            processing_file=f"processing_{safe_layer}.npz",
            index_file=f"index_{safe_layer}.faiss",
            index_type=config.index_type,
            nlist=config.nlist if config.index_type == "ivf" else None,
            nprobe=config.nprobe if config.index_type == "ivf" else None,
            calibration_scores_file=None
            if combination == "single"
            else f"calibration_scores_{safe_layer}.npy",
        )
        b.processing.save(staging / layer_spec.processing_file)
        search.save_index(b.index, staging / layer_spec.index_file)
        layer_files += [layer_spec.processing_file, layer_spec.index_file]
        if layer_spec.calibration_scores_file is not None:
            np.save(
                staging / layer_spec.calibration_scores_file,
                b.calibration_scores.astype(np.float32),
            )
            layer_files.append(layer_spec.calibration_scores_file)
        layer_specs.append(layer_spec)
    np.save(staging / LABELS_FILE, index_labels.astype(np.int32))
    np.save(staging / CALIBRATION_SCORES_FILE, cal_scores.astype(np.float32))
    np.save(staging / HONEST_SCORES_FILE, honest_scores.astype(np.float32))
    extra_files = []
    if config.license_file is not None:
        shutil.copyfile(config.license_file, staging / config.license_file.name)
        extra_files.append(config.license_file.name)
    file_names = [
        WEIGHTS_FILE,
        LABELS_FILE,
        CALIBRATION_SCORES_FILE,
        HONEST_SCORES_FILE,
        *layer_files,
        *extra_files,
    ]
    files = {name: file_sha256(staging / name) for name in file_names}
    per_class = np.bincount(index_labels, minlength=num_classes).tolist()
    manifest = Manifest(
        name=config.name or out.name,
        model=ModelSpec(
            arch=config.arch,
            family=info.family,
            num_classes=num_classes,
            weights_file=WEIGHTS_FILE,
            weights_sha256=files[WEIGHTS_FILE],
            preprocessing=PreprocessingSpec(
                preset=preset.name,
                resize=preset.resize,
                crop=preset.crop,
                mean=preset.mean,
                std=preset.std,
            ),
        ),
        detector=DetectorSpec(
            layers=layer_specs,
            k=config.k,
            score_function=config.score_function,
            combination=combination,
            labels_file=LABELS_FILE,
        ),
        class_names=listing.classes,
        counts=CountsSpec(
            classes=num_classes,
            indexed=int(index_labels.shape[0]),
            holdout=int(held_out.sum()),
            skipped=_count_skipped(store),
            indexed_per_class=[int(v) for v in per_class],
        ),
        calibration=CalibrationSpec(
            source="holdout" if config.calibration_source is None else "directory",
            holdout_fraction=config.holdout_fraction if config.calibration_source is None else None,
            n_images=int(cal_truth.shape[0]),
            n_correct=int(correct.sum()),
            accuracy=float(correct.mean()),
            mean=calibration.mean,
            std=calibration.std,
            quantiles=calibration.quantiles,
            thresholds=calibration.thresholds,
            operating_retention=config.retention,
            threshold=calibration.thresholds[operating_key],
            scores_file=CALIBRATION_SCORES_FILE,
            honest_scores_file=HONEST_SCORES_FILE,
        ),
        provenance=ProvenanceSpec(
            source=source.description,
            split=config.split,
            calibration_source=str(config.calibration_source)
            if config.calibration_source
            else None,
            per_class_limit=config.per_class_limit,
            seed=config.seed,
            built_at=datetime.now(UTC).isoformat(timespec="seconds"),
            build_seconds=round(time.perf_counter() - started, 2),
            software=_software(),
        ),
        files=files,
    )
    write_manifest(staging, manifest)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    if not config.keep_work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    return BuildReport(out, manifest, reports, time.perf_counter() - started)


def _count_skipped(store: ChunkStore) -> int:
    return int(sum((~np.asarray(store.load(c, "ok"))).sum() for c in range(store.n_chunks)))
