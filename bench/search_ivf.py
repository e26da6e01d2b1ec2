"""Exact flat search against IVF at ILSVRC scale (1.28M x 256, k = 1000) on realistic features.

The question: how much faster is IVF-Flat (``nlist`` inverted lists, ``nprobe`` of them searched)
than the exact flat index on CPU, and how often does the approximate search change the guard's
verdict (accepted or rejected at the default threshold)? Both depend on how the data cluster, so
the index holds features that resemble real ones rather than Gaussian blobs:

1. real pooled features (layer3 GAP, 64-d) of the CIFAR-10 ResNet-56 over the CIFAR-10 train set,
   read from an evaluation bundle that indexes them unprocessed (``.cache/evaluation/bundles``,
   processing ``none``) or else extracted with the project's feature network;
2. tiled to ``--n`` rows: tile t of train image i is its feature plus Gaussian jitter of
   ``--noise`` times the feature's per-dimension std (a slightly different view of the image),
   keeping the label;
3. lifted to 256-d by one fixed random ReLU layer (random linear map, bias, ReLU). A linear map
   alone gives rank-64 data: the 192 directions pca_whiten would then scale up to unit variance
   are pure tile noise that no query has, so queries would sit off the data. The ReLU lift keeps
   the features full-rank, non-negative (like pooled post-ReLU activations) and keeps clean test
   features on the same manifold as the jittered training ones;
4. processed as the builder does it: pca_whiten to 256 fitted on the indexed features, IVF
   trained on ``nlist * 64`` random processed rows, all through ``app.core``.

Queries are CIFAR-10 test images (a seeded random subset): their ResNet-56 features, lifted and
processed the same way, scored for the class the ResNet-56 predicts by the project's DW-kNN vote
(``app.core.statistics.KnnVote``, the paper's detector). The threshold keeps 98% of the
exact-search scores of the correctly classified queries (``threshold_for_retention``); a query's
verdict is accepted when score >= threshold.

All indexes are built first (flat and one IVF per nlist: one 1.3 GB copy of the rows each),
every query is scored once per configuration, then the timing runs in interleaved rounds (each
round times every configuration), so that load from other jobs, which drifts over minutes,
falls on all configurations alike. Reported per configuration: k-means train and add seconds,
ms per query at batch 64 (one detector call: processing + search + scoring, over 64; median of
the timed batches), speed-up over flat, recall@k against exact search on the first
``--recall-queries`` queries, share of verdicts that differ from exact search, and the mean
|score difference|. The recommended default is the fastest
IVF configuration whose verdict disagreement is at most ``--max-disagreement`` (0.5%).

Usage: python -m bench.search_ivf [--n 1281167] [--nlist 1024 4096] [--nprobe 8 16 ... 512]
Smoke run (about a minute): python -m bench.search_ivf --n 50000 --nlist 64 --nprobe 4 8
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.cli import at_least
from app.core import search
from app.core.calibration import DEFAULT_RETENTION, RETENTIONS, threshold_for_retention
from app.core.features import FeatureNetwork, infer_in_batches
from app.core.models import PRESETS, file_sha256, load_model
from app.core.processing import FeatureProcessing, fit_processing
from app.core.statistics import KnnVote, LayerIndex
from bench.common import REPO, SHARED, write_results
from evaluation.data import load_split
from evaluation.metrics import auroc

Log = Callable[[str], None]

ARCH = "resnet56"
LAYER = "layer3"
ILSVRC_TRAIN_IMAGES = 1_281_167
DEFAULT_SOURCE = SHARED / "data" / "cifar10-jpeg.tar.gz"
DEFAULT_WEIGHTS = SHARED / "models" / "resnet56-4bfd9763.th"
EVALUATION_CACHE = REPO / ".cache" / "evaluation"
TRAINING_ROWS_PER_LIST = 64  # as index_builder.build: IVF k-means on nlist * 64 rows


# --------------------------------------------------------------------------- real features


@dataclass(frozen=True)
class RealFeatures:
    """Raw (unprocessed) pooled features: the indexed train images and the test queries."""

    train: np.ndarray  # (m, d) float32
    train_labels: np.ndarray  # (m,) int64
    queries: np.ndarray  # (q, d) float32
    query_predictions: np.ndarray  # (q,) int64, the CNN's predicted class
    query_labels: np.ndarray  # (q,) int64, the true class
    origin: str  # where the train features came from


def find_raw_bundle(bundles_root: Path, weights_sha256: str, layer: str) -> Path | None:
    """A bundle of these weights that indexes ``layer`` unprocessed in a flat index, if any."""
    for manifest_path in sorted(bundles_root.glob("**/manifest.json")):
        try:
            manifest = json.loads(manifest_path.read_text())
            layers = manifest["detector"]["layers"]
            wanted = (
                manifest["model"]["weights_sha256"] == weights_sha256
                and len(layers) == 1
                and layers[0]["name"] == layer
                and layers[0]["processing"] == "none"
                and layers[0]["index_type"] == "flat"
            )
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue
        if wanted:
            return manifest_path.parent
    return None


def _network_features(network: FeatureNetwork, pixels: torch.Tensor) -> tuple[np.ndarray, ...]:
    batch = infer_in_batches(network, pixels)
    features = batch.features[network.layers[0]]
    return features.astype(np.float32), batch.predictions.astype(np.int64)


def load_real_features(
    source: Path,
    weights: Path,
    bundles_root: Path,
    cache_dir: Path,
    n_queries: int,
    seed: int,
    log: Log,
) -> RealFeatures:
    preset = PRESETS["cifar"]
    test = load_split(source, "test", preset, cache_dir)
    model = load_model(ARCH, weights, len(test.classes))
    network = FeatureNetwork(model, [LAYER], preset).eval()
    bundle = find_raw_bundle(bundles_root, file_sha256(weights), LAYER)
    if bundle is not None:
        index = search.load_index(bundle / f"index_{LAYER}.faiss")
        train = search.stored_vectors(index)
        train_labels = np.load(bundle / "labels.npy").astype(np.int64)
        origin = f"raw {LAYER} features indexed by {bundle.relative_to(bundles_root.parent)}"
        del index
    else:
        log(f"no unprocessed {ARCH} {LAYER} bundle under {bundles_root}: extracting train features")
        split = load_split(source, "train", preset, cache_dir)
        train, _ = _network_features(network, split.tensor(np.arange(split.labels.shape[0])))
        train_labels = split.labels
        origin = f"{LAYER} features of {source.name} train extracted by the ResNet-56"
    if train.shape[0] != train_labels.shape[0]:
        raise ValueError("train features and labels are out of step")
    rng = np.random.default_rng(seed)
    n_queries = min(n_queries, test.labels.shape[0])
    rows = np.sort(rng.choice(test.labels.shape[0], n_queries, replace=False))
    queries, predictions = _network_features(network, test.tensor(rows))
    return RealFeatures(train, train_labels, queries, predictions, test.labels[rows], origin)


# --------------------------------------------------------------------------- scaled data set


@dataclass(frozen=True)
class Lift:
    """A fixed random ReLU layer d_in -> d_out, and the per-dimension jitter of the tiles."""

    weights: np.ndarray  # (d_in, d_out) float32
    bias: np.ndarray  # (d_out,) float32
    jitter: np.ndarray  # (d_in,) float32, noise std per input dimension

    @classmethod
    def fit(cls, train: np.ndarray, dim: int, noise: float, seed: int) -> Lift:
        rng = np.random.default_rng(seed)
        d_in = train.shape[1]
        weights = rng.normal(0.0, 1.0 / math.sqrt(d_in), (d_in, dim)).astype(np.float32)
        bias = -(train.astype(np.float64) @ weights).mean(axis=0)  # each unit on about half
        jitter = noise * train.astype(np.float64).std(axis=0)
        return cls(weights, bias.astype(np.float32), jitter.astype(np.float32))

    def apply(self, features: np.ndarray) -> np.ndarray:
        lifted = np.maximum(features.astype(np.float32) @ self.weights + self.bias, 0.0)
        return np.ascontiguousarray(lifted, dtype=np.float32)

    def tile(self, train: np.ndarray, tile_index: int, seed: int) -> np.ndarray:
        """Tile ``tile_index`` of the train features: jittered, lifted; the same on every call."""
        rng = np.random.default_rng([seed, tile_index])
        noise = rng.standard_normal(train.shape, dtype=np.float32) * self.jitter
        return self.apply(train + noise)


@dataclass(frozen=True)
class ScaledSet:
    """``n`` lifted, jittered copies of the train features (tile after tile) and their labels."""

    train: np.ndarray  # (m, d_in) train features in a fixed shuffled order
    labels: np.ndarray  # (n,) int64
    lift: Lift
    n: int
    seed: int

    @classmethod
    def make(cls, real: RealFeatures, n: int, dim: int, noise: float, seed: int) -> ScaledSet:
        # Shuffled once, so a partial last tile (any n) is a random, class-balanced subset.
        order = np.random.default_rng(seed).permutation(real.train.shape[0])
        train = np.ascontiguousarray(real.train[order], dtype=np.float32)
        tiles = math.ceil(n / train.shape[0])
        labels = np.tile(real.train_labels[order], tiles)[:n].astype(np.int64)
        return cls(train, labels, Lift.fit(train, dim, noise, seed), n, seed)

    def chunks(self) -> Iterator[np.ndarray]:
        """The lifted rows, one tile at a time (regenerated identically on every pass)."""
        m = self.train.shape[0]
        for tile_index in range(math.ceil(self.n / m)):
            rows = min(m, self.n - tile_index * m)
            yield self.lift.tile(self.train[:rows], tile_index, self.seed)


def processed_base(scaled: ScaledSet, pca_dims: int) -> tuple[FeatureProcessing, np.ndarray]:
    """pca_whiten fitted on the indexed rows (as the builder), and the processed (n, d) rows."""
    dim = scaled.lift.weights.shape[1]
    processing = fit_processing("pca_whiten", scaled.chunks(), dim, pca_dims)
    base = np.empty((scaled.n, processing.output_dim), dtype=np.float32)
    start = 0
    for chunk in scaled.chunks():
        base[start : start + chunk.shape[0]] = processing.apply(chunk)
        start += chunk.shape[0]
    return processing, base


def _row_chunks(base: np.ndarray, rows: int = 65_536) -> Iterator[np.ndarray]:
    for start in range(0, base.shape[0], rows):
        yield base[start : start + rows]


# --------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class Config:
    """One searchable configuration: the DW-kNN vote over an index, and the nprobe it searches
    with."""

    name: str
    detector: KnnVote
    nlist: int | None = None  # None: exact flat
    nprobe: int | None = None
    train_s: float = 0.0
    build_s: float = 0.0

    def activate(self) -> KnnVote:
        if self.nprobe is not None:
            search.set_nprobe(self.detector.layer.index, self.nprobe)
        return self.detector


@dataclass(frozen=True)
class Measured:
    scores: np.ndarray  # (q,) detector scores of the predicted classes
    ids: np.ndarray  # (r, k) neighbours of the first r queries, -1 where missing


def measure(
    config: Config, queries: np.ndarray, classes: np.ndarray, batch: int, recall_queries: int
) -> Measured:
    """Scores every query through the detector (in batches, as the service does), then searches
    the first ``recall_queries`` once more for their neighbour ids."""
    detector = config.activate()
    scores = np.concatenate(
        [
            detector.values(
                {detector.layer_name: queries[start : start + batch]},
                classes[start : start + batch],
            )
            for start in range(0, queries.shape[0], batch)
        ]
    )
    subset = detector.layer.processing.apply(queries[:recall_queries])
    ids = search.search(detector.layer.index, subset, detector.k).ids
    return Measured(scores, ids)


def time_configs(
    configs: Sequence[Config],
    queries: np.ndarray,
    classes: np.ndarray,
    batch: int,
    rounds: int,
    batches_per_round: int,
) -> dict[str, list[float]]:
    """Seconds per detector call on full batches, interleaved: each round visits every config
    once (in a rotated order) for ``batches_per_round`` batches, so that load from other jobs,
    which drifts over minutes, falls on every config alike."""
    full = queries.shape[0] // batch
    if full == 0:
        raise ValueError(f"need at least one full batch of {batch} queries")
    seconds: dict[str, list[float]] = {c.name: [] for c in configs}
    visit = 0
    for r in range(rounds):
        shift = r % len(configs)
        for config in [*configs[shift:], *configs[:shift]]:
            detector = config.activate()
            for _ in range(batches_per_round):
                start = (visit % full) * batch
                visit += 1
                rows = slice(start, start + batch)
                started = time.perf_counter()
                detector.values({detector.layer_name: queries[rows]}, classes[rows])
                seconds[config.name].append(time.perf_counter() - started)
    return seconds


def recall_at_k(exact_ids: np.ndarray, approx_ids: np.ndarray) -> float:
    """Mean share of each query's exact neighbours that the approximate search also returned."""
    if exact_ids.shape[0] != approx_ids.shape[0]:
        raise ValueError("need the same queries on both sides")
    shares = []
    for exact, approx in zip(exact_ids, approx_ids, strict=True):
        truth = exact[exact >= 0]
        if truth.size:
            shares.append(np.isin(truth, approx[approx >= 0]).mean())
    return float(np.mean(shares)) if shares else 1.0


