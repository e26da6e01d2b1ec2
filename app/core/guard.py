"""Guard: a verified bundle turned into verdicts (classify, score, accept or reject).

The service and the evaluation both go through this class; the stages (``infer`` on the model,
``score`` on the index, ``decide``) are separate so the service can time and batch them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.core import search
from app.core.bundle import read_manifest, verify_files
from app.core.detector import Detector, Evidence, LookAgain
from app.core.errors import BundleError, ModelLoadError
from app.core.explain import Explanation, explain
from app.core.features import (
    FLIPPED_LOGITS,
    BatchFeatures,
    FeatureNetwork,
    Precision,
    image_to_pixels,
    infer_batch,
    pick_device,
)
from app.core.manifest import LayerSpec, Manifest, StatisticSpec
from app.core.models import PreprocessingPreset, file_sha256, load_model
from app.core.processing import FeatureProcessing
from app.core.scoring import ScoreFunction
from app.core.statistics import (
    ClassDensity,
    ClassKnnDistance,
    DoubtMargin,
    KnnVote,
    LayerIndex,
    Mahalanobis,
    Margin,
    Statistic,
    SuspectMargin,
)


@dataclass(frozen=True)
class Classification:
    """The model's answer alone (the guard off: nothing was checked)."""

    predicted_class: int
    class_name: str
    probability: float


@dataclass(frozen=True)
class Verdict(Classification):
    """The model's answer and the guard's: the kNN score and whether it passed the threshold."""

    score: float
    threshold: float
    accepted: bool


def _load_layer(
    bundle_dir: Path, spec: LayerSpec, want_gpu: bool, backend: search.SearchBackend = "faiss"
) -> tuple[LayerIndex, str]:
    """One layer's processing and index, checked against the manifest, on ``backend``."""
    assert spec.processing_file is not None and spec.index_file is not None
    processing = FeatureProcessing.load(bundle_dir / spec.processing_file)
    if (processing.input_dim, processing.output_dim) != (spec.input_dim, spec.output_dim):
        raise BundleError("processing file dimensions differ from the manifest")
    index = search.load_index(bundle_dir / spec.index_file)
    if spec.nprobe is not None:
        search.set_nprobe(index, spec.nprobe)
    try:
        index, index_device = search.to_device(index, want_gpu, backend)
    except ValueError as exc:  # e.g. an IVF index, which the exact torch backend refuses
        raise BundleError(f"index of {spec.name}: {exc}") from exc
    return LayerIndex(spec.name, processing, index), index_device


def _reference(bundle_dir: Path, manifest: Manifest) -> np.ndarray | None:
    """(n, S) reference values of the statistics, for combined detectors.

    Format-1 Fisher bundles kept one file of held-out scores per layer (the same images for
    every layer); newer bundles keep one (n, S) file.
    """
    detector = manifest.detector
    if detector.combination == "single":
        return None
    if manifest.calibration.reference_statistics_file is not None:
        reference: np.ndarray = np.load(
            bundle_dir / manifest.calibration.reference_statistics_file, allow_pickle=False
        )
        return reference
    columns = []
    for layer in detector.layers:
        assert layer.calibration_scores_file is not None  # manifest validator
        columns.append(np.load(bundle_dir / layer.calibration_scores_file, allow_pickle=False))
    return np.stack(columns, axis=1)


def make_statistics(
    specs: Sequence[StatisticSpec],
    layer_index: Callable[[str], LayerIndex],
    density: Callable[[str], ClassDensity],
    labels: np.ndarray,
    k: int,
    score_function: ScoreFunction,
    num_classes: int,
    want_gpu: bool = False,
    backend: search.SearchBackend = "faiss",
) -> list[Statistic]:
    """The statistics a manifest names, from the layers' indexes and class densities: the one
    construction the builder (in memory) and the service (from the bundle's files) share.
    Class-conditional indexes are searched with ``backend``, like the layers' own."""
    statistics: list[Statistic] = []
    class_indexes: dict[str, search.ClassIndexes] = {}
    for spec in specs:
        if spec.kind == "vote":
            statistics.append(KnnVote(layer_index(spec.layer), labels, k, score_function))
        elif spec.kind == "mahalanobis":
            statistics.append(Mahalanobis(spec.layer, density(spec.layer)))
        elif spec.kind == "margin":
            statistics.append(Margin(spec.layer))
        elif spec.kind == "suspect_margin":
            statistics.append(SuspectMargin(spec.layer))
        elif spec.kind == "doubt_margin":
            assert spec.first_logits is not None and spec.gate is not None  # fitted, validated
            statistics.append(DoubtMargin(spec.layer, spec.first_logits, spec.gate))
        else:
            assert spec.k is not None  # manifest validator
            indexed = layer_index(spec.layer)
            if spec.layer not in class_indexes:
                vectors = search.stored_vectors(indexed.index)
                class_indexes[spec.layer] = search.ClassIndexes.from_vectors(
                    vectors, labels, num_classes
                )
                class_indexes[spec.layer].to_device(want_gpu, backend)
            statistics.append(ClassKnnDistance(indexed, class_indexes[spec.layer], spec.k))
    return statistics


