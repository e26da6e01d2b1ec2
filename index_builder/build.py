"""The builder job: a labelled image source -> a verified bundle directory.

Stages (``build_bundle``): plan (model, detector statistics) -> extract (features of every image
in chunks; a deterministic per-class holdout, split again into a reference and a threshold part)
-> fit (processing and class densities on the indexed features only) -> index (FAISS) ->
calibrate (the same Detector the service uses, scored on the held-out images) -> write.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

import app
from app.core import search
from app.core.bundle import write_manifest
from app.core.calibration import (
    Calibration,
    calibrate,
    retention_key,
)
from app.core.detector import Combination, Detector
from app.core.errors import ConfigError, SourceError
from app.core.features import FeatureNetwork, pick_device
from app.core.guard import make_statistics
from app.core.manifest import (
    CalibrationSpec,
    CountsSpec,
    DetectorSpec,
    LayerSpec,
    Manifest,
    ModelSpec,
    PreprocessingSpec,
    ProvenanceSpec,
    StatisticSpec,
)
from app.core.models import PRESETS, describe_architecture, file_sha256, load_model
from app.core.processing import (
    FeatureProcessing,
    fit_processing,
)
from app.core.statistics import (
    INDEXED_KINDS,
    ClassDensity,
    LayerIndex,
    fit_class_density,
    fit_doubt_gate,
)
from index_builder import detectors
from index_builder.config import BuildConfig, check_config
from index_builder.extract import (
    ChunkStore,
    ExtractionReport,
    Unreadable,
    check_fingerprint,
    extract_features,
)
from index_builder.sources import (
    Entry,
    ImageSource,
    SourceListing,
    open_source,
    source_reference,
)

WEIGHTS_FILE = "model.pth"
LABELS_FILE = "labels.npy"
SOURCES_FILE = "sources.json"
CALIBRATION_SCORES_FILE = "calibration_scores.npy"
HONEST_SCORES_FILE = "calibration_honest_scores.npy"
HONEST_CLASSES_FILE = "calibration_honest_classes.npy"
SKIPPED_FILE = "skipped.json"  # the unreadable images and why; written when there are any


@dataclass(frozen=True)
class BuildReport:
    bundle: Path
    manifest: Manifest
    extraction: list[ExtractionReport] = field(default_factory=list)
    seconds: float = 0.0
    unreadable: list[Unreadable] = field(default_factory=list)  # as in the bundle's skipped.json

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
        # at least one held out, and never the whole class: it must keep an indexed image
        take = min(max(1, math.floor(fraction * len(members) + 0.5)), len(members) - 1)
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
    second_pass: np.ndarray | None,
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
        second_pass=second_pass,
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
        np.ndarray | None,
    ],
    tuple[ChunkStore, ExtractionReport],
]


@dataclass(frozen=True)
class Plan:
    """Stage 0: what is built from what, before any image is read."""

    source: ImageSource
    classes: list[str]
    entries: list[Entry]
    network: FeatureNetwork
    statistics: list[StatisticSpec]
    combination: Combination
    weights_sha256: str
    work_dir: Path
    # --calibration-source, opened and listed once (its classes checked against the source's)
    calibration: tuple[ImageSource, SourceListing] | None = None

    @property
    def indexed_layers(self) -> list[str]:
        """Layers whose processed training features are indexed (votes, kNN distances)."""
        return _unique(s.layer for s in self.statistics if s.kind in INDEXED_KINDS)

    @property
    def density_layers(self) -> list[str]:
        return _unique(s.layer for s in self.statistics if s.kind == "mahalanobis")


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


@dataclass(frozen=True)
class Extracted:
    """Stage 1: features of the indexed images and of the calibration images."""

    store: ChunkStore
    reports: list[ExtractionReport]
    held_out: np.ndarray  # (positions,) bool: held out of the index (holdout calibration)
    index_labels: np.ndarray  # (indexed,) labels of the indexed rows, in index order
    cal_store: ChunkStore
    cal_select: np.ndarray  # (calibration positions,) bool
    cal_truth: np.ndarray  # (calibration rows,) true labels
    cal_predictions: np.ndarray  # (calibration rows,)
    cal_reference: np.ndarray  # (calibration rows,) bool: the p-values' reference part
    unreadable: list[Unreadable]  # the source's, then a separate calibration source's

    @property
    def indexed(self) -> np.ndarray:
        return ~self.held_out

    @property
    def correct(self) -> np.ndarray:
        correct: np.ndarray = self.cal_predictions == self.cal_truth
        return correct

    def cal_features(self, layers: Iterable[str]) -> dict[str, np.ndarray]:
        return {
            name: _gather(self.cal_store, f"features_{name}", self.cal_select) for name in layers
        }


@dataclass(frozen=True)
class FittedLayer:
    """Stage 2 (fit) and 3 (index): one layer's processing + index and/or class density."""

    name: str
    input_dim: int
    processing: FeatureProcessing | None = None
    index: Any = None
    density: ClassDensity | None = None

    def layer_index(self) -> LayerIndex:
        assert self.processing is not None and self.index is not None
        return LayerIndex(self.name, self.processing, self.index)