@dataclass(frozen=True)
class VerdictComparison:
    threshold: float
    disagreement: float  # share of queries whose verdict differs from exact search
    newly_rejected: int  # accepted with exact search, rejected with the approximate one
    newly_accepted: int  # rejected with exact search, accepted with the approximate one
    mean_abs_score_difference: float
    max_abs_score_difference: float


def compare_verdicts(
    exact_scores: np.ndarray, approx_scores: np.ndarray, threshold: float
) -> VerdictComparison:
    """Verdicts (accepted when score >= threshold, as the guard decides) of two score sets."""
    if exact_scores.shape != approx_scores.shape or exact_scores.ndim != 1:
        raise ValueError("need two (n,) score arrays of the same queries")
    if exact_scores.size == 0:
        raise ValueError("no scores to compare")
    exact_ok = exact_scores >= threshold
    approx_ok = approx_scores >= threshold
    difference = np.abs(exact_scores.astype(np.float64) - approx_scores.astype(np.float64))
    return VerdictComparison(
        threshold=float(threshold),
        disagreement=float(np.mean(exact_ok != approx_ok)),
        newly_rejected=int(np.sum(exact_ok & ~approx_ok)),
        newly_accepted=int(np.sum(~exact_ok & approx_ok)),
        mean_abs_score_difference=float(difference.mean()),
        max_abs_score_difference=float(difference.max()),
    )