def load_detector(
    bundle_dir: Path,
    manifest: Manifest,
    want_gpu: bool,
    backend: search.SearchBackend = "faiss",
) -> tuple[Detector, str]:
    """The bundle's detector, its indexes searched by ``backend`` (faiss, or torch's exact
    matmul + top-k), on the GPU when asked and possible. Returns (detector, "gpu" | "cpu")."""
    spec = manifest.detector
    labels = np.load(bundle_dir / spec.labels_file, allow_pickle=False).astype(np.int64)
    if labels.shape[0] != manifest.counts.indexed:
        raise BundleError("label count differs from the manifest")
    layer_specs = {layer.name: layer for layer in spec.layers}
    indexes: dict[str, LayerIndex] = {}
    index_device = "cpu"

    def layer_index(name: str) -> LayerIndex:
        nonlocal index_device
        if name not in indexes:
            indexes[name], index_device = _load_layer(
                bundle_dir, layer_specs[name], want_gpu, backend
            )
            if search.index_size(indexes[name].index) != labels.shape[0]:
                raise BundleError(f"index of {name} and the labels differ in size")
        return indexes[name]

    def density(name: str) -> ClassDensity:
        layer = layer_specs[name]
        assert layer.class_density_file is not None  # manifest validator
        loaded = ClassDensity.load(bundle_dir / layer.class_density_file)
        if loaded.means.shape != (manifest.model.num_classes, layer.input_dim):
            raise BundleError(f"class density of {name} differs from the manifest")
        return loaded

    statistics = make_statistics(
        spec.statistic_specs(),
        layer_index,
        density,
        labels,
        spec.k,
        spec.score_function,
        manifest.model.num_classes,
        want_gpu,
        backend,
    )
    try:
        detector = Detector(statistics, spec.combination, _reference(bundle_dir, manifest))
    except ValueError as exc:
        raise BundleError(f"the bundle's detector is inconsistent: {exc}") from exc
    return detector, index_device


# Slack on the network's mirroring gate: it compares float32 margins, the statistic float64 ones;
# mirroring a query the statistic then does not read costs a pass, missing one would reject it.
_GATE_SLACK = 1e-4


def mirror_gate(statistics: Sequence[Statistic]) -> float | None:
    """The first-pass margin below which the network mirrors a query: every query (None) when a
    plain margin reads the mirrored logits, else just above the largest ``doubt_margin`` gate
    (no ``doubt_margin``: None, and the network mirrors only if a statistic reads the mirror)."""
    gates = [s.gate for s in statistics if isinstance(s, DoubtMargin)]
    mirrors_all = any(isinstance(s, Margin) and s.layer_name == FLIPPED_LOGITS for s in statistics)
    if not gates or mirrors_all:
        return None
    return max(gates) + _GATE_SLACK * (1.0 + abs(max(gates)))


def preset_of(manifest: Manifest) -> PreprocessingPreset:
    spec = manifest.model.preprocessing
    return PreprocessingPreset(spec.preset, spec.resize, spec.crop, spec.mean, spec.std)


def threshold_for(manifest: Manifest, retention: float | None) -> float:
    """The bundle's threshold for a retention (None: its operating one); a retention it was not
    calibrated for is refused (``advguard serve`` checks it before starting)."""
    if retention is None:
        return manifest.calibration.threshold
    key = f"{retention:.2f}"
    if key not in manifest.calibration.thresholds:
        raise BundleError(
            f"no calibrated threshold for retention {key}; "
            f"have {sorted(manifest.calibration.thresholds)}"
        )
    return manifest.calibration.thresholds[key]