@dataclass(frozen=True)
class Calibrated:
    """Stage 4: the detector and its threshold from held-out authentic images."""

    statistics: list[StatisticSpec]  # the plan's, with every doubt_margin's gate fitted
    detector: Detector
    calibration: Calibration
    scores: np.ndarray  # combined scores of the correctly classified threshold-part images
    honest_scores: np.ndarray  # combined scores of every threshold-part image
    honest_classes: np.ndarray  # and each one's predicted class
    n_images: int
    n_correct: int
    accuracy: float
    reference_values: np.ndarray | None  # (n_ref, S) combined detectors only
    threshold_values: np.ndarray | None  # (n_thr_correct, S) combined detectors only


def build_bundle(
    config: BuildConfig,
    progress: bool = True,
    on_chunk_written: Callable[[int], None] | None = None,
    extractor: Extractor | None = None,
) -> BuildReport:
    """extract -> fit -> index -> calibrate -> write, each a named stage below."""
    started = time.perf_counter()
    check_config(config)
    plan = plan_build(config)
    extracted = extract_stage(config, plan, progress, on_chunk_written, extractor or _extract)
    fitted = {name: fit_layer(config, plan, extracted, name) for name in plan.network.layers}
    calibrated = calibrate_stage(config, plan, extracted, fitted)
    manifest = write_stage(config, plan, extracted, fitted, calibrated, started)
    if not config.keep_work_dir:
        shutil.rmtree(plan.work_dir, ignore_errors=True)
    seconds = time.perf_counter() - started
    return BuildReport(config.out, manifest, extracted.reports, seconds, extracted.unreadable)


def resolve_detector(
    config: BuildConfig, model: torch.nn.Module
) -> tuple[list[StatisticSpec], Combination, list[str]]:
    """The detector a build asks for: its statistics, combination and the layers they read
    (what every rank of a distributed build extracts)."""
    try:
        statistics, combination = detectors.resolve(
            config.detector,
            config.statistics,
            config.combination,
            config.layers,
            model,
            config.arch,
            config.class_k,
        )
    except ValueError as exc:  # an unknown preset, statistic or layer, a bad combination
        raise ConfigError(str(exc)) from exc
    return statistics, combination, _unique(layer for s in statistics for layer in s.reads)


def plan_build(config: BuildConfig) -> Plan:
    info = describe_architecture(config.arch)
    source = open_source(config.source, config.split)
    listing = source.listing(config.per_class_limit)
    calibration = None
    if config.calibration_source is not None:  # checked now, not after the main extraction
        calibration_source = open_source(config.calibration_source, config.calibration_split)
        calibration = (calibration_source, calibration_source.listing())
        _same_classes(listing.classes, calibration[1])
    if config.index_type == "ivf":  # faiss trains nlist centroids on the indexed images
        held_out = (
            0
            if config.calibration_source is not None
            else int(holdout_mask(listing.entries, config.holdout_fraction, config.seed).sum())
        )
        indexable = len(listing.entries) - held_out
        if config.nlist > indexable:
            raise ConfigError(
                f"--index ivf --nlist {config.nlist} needs as many indexed images; the source "
                f"has {indexable} outside the holdout: lower --nlist, or use --index flat"
            )
    model = load_model(config.arch, config.weights, len(listing.classes))
    statistics, combination, layers = resolve_detector(config, model)
    network = FeatureNetwork(model, layers, PRESETS[info.preset])
    network = network.to(pick_device(config.device)).eval()
    return Plan(
        source=source,
        classes=listing.classes,
        entries=listing.entries,
        network=network,
        statistics=statistics,
        combination=combination,
        weights_sha256=file_sha256(config.weights),
        work_dir=config.work_dir or config.out.with_name(config.out.name + ".work"),
        calibration=calibration,
    )