# --------------------------------------------------------------------------- the benchmark


@dataclass(frozen=True)
class Settings:
    n: int = ILSVRC_TRAIN_IMAGES
    dim: int = 256
    k: int = 1000
    nlists: tuple[int, ...] = (1024, 4096)
    nprobes: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)
    batch: int = 64
    recall_queries: int = 500
    noise: float = 0.15
    seed: int = 0
    retention: float = DEFAULT_RETENTION
    max_disagreement: float = 0.005
    rounds: int = 5  # interleaved timing rounds
    batches_per_round: int = 2


def _row(
    config: Config,
    measured: Measured,
    exact: Measured,
    seconds: list[float],
    flat_seconds: list[float],
    thresholds: dict[str, float],
    settings: Settings,
) -> dict[str, Any]:
    per_query_ms = 1000.0 * np.asarray(seconds) / settings.batch
    flat_ms = 1000.0 * float(np.median(flat_seconds)) / settings.batch
    operating = compare_verdicts(
        exact.scores, measured.scores, thresholds[f"{settings.retention:.2f}"]
    )
    return {
        "config": config.name,
        "index": "flat" if config.nlist is None else "ivf",
        "nlist": config.nlist,
        "nprobe": config.nprobe,
        "train_s": config.train_s,
        "build_s": config.build_s,
        "ms_per_query_median": float(np.median(per_query_ms)),
        "ms_per_query_best": float(np.min(per_query_ms)),
        "ms_per_query_worst": float(np.max(per_query_ms)),
        "speedup_vs_flat": flat_ms / float(np.median(per_query_ms)),
        "timed_batches": len(seconds),
        f"recall_at_{settings.k}": recall_at_k(exact.ids, measured.ids),
        "short_results_share": float(np.mean((measured.ids < 0).any(axis=1))),
        **{key: value for key, value in vars(operating).items() if key != "threshold"},
        "disagreement_by_retention": {
            key: compare_verdicts(exact.scores, measured.scores, t).disagreement
            for key, t in thresholds.items()
        },
    }