class Guard:
    def __init__(
        self,
        manifest: Manifest,
        network: FeatureNetwork,
        detector: Detector,
        threshold: float,
        index_device: str,
    ) -> None:
        self.manifest = manifest
        self.network = network
        self.detector = detector
        self.threshold = threshold
        self.index_device = index_device
        self.preset = preset_of(manifest)
        self.class_names = list(manifest.class_names)

    @classmethod
    def load(
        cls,
        bundle_dir: Path,
        device: str | None = None,
        use_gpu_index: bool | None = None,
        retention: float | None = None,
        weights_path: Path | None = None,
        search_backend: search.SearchBackend = "faiss",
        precision: Precision = "fp32",
        channels_last: bool = False,
    ) -> Guard:
        """Load and verify a bundle. ``weights_path`` may point at the model weights elsewhere,
        but they must still match the manifest's sha256. ``search_backend`` picks faiss or the
        torch exact search (on the GPU with ``use_gpu_index``, which defaults to "the model is on
        cuda"); ``precision`` and ``channels_last`` set the model's forward pass (fp32 and the
        default memory format are what the bundle was calibrated with)."""
        manifest = read_manifest(bundle_dir)
        verify_files(bundle_dir, manifest)
        weights = weights_path or bundle_dir / manifest.model.weights_file
        if weights_path is not None and file_sha256(weights) != manifest.model.weights_sha256:
            raise BundleError(f"model weights {weights} do not match the bundle's model")
        try:
            model = load_model(manifest.model.arch, weights, manifest.model.num_classes)
        except ModelLoadError as exc:
            raise BundleError(f"the bundle's model cannot be loaded: {exc}") from exc
        torch_device = pick_device(device)
        layers = [spec.name for spec in manifest.detector.layers]
        network = FeatureNetwork(model, layers, preset_of(manifest))
        network = network.to(torch_device)
        network.eval()
        network.set_execution(precision, channels_last)
        want_gpu = torch_device.type == "cuda" if use_gpu_index is None else use_gpu_index
        detector, index_device = load_detector(bundle_dir, manifest, want_gpu, search_backend)
        network.mirror_below = mirror_gate(detector.statistics)
        network.deferred = tuple(detector.deferred_layers)
        threshold = threshold_for(manifest, retention)
        return cls(manifest, network, detector, threshold, index_device)

    @property
    def layers(self) -> list[str]:
        return self.detector.layers

    @property
    def layer(self) -> str:
        """The feature layers, "+"-joined ("layer3"; "layer1+layer3" for several)."""
        return "+".join(self.layers)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        return image_to_pixels(image, self.preset)

    def on_device(self, pixels: torch.Tensor) -> torch.Tensor:
        """The pixels on the model's device (the same tensor when they are there), once: the
        service screens large uploads from the copy the model read (``infer`` moves none)."""
        return pixels.to(self.network.device, non_blocking=True)

    def infer(self, pixels: torch.Tensor) -> BatchFeatures:
        """Model stage: one forward pass for a batch of pixel tensors."""
        return infer_batch(self.network, pixels)

    def score(self, batch: BatchFeatures) -> np.ndarray:
        """Search stage: the detector's score of each predicted class."""
        return self.detector.score(batch.features, batch.predictions, self.look_again(batch))

    def evidence(self, batch: BatchFeatures) -> Evidence:
        """Search stage with every statistic kept: ``evidence.scores`` are ``score``'s."""
        return self.detector.evidence(batch.features, batch.predictions, self.look_again(batch))

    def look_again(self, batch: BatchFeatures) -> LookAgain | None:
        """The network's deferred second passes over the batch's suspects (None: none), for
        ``Detector.values``."""
        pixels = batch.pixels
        if not self.network.deferred or pixels is None:
            return None

        def look_again(suspects: np.ndarray) -> dict[str, np.ndarray]:
            rows = torch.from_numpy(suspects)
            classes = len(self.class_names)
            return {
                layer: self.network.second_pass(layer, pixels, rows, classes).cpu().numpy()
                for layer in self.network.deferred
            }

        return look_again

    def explain(
        self, batch: BatchFeatures, evidence: Evidence, rows: Sequence[int]
    ) -> list[Explanation]:
        """The evidence behind the decisions of ``rows`` (trusted callers only: see
        ``app.core.explain``), from the batch's own evidence."""
        return explain(
            self.detector,
            evidence,
            batch.features,
            batch.predictions,
            rows,
            self.threshold,
            len(self.class_names),
        )

    def decide(self, batch: BatchFeatures, scores: np.ndarray) -> list[Verdict]:
        verdicts = []
        for i, predicted in enumerate(batch.predictions.tolist()):
            score = float(scores[i])
            verdicts.append(
                Verdict(
                    predicted_class=predicted,
                    class_name=self.class_names[predicted],
                    probability=float(batch.probabilities[i, predicted]),
                    score=score,
                    threshold=self.threshold,
                    accepted=score >= self.threshold,
                )
            )
        return verdicts

    def classify(self, pixels: torch.Tensor) -> list[Classification]:
        """Model only (the guard off): the classifier's one forward pass, no index search, no
        score, and none of what only the detector reads (the pixel pseudo-layers, the mirrored
        pass of ``flip.logits``): the unguarded service must cost what the bare model does."""
        with torch.inference_mode():
            logits = self.network.classify(pixels.to(self.network.device, non_blocking=True))
            probabilities, predictions = torch.softmax(logits.float(), dim=1).max(dim=1)
        return [
            Classification(predicted_class=c, class_name=self.class_names[c], probability=p)
            for c, p in zip(predictions.tolist(), probabilities.tolist(), strict=True)
        ]

    def classify_pixels(self, pixels: torch.Tensor) -> list[Verdict]:
        batch = self.infer(pixels)
        return self.decide(batch, self.score(batch))

    def classify_images(self, images: Sequence[Image.Image]) -> list[Verdict]:
        if not images:
            return []
        return self.classify_pixels(torch.stack([self.pixels(image) for image in images]))