def _fingerprint(
    config: BuildConfig, plan: Plan, src: ImageSource, items: list[Entry]
) -> dict[str, object]:
    keys = hashlib.sha256("\n".join(e.key for e in items).encode()).hexdigest()
    return {
        "source": src.identity,
        "entries": len(items),
        "entries_sha256": keys,
        "content_sha256": src.content_stamp(items),
        "weights_sha256": plan.weights_sha256,
        "arch": config.arch,
        "layers": list(plan.network.layers),
        "chunk_size": config.chunk_size,
    }


def extract_stage(
    config: BuildConfig,
    plan: Plan,
    progress: bool,
    on_chunk_written: Callable[[int], None] | None,
    extract: Extractor,
) -> Extracted:
    """Features of every image; the calibration images are a per-class holdout of the source
    or a separate source, split again into the reference part and the threshold part."""
    entries = plan.entries
    fingerprint = _fingerprint(config, plan, plan.source, entries)
    store, main_report = extract(
        config,
        plan.network,
        plan.source,
        entries,
        plan.work_dir / "source",
        fingerprint,
        progress,
        on_chunk_written,
        second_pass_entries(config, entries),
    )
    labels_all = np.array([e.label for e in entries], dtype=np.int64)
    if config.calibration_source is None:
        cal = _held_out_calibration(config, store, entries, labels_all)
    else:
        cal = _separate_calibration(config, plan, progress, extract)
    held_out = np.zeros(len(entries), dtype=bool) if cal.held_out is None else cal.held_out
    reference = _reference_part(config, cal)
    extracted = Extracted(
        store=store,
        reports=[main_report, *cal.reports],
        held_out=held_out,
        index_labels=_select(store, labels_all, ~held_out),
        cal_store=cal.store,
        cal_select=cal.select,
        cal_truth=_select(cal.store, cal.labels, cal.select),
        cal_predictions=_gather(cal.store, "predictions", cal.select),
        cal_reference=_select(cal.store, reference, cal.select),
        unreadable=_unreadable(store, entries, cal),
    )
    if not extracted.correct.any():
        raise SourceError("no held-out image is classified correctly: cannot calibrate")
    _every_class_indexed(plan.classes, labels_all, held_out, extracted.index_labels)
    return extracted


def _unreadable(
    store: ChunkStore, entries: list[Entry], cal: CalibrationImages
) -> list[Unreadable]:
    """The images that could not be read, the source's then (when separate) the calibration
    source's, whose keys say so."""
    found = store.unreadable([e.key for e in entries])
    if cal.store is not store:
        found += [
            Unreadable(f"calibration:{u.image}", u.reason)
            for u in cal.store.unreadable([e.key for e in cal.entries])
        ]
    return found


def _every_class_indexed(
    classes: list[str], labels: np.ndarray, held_out: np.ndarray, indexed: np.ndarray
) -> None:
    """A class without an indexed image can never win the vote, and has no density to measure
    distances to: refuse such a bundle rather than write it (its images were all unreadable)."""
    counts = np.bincount(indexed, minlength=len(classes))
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        name = classes[int(missing[0])]
        listed = int(np.sum((labels == missing[0]) & ~held_out))
        more = f"; {missing.size - 1} more classes too" if missing.size > 1 else ""
        raise SourceError(
            f"class {name} has no readable image to index ({listed} listed outside the holdout, "
            f"all unreadable{more})"
        )