def build_configs(
    processing: FeatureProcessing,
    base: np.ndarray,
    labels: np.ndarray,
    settings: Settings,
    log: Log,
) -> list[Config]:
    """The flat index and one IVF index per nlist (each holds a copy of ``base``), built as the
    builder builds them; one Config per (index, nprobe), flat first."""
    dim = processing.output_dim
    t0 = time.perf_counter()
    flat = search.new_index(dim, "flat")
    search.add_vectors(flat, _row_chunks(base))
    flat_detector = KnnVote(LayerIndex(LAYER, processing, flat), labels, settings.k, "dwknn")
    configs = [Config("flat", flat_detector, build_s=time.perf_counter() - t0)]
    for nlist in settings.nlists:
        probes = [p for p in settings.nprobes if p <= nlist]
        if len(probes) < len(settings.nprobes):
            log(f"nlist {nlist}: skipping nprobe > nlist")
        if not probes:
            continue
        rng = np.random.default_rng(settings.seed)  # the builder's sample: nlist * 64 rows
        sample_rows = rng.permutation(base.shape[0])[: nlist * TRAINING_ROWS_PER_LIST]
        sample = base[np.sort(sample_rows)]
        t0 = time.perf_counter()
        index = search.new_index(dim, "ivf", nlist, sample)
        train_s = time.perf_counter() - t0
        del sample
        t0 = time.perf_counter()
        search.add_vectors(index, _row_chunks(base))
        build_s = time.perf_counter() - t0
        log(f"ivf nlist {nlist}: trained in {train_s:.0f}s, filled in {build_s:.0f}s")
        detector = KnnVote(LayerIndex(LAYER, processing, index), labels, settings.k, "dwknn")
        configs += [
            Config(f"ivf{nlist},nprobe={p}", detector, nlist, p, train_s, build_s) for p in probes
        ]
    return configs


def _processed_configs(
    scaled: ScaledSet, settings: Settings, started: float, log: Log
) -> tuple[list[Config], tuple[int, int]]:
    """Every configuration built on the processed rows, and their shape (rows, dim); the rows
    are freed once the indexes hold their own copies, since at ILSVRC scale one more 1.3 GB
    copy is what the machine may not have."""
    processing, base = processed_base(scaled, settings.dim)
    indexed, dim = base.shape
    log(f"data: {indexed:,} x {dim} processed in {time.perf_counter() - started:.0f}s")
    configs = build_configs(processing, base, scaled.labels, settings, log)
    del base  # the indexes hold their own copies
    gc.collect()
    return configs, (indexed, dim)


def _score_configs(
    configs: Sequence[Config],
    queries: np.ndarray,
    classes: np.ndarray,
    settings: Settings,
    log: Log,
) -> dict[str, Measured]:
    """Every query scored once per configuration, untimed: the scores and neighbours the
    verdicts and recall are compared on (and a full pass that warms every index before the
    timing)."""
    measured: dict[str, Measured] = {}
    for config in configs:
        t0 = time.perf_counter()
        measured[config.name] = measure(
            config, queries, classes, settings.batch, settings.recall_queries
        )
        log(f"{config.name}: {queries.shape[0]} queries scored in {time.perf_counter() - t0:.0f}s")
    return measured