@dataclass(frozen=True)
class CalibrationImages:
    """Where the calibration images' features are: ``select`` marks them among ``store``'s
    images (``entries``, ``labels``); ``held_out`` marks the indexed source's images kept out of
    the index (None: a separate source, nothing held out); ``reports``: extractions made."""

    store: ChunkStore
    entries: list[Entry]
    labels: np.ndarray
    select: np.ndarray
    held_out: np.ndarray | None
    reports: list[ExtractionReport]


# The message of a holdout too small for both calibration parts (fit_gates may meet it first).
TOO_FEW_TO_SPLIT = "too few held-out images to split into reference and threshold"


def second_pass_entries(config: BuildConfig, entries: list[Entry]) -> np.ndarray:
    """The source's images whose second passes are computed, where the detector reads
    ``flip.logits``, ``median.logits`` or ``jpeg.logits``: the held-out ones, and none when
    calibration has a source of its own (whose images all get them). Only calibration reads
    those logits (the margin statistics fit nothing on the indexed images), and skipping them
    spares a second forward pass over the whole training set (ILSVRC's 1.28M images)."""
    if config.calibration_source is not None:
        return np.zeros(len(entries), dtype=bool)
    return holdout_mask(entries, config.holdout_fraction, config.seed)


def _held_out_calibration(
    config: BuildConfig, store: ChunkStore, entries: list[Entry], labels: np.ndarray
) -> CalibrationImages:
    """A per-class holdout of the indexed source (hashed, so a rebuild holds out the same)."""
    held_out = holdout_mask(entries, config.holdout_fraction, config.seed)
    if not held_out.any():
        raise SourceError("the holdout is empty: too few images per class to calibrate")
    return CalibrationImages(store, entries, labels, held_out, held_out, [])


def _separate_calibration(
    config: BuildConfig, plan: Plan, progress: bool, extract: Extractor
) -> CalibrationImages:
    """Every image of ``--calibration-source``, which must have the indexed source's classes."""
    assert plan.calibration is not None  # plan_build listed it
    source, listing = plan.calibration
    entries = listing.entries
    store, report = extract(
        config,
        plan.network,
        source,
        entries,
        plan.work_dir / "calibration",
        _fingerprint(config, plan, source, entries),
        progress,
        None,
        None,
    )
    labels = np.array([e.label for e in entries], dtype=np.int64)
    return CalibrationImages(store, entries, labels, np.ones(len(entries), bool), None, [report])


def _same_classes(classes: list[str], listing: SourceListing) -> None:
    """The calibration source must have the indexed source's classes (the labels are their
    positions), or the build is refused, naming the first classes that differ."""
    if listing.classes != classes:
        missing = sorted(set(classes) - set(listing.classes))[:3]
        extra = sorted(set(listing.classes) - set(classes))[:3]
        raise SourceError(
            f"the calibration source's classes differ from the indexed source's (missing: "
            f"{', '.join(missing) or 'none'}; not indexed: {', '.join(extra) or 'none'})"
        )


def _reference_part(config: BuildConfig, cal: CalibrationImages) -> np.ndarray:
    """The p-values' reference part: half of each class's calibration images (hashed with
    another salt than the holdout's), by position among ``cal.store``'s images; the other half
    sets the threshold."""
    chosen = [e for e, picked in zip(cal.entries, cal.select, strict=True) if picked]
    reference = holdout_mask(chosen, 0.5, config.seed + 1)
    by_position = np.zeros(len(cal.entries), dtype=bool)
    by_position[np.flatnonzero(cal.select)[reference]] = True
    return by_position