def _thresholds(correct_scores: np.ndarray, retention: float) -> dict[str, float]:
    """The threshold at each retention (keyed ``"0.98"``), from the exact-search scores of the
    correctly classified queries: the verdicts are compared at the operating point and at the
    others a bundle may be calibrated for."""
    return {
        f"{r:.2f}": threshold_for_retention(correct_scores, r)
        for r in sorted({*RETENTIONS, retention})
    }


def _timed_rows(
    configs: Sequence[Config],
    measured: dict[str, Measured],
    queries: np.ndarray,
    classes: np.ndarray,
    thresholds: dict[str, float],
    settings: Settings,
    log: Log,
) -> list[dict[str, Any]]:
    """One row per configuration: its timing (interleaved rounds) beside its agreement with
    exact search; each row logged, so that a long run shows its results as they come."""
    t0 = time.perf_counter()
    seconds = time_configs(
        configs, queries, classes, settings.batch, settings.rounds, settings.batches_per_round
    )
    log(f"timed {settings.rounds} interleaved rounds in {time.perf_counter() - t0:.0f}s")
    exact = measured["flat"]
    rows = [
        _row(c, measured[c.name], exact, seconds[c.name], seconds["flat"], thresholds, settings)
        for c in configs
    ]
    for row in rows:
        log(
            f"{row['config']}: {row['ms_per_query_median']:.2f} ms/query, "
            f"recall {row[f'recall_at_{settings.k}']:.3f}, "
            f"verdicts differ {100 * row['disagreement']:.2f}%"
        )
    return rows


def _recommended(rows: list[dict[str, Any]], max_disagreement: float) -> str | None:
    """The fastest IVF configuration whose verdicts differ from exact search on at most
    ``max_disagreement`` of the queries (with a little slack for float error); None: keep flat."""
    eligible = [r for r in rows[1:] if r["disagreement"] <= max_disagreement + 1e-12]
    if not eligible:
        return None
    best: str = min(eligible, key=lambda r: r["ms_per_query_median"])["config"]
    return best


def _data_summary(
    real: RealFeatures,
    scaled: ScaledSet,
    shape: tuple[int, int],
    correct: np.ndarray,
    exact_scores: np.ndarray,
) -> dict[str, Any]:
    """What was indexed and queried (sizes, origin, the queries' accuracy and how well exact
    search separates their errors), so that each row can be read against its data."""
    indexed, dim = shape
    return {
        "origin": real.origin,
        "train_features": list(real.train.shape),
        "tiles": math.ceil(scaled.n / real.train.shape[0]),
        "indexed": indexed,
        "dim": dim,
        "classes": int(np.unique(scaled.labels).size),
        "queries": int(real.queries.shape[0]),
        "queries_correct": int(correct.sum()),
        "query_accuracy": float(correct.mean()),
        "exact_auroc_correct_vs_errors": (
            auroc(exact_scores[correct], exact_scores[~correct]) if (~correct).any() else None
        ),
    }


def benchmark(real: RealFeatures, settings: Settings, log: Log) -> dict[str, Any]:
    """Every measurement, as a JSON-ready dict (rows: flat first, then each IVF config)."""
    started = time.perf_counter()
    load_before = list(os.getloadavg())
    scaled = ScaledSet.make(real, settings.n, settings.dim, settings.noise, settings.seed)
    configs, shape = _processed_configs(scaled, settings, started, log)
    queries = scaled.lift.apply(real.queries)
    classes = real.query_predictions
    correct = classes == real.query_labels
    if not correct.any():
        raise ValueError("no query is classified correctly: cannot calibrate")
    measured = _score_configs(configs, queries, classes, settings, log)
    exact = measured["flat"]
    thresholds = _thresholds(exact.scores[correct], settings.retention)
    load_timing = list(os.getloadavg())
    rows = _timed_rows(configs, measured, queries, classes, thresholds, settings, log)
    recommended = _recommended(rows, settings.max_disagreement)
    return {
        "settings": vars(settings),
        "data": _data_summary(real, scaled, shape, correct, exact.scores),
        "faiss": search.faiss_version(),
        "thresholds": thresholds,
        "threshold": thresholds[f"{settings.retention:.2f}"],
        "rows": rows,
        "recommended": recommended,
        "load_average": {
            "before": load_before,
            "before_timing": load_timing,
            "after": list(os.getloadavg()),
        },
        "seconds": time.perf_counter() - started,
    }


def recommendation(results: dict[str, Any]) -> str:
    limit = 100 * results["settings"]["max_disagreement"]
    name = results["recommended"]
    if name is None:
        return (
            f"**Recommended default: exact flat.** No IVF configuration kept the verdict "
            f"disagreement at or below {limit:.1f}%."
        )
    row = next(r for r in results["rows"] if r["config"] == name)
    k = results["settings"]["k"]
    return (
        f"**Recommended default: IVF nlist = {row['nlist']}, nprobe = {row['nprobe']}**, the "
        f"fastest configuration whose verdicts differ from exact search on at most {limit:.1f}% "
        f"of the queries: {row['ms_per_query_median']:.2f} ms per query at batch "
        f"{results['settings']['batch']}, {row['speedup_vs_flat']:.1f}x faster than flat, "
        f"{100 * row['disagreement']:.2f}% of verdicts changed "
        f"({row['newly_rejected']} newly rejected, {row['newly_accepted']} newly accepted), "
        f"recall@{k} {row[f'recall_at_{k}']:.3f}."
    )


def render_table(results: dict[str, Any]) -> str:
    s = results["settings"]
    d = results["data"]
    k = s["k"]
    lines = [
        f"Exact flat against IVF-Flat, {d['indexed']:,} x {d['dim']} float32, k = {k}, DW-kNN, "
        f"faiss {results['faiss']} on CPU (default threads). "
        f"Data: {d['origin']} ({d['train_features'][0]:,} x {d['train_features'][1]}, "
        f"{d['classes']} classes), tiled {d['tiles']}x with Gaussian jitter of {s['noise']} x the "
        f"per-dimension std, lifted to {s['dim']}-d by a fixed random ReLU layer, pca_whiten "
        f"to {d['dim']} fitted on the indexed rows. Queries: {d['queries']} CIFAR-10 test images "
        f"({100 * d['query_accuracy']:.1f}% correctly classified; exact-search score AUROC "
        f"correct vs errors {_fmt(d['exact_auroc_correct_vs_errors'], 3)}), scored for the "
        f"predicted class. Threshold {results['threshold']:.4f} keeps "
        f"{100 * s['retention']:.0f}% of the exact scores of the {d['queries_correct']} "
        f"correctly classified queries. ms/query: one detector call (processing + search + "
        f"score) on a batch of {s['batch']}, divided by {s['batch']}; median of "
        f"{s['rounds'] * s['batches_per_round']} batches per config, timed in {s['rounds']} "
        f"interleaved rounds (every config in each round, after a full untimed pass over the "
        f"queries) so that drifting load from other jobs falls on all alike. recall@{k}: on the "
        f"first {s['recall_queries']} queries.",
        "",
        f"| config | nlist | nprobe | train s | build s | ms/query (batch {s['batch']}) | "
        f"speed-up | recall@{k} | verdicts differ | newly rejected / accepted | "
        "mean abs Δscore |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['config']} | {_fmt(r['nlist'])} | {_fmt(r['nprobe'])} | {r['train_s']:.1f} | "
            f"{r['build_s']:.1f} | {r['ms_per_query_median']:.2f} | {r['speedup_vs_flat']:.1f}x | "
            f"{r[f'recall_at_{k}']:.3f} | {100 * r['disagreement']:.2f}% | "
            f"{r['newly_rejected']} / {r['newly_accepted']} | "
            f"{r['mean_abs_score_difference']:.4f} |"
        )
    lines += ["", recommendation(results)]
    load = results["load_average"]
    lines += [
        "",
        "1-minute load average before the run / before the timing rounds / after: "
        f"{load['before'][0]:.2f} / {load['before_timing'][0]:.2f} / {load['after'][0]:.2f} "
        f"on {os.cpu_count()} cores; the run took {results['seconds'] / 60:.1f} minutes.",
    ]
    return "\n".join(lines)