def fit_layer(config: BuildConfig, plan: Plan, extracted: Extracted, name: str) -> FittedLayer:
    """Fitted on the indexed training features only: the processing and index where a vote or
    a kNN distance reads the layer, the class means and tied covariance where Mahalanobis does."""
    store, indexed = extracted.store, extracted.indexed
    input_dim = next(rows.shape[1] for _, rows in _rows(store, name, indexed))
    density = None
    if name in plan.density_layers:
        labelled = _labelled_rows(store, name, indexed, extracted.index_labels)
        density = fit_class_density(labelled, len(plan.classes), input_dim)
    if name not in plan.indexed_layers:
        return FittedLayer(name, input_dim, density=density)
    processing = fit_processing(
        config.processing,
        (rows for _, rows in _rows(store, name, indexed)),
        input_dim,
        config.pca_dims,
    )
    training_sample = None
    if config.index_type == "ivf":
        sample = np.concatenate([processing.apply(r) for _, r in _rows(store, name, indexed)])
        rng = np.random.default_rng(config.seed)
        training_sample = sample[rng.permutation(len(sample))[: config.nlist * 64]]
    index = search.new_index(
        processing.output_dim, config.index_type, config.nlist, training_sample
    )
    search.add_vectors(index, (processing.apply(rows) for _, rows in _rows(store, name, indexed)))
    if config.index_type == "ivf":
        search.set_nprobe(index, config.nprobe)
    if extracted.index_labels.shape[0] != search.index_size(index):
        raise AssertionError("index rows and labels are out of step")
    return FittedLayer(name, input_dim, processing, index, density)