def _fmt(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if digits else str(value)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=at_least(1), default=ILSVRC_TRAIN_IMAGES, help="indexed rows")
    parser.add_argument("--dim", type=at_least(1), default=256, help="lifted and PCA dimensions")
    parser.add_argument(
        "--k",
        type=at_least(1),
        default=1000,
        help="neighbours the vote reads (default: %(default)s)",
    )
    parser.add_argument(
        "--nlist",
        type=at_least(1),
        nargs="+",
        default=[1024, 4096],
        help="IVF lists, an index each (default: %(default)s)",
    )
    parser.add_argument(
        "--nprobe",
        type=at_least(1),
        nargs="+",
        default=[8, 16, 32, 64, 128, 256, 512],
        help="IVF lists searched per query, a configuration each (up to nlist) "
        "(default: %(default)s)",
    )
    parser.add_argument("--queries", type=at_least(1), default=2000, help="CIFAR-10 test images")
    parser.add_argument(
        "--recall-queries",
        type=at_least(1),
        default=500,
        help="first queries recall@k is measured on (default: %(default)s)",
    )
    parser.add_argument(
        "--batch",
        type=at_least(1),
        default=64,
        help="queries per detector call (default: %(default)s)",
    )
    parser.add_argument("--noise", type=float, default=0.15, help="tile jitter / feature std")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="draws of the queries, tiles, lift and IVF training sample (default: %(default)s)",
    )
    parser.add_argument(
        "--max-disagreement",
        type=float,
        default=0.005,
        help="share of verdicts the recommended IVF may change (default: %(default)s)",
    )
    parser.add_argument("--rounds", type=at_least(1), default=5, help="interleaved timing rounds")
    parser.add_argument(
        "--batches-per-round",
        type=at_least(1),
        default=2,
        help="timed batches per configuration and round (default: %(default)s)",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=DEFAULT_SOURCE,
        help="CIFAR-10 ImageFolder directory or tar with train/ and test/ splits "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=DEFAULT_WEIGHTS,
        help="the CIFAR-10 ResNet-56's state-dict file (default: %(default)s)",
    )
    parser.add_argument(
        "--bundles",
        type=Path,
        default=EVALUATION_CACHE / "bundles",
        help="bundles searched for unprocessed layer3 features (else they are extracted) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=EVALUATION_CACHE / "data",
        help="decoded image splits cached here (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:7.1f}s] {message}", flush=True)

    real = load_real_features(
        args.source, args.weights, args.bundles, args.cache_dir, args.queries, args.seed, log
    )
    log(f"features: train {real.train.shape}, queries {real.queries.shape} ({real.origin})")
    settings = Settings(
        n=args.n,
        dim=args.dim,
        k=args.k,
        nlists=tuple(args.nlist),
        nprobes=tuple(sorted(args.nprobe)),
        batch=args.batch,
        recall_queries=args.recall_queries,
        noise=args.noise,
        seed=args.seed,
        max_disagreement=args.max_disagreement,
        rounds=args.rounds,
        batches_per_round=args.batches_per_round,
    )
    results = benchmark(real, settings, log)
    print(write_results("search_ivf", results, render_table(results)).read_text())


if __name__ == "__main__":
    main()