def _labelled_rows(
    store: ChunkStore, name: str, indexed: np.ndarray, index_labels: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(feature rows, their labels) per chunk: index rows follow chunk order."""
    offset = 0
    for _, rows in _rows(store, name, indexed):
        yield rows, index_labels[offset : offset + rows.shape[0]]
        offset += rows.shape[0]


def calibrate_stage(
    config: BuildConfig, plan: Plan, extracted: Extracted, fitted: dict[str, FittedLayer]
) -> Calibrated:
    """The paper's single statistic is thresholded on every correctly classified held-out image.
    A combined detector's p-values are referenced to one part of them and its threshold comes
    from the other, so the retention it advertises is measured on images it never saw."""
    specs = fit_gates(plan.statistics, extracted)
    statistics = make_statistics(
        specs,
        lambda name: fitted[name].layer_index(),
        lambda name: _density(fitted[name]),
        extracted.index_labels,
        config.k,
        config.score_function,
        len(plan.classes),
    )
    read = extracted.cal_features(_unique(layer for spec in specs for layer in spec.reads))
    values = np.stack([s.values(read, extracted.cal_predictions) for s in statistics], axis=1)
    correct = extracted.correct
    if plan.combination == "single":
        detector = Detector(statistics)
        threshold_part = np.ones(correct.shape, dtype=bool)
        reference_values = threshold_values = None
    else:
        reference = extracted.cal_reference
        threshold_part = ~reference
        if not (reference & correct).any() or not (threshold_part & correct).any():
            raise SourceError(TOO_FEW_TO_SPLIT)
        reference_values = values[reference & correct]
        threshold_values = values[threshold_part & correct]
        detector = Detector(statistics, plan.combination, reference_values)
    honest_scores = detector.combine(values[threshold_part])
    scores = honest_scores[correct[threshold_part]]
    calibration = calibrate(scores)
    if retention_key(config.retention) not in calibration.thresholds:
        raise ValueError(f"retention must be one of {sorted(calibration.thresholds)}")
    return Calibrated(
        statistics=specs,
        detector=detector,
        calibration=calibration,
        scores=scores,
        honest_scores=honest_scores,
        honest_classes=extracted.cal_predictions[threshold_part],
        n_images=int(threshold_part.sum()),
        n_correct=int(scores.size),
        accuracy=float(correct[threshold_part].mean()),
        reference_values=reference_values,
        threshold_values=threshold_values,
    )


def fit_gates(specs: list[StatisticSpec], extracted: Extracted) -> list[StatisticSpec]:
    """The statistics with each ``doubt_margin``'s gate fitted on the first-pass logits of the
    reference part's correctly classified images (``DOUBTED_SHARE`` of them fall below it)."""
    fitted = []
    for spec in specs:
        if spec.kind == "doubt_margin" and spec.gate is None:
            assert spec.first_logits is not None  # detectors.parse_statistics sets it
            logits = extracted.cal_features([spec.first_logits])[spec.first_logits]
            authentic = logits[extracted.cal_reference & extracted.correct]
            if authentic.shape[0] == 0:  # the same failure the reference part meets below
                raise SourceError(TOO_FEW_TO_SPLIT)
            spec = spec.model_copy(update={"gate": fit_doubt_gate(authentic)})
        fitted.append(spec)
    return fitted


def _density(layer: FittedLayer) -> ClassDensity:
    assert layer.density is not None
    return layer.density


def _layer_spec(config: BuildConfig, layer: FittedLayer) -> LayerSpec:
    safe = layer.name.replace(".", "_")
    indexed = layer.index is not None
    assert layer.processing is not None or not indexed
    return LayerSpec(
        name=layer.name,
        input_dim=layer.input_dim,
        processing=config.processing if indexed else "none",
        output_dim=layer.processing.output_dim if layer.processing is not None else layer.input_dim,
        processing_file=f"processing_{safe}.npz" if indexed else None,
        index_file=f"index_{safe}.faiss" if indexed else None,
        index_type=config.index_type,
        nlist=config.nlist if indexed and config.index_type == "ivf" else None,
        nprobe=config.nprobe if indexed and config.index_type == "ivf" else None,
        class_density_file=f"class_density_{safe}.npz" if layer.density is not None else None,
    )


def _write_layer(staging: Path, spec: LayerSpec, layer: FittedLayer) -> list[str]:
    written = []
    if spec.processing_file is not None and layer.processing is not None:
        layer.processing.save(staging / spec.processing_file)
        search.save_index(layer.index, staging / str(spec.index_file))
        written += [spec.processing_file, str(spec.index_file)]
    if spec.class_density_file is not None and layer.density is not None:
        layer.density.save(staging / spec.class_density_file)
        written.append(spec.class_density_file)
    return written


def write_stage(
    config: BuildConfig,
    plan: Plan,
    extracted: Extracted,
    fitted: dict[str, FittedLayer],
    calibrated: Calibrated,
    started: float,
) -> Manifest:
    """Every file into a staging directory, checksummed into the manifest, then one rename."""
    out = config.out
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copyfile(config.weights, staging / WEIGHTS_FILE)
    layer_specs = [_layer_spec(config, fitted[name]) for name in plan.network.layers]
    file_names = [
        WEIGHTS_FILE,
        LABELS_FILE,
        SOURCES_FILE,
        CALIBRATION_SCORES_FILE,
        HONEST_SCORES_FILE,
        HONEST_CLASSES_FILE,
    ]
    for spec in layer_specs:
        file_names += _write_layer(staging, spec, fitted[spec.name])
    np.save(staging / LABELS_FILE, extracted.index_labels.astype(np.int32))
    (staging / SOURCES_FILE).write_text(
        json.dumps(index_sources(plan.entries, extracted, config.split)) + "\n"
    )
    np.save(staging / CALIBRATION_SCORES_FILE, calibrated.scores.astype(np.float32))
    np.save(staging / HONEST_SCORES_FILE, calibrated.honest_scores.astype(np.float32))
    np.save(staging / HONEST_CLASSES_FILE, calibrated.honest_classes.astype(np.int32))
    statistics_files: dict[str, str | None] = {"reference": None, "threshold": None}
    for part, values in (
        ("reference", calibrated.reference_values),
        ("threshold", calibrated.threshold_values),
    ):
        if values is not None:
            statistics_files[part] = f"{part}_statistics.npy"
            np.save(staging / f"{part}_statistics.npy", values.astype(np.float64))
            file_names.append(f"{part}_statistics.npy")
    if extracted.unreadable:
        rows = ",\n".join(json.dumps(asdict(u)) for u in extracted.unreadable)
        (staging / SKIPPED_FILE).write_text(f"[\n{rows}\n]\n")  # one image a line
        file_names.append(SKIPPED_FILE)
    if config.license_file is not None:
        shutil.copyfile(config.license_file, staging / config.license_file.name)
        file_names.append(config.license_file.name)
    files = {name: file_sha256(staging / name) for name in file_names}
    manifest = _manifest(
        config, plan, extracted, calibrated, layer_specs, files, statistics_files, started
    )
    write_manifest(staging, manifest)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return manifest


def _model_spec(config: BuildConfig, num_classes: int, weights_sha256: str) -> ModelSpec:
    info = describe_architecture(config.arch)
    preset = PRESETS[info.preset]
    return ModelSpec(
        arch=config.arch,
        family=info.family,
        num_classes=num_classes,
        weights_file=WEIGHTS_FILE,
        weights_sha256=weights_sha256,
        preprocessing=PreprocessingSpec(
            preset=preset.name,
            resize=preset.resize,
            crop=preset.crop,
            mean=preset.mean,
            std=preset.std,
        ),
    )


def _calibration_spec(
    config: BuildConfig, calibrated: Calibrated, statistics_files: dict[str, str | None]
) -> CalibrationSpec:
    calibration = calibrated.calibration
    from_holdout = config.calibration_source is None
    return CalibrationSpec(
        source="holdout" if from_holdout else "directory",
        holdout_fraction=config.holdout_fraction if from_holdout else None,
        n_images=calibrated.n_images,
        n_correct=calibrated.n_correct,
        accuracy=calibrated.accuracy,
        mean=calibration.mean,
        std=calibration.std,
        quantiles=calibration.quantiles,
        thresholds=calibration.thresholds,
        operating_retention=config.retention,
        threshold=calibration.thresholds[retention_key(config.retention)],
        scores_file=CALIBRATION_SCORES_FILE,
        honest_scores_file=HONEST_SCORES_FILE,
        honest_classes_file=HONEST_CLASSES_FILE,
        reference_statistics_file=statistics_files["reference"],
        threshold_statistics_file=statistics_files["threshold"],
        n_reference=None
        if calibrated.reference_values is None
        else int(calibrated.reference_values.shape[0]),
    )


def _provenance_spec(config: BuildConfig, plan: Plan, started: float) -> ProvenanceSpec:
    return ProvenanceSpec(
        source=plan.source.description,
        split=config.split,
        calibration_source=str(config.calibration_source) if config.calibration_source else None,
        per_class_limit=config.per_class_limit,
        seed=config.seed,
        built_at=datetime.now(UTC).isoformat(timespec="seconds"),
        build_seconds=round(time.perf_counter() - started, 2),
        software=_software(),
    )


def _manifest(
    config: BuildConfig,
    plan: Plan,
    extracted: Extracted,
    calibrated: Calibrated,
    layer_specs: list[LayerSpec],
    files: dict[str, str],
    statistics_files: dict[str, str | None],
    started: float,
) -> Manifest:
    """The bundle's manifest: the model, the detector, the counts, the calibration and where
    it all came from, with every file's checksum (``files``)."""
    num_classes = len(plan.classes)
    per_class = np.bincount(extracted.index_labels, minlength=num_classes).tolist()
    return Manifest(
        name=config.name or config.out.name,
        model=_model_spec(config, num_classes, files[WEIGHTS_FILE]),
        detector=DetectorSpec(
            layers=layer_specs,
            k=config.k,
            score_function=config.score_function,
            combination=plan.combination,
            labels_file=LABELS_FILE,
            sources_file=SOURCES_FILE,
            statistics=calibrated.statistics,
        ),
        class_names=plan.classes,
        counts=CountsSpec(
            classes=num_classes,
            indexed=int(extracted.index_labels.shape[0]),
            holdout=_readable_held_out(extracted),
            skipped=_count_skipped(extracted),
            indexed_per_class=[int(v) for v in per_class],
        ),
        calibration=_calibration_spec(config, calibrated, statistics_files),
        provenance=_provenance_spec(config, plan, started),
        files=files,
    )


def index_sources(entries: list[Entry], extracted: Extracted, split: str | None) -> list[str]:
    """Row i of the index -> its image's source reference: the indexed, decoded positions in
    chunk order, exactly as the index rows and labels were selected."""
    positions = _select(extracted.store, np.arange(len(entries)), extracted.indexed)
    return [source_reference(entries[int(p)], split) for p in positions]


def _readable_held_out(extracted: Extracted) -> int:
    """Held-out images that were read (and calibrate): like ``indexed``, unreadable ones are
    counted under ``skipped`` only. 0 with a separate calibration source."""
    return int(extracted.cal_truth.size) if extracted.held_out.any() else 0


def _count_skipped(extracted: Extracted) -> int:
    """Unreadable images of the indexed source and, when separate, the calibration source."""
    return len(extracted.unreadable)
