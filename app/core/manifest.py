"""The bundle manifest: the one contract between the builder and the service.

A bundle is a directory holding ``manifest.json`` plus the files it lists (model weights,
per-layer processing and FAISS index, labels, calibration scores), each with its sha256.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.core.detector import COMBINATIONS, Combination
from app.core.models import ModelFamily, PresetName
from app.core.processing import ProcessingKind
from app.core.scoring import ScoreFunction
from app.core.search import IndexType
from app.core.statistics import INDEXED_KINDS, StatisticKind

MANIFEST_NAME = "manifest.json"
# How a detector turns its statistics into one score (app.core.detector): "single" is the paper's
# one-statistic score; the others combine per-statistic p-values.
__all__ = ["COMBINATIONS", "Combination", "Manifest"]
FORMAT_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PreprocessingSpec(_Frozen):
    preset: PresetName
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class ModelSpec(_Frozen):
    arch: str
    family: ModelFamily
    num_classes: int
    weights_file: str
    weights_sha256: str
    preprocessing: PreprocessingSpec


class LayerSpec(_Frozen):
    """One feature layer: its processing and index over the training features (layers that a
    vote or a kNN distance reads), and/or its class means and tied covariance (Mahalanobis)."""

    name: str
    input_dim: int
    processing: ProcessingKind
    output_dim: int
    processing_file: str | None
    index_file: str | None
    index_type: IndexType
    nlist: int | None = None
    nprobe: int | None = None
    # held-out authentic scores of this layer alone (format-1 Fisher bundles only)
    calibration_scores_file: str | None = None
    class_density_file: str | None = None


class StatisticSpec(_Frozen):
    """One statistic of the detector (app.core.statistics), in the column order of the
    calibration's statistics files."""

    kind: StatisticKind
    layer: str
    k: int | None = Field(default=None, gt=0)  # knn_distance only
    # doubt_margin only: the first pass's logits layer and the margin below which it is in doubt
    # (fitted by the builder on the reference part; None until then)
    first_logits: str | None = None
    gate: float | None = None

    @property
    def reads(self) -> tuple[str, ...]:
        """The layers the statistic reads: its own, and the first pass's logits for a gate."""
        return (self.layer,) if self.first_logits is None else (self.layer, self.first_logits)


class DetectorSpec(_Frozen):
    layers: list[LayerSpec] = Field(min_length=1)
    k: int = Field(gt=0)
    score_function: ScoreFunction
    combination: Combination = "single"
    labels_file: str
    # JSON list: row i of the index came from this source reference (an archive member path or a
    # path under the source directory), so a service can show a query's nearest training images.
    # None: bundles built before it; they load and answer as before, without neighbour images.
    sources_file: str | None = None
    # None: one vote per layer (bundles written before statistics existed)
    statistics: list[StatisticSpec] | None = None

    def statistic_specs(self) -> list[StatisticSpec]:
        """The statistics, in column order; older bundles have one vote per layer."""
        if self.statistics is not None:
            return list(self.statistics)
        return [StatisticSpec(kind="vote", layer=layer.name) for layer in self.layers]

    @model_validator(mode="after")
    def _layers_fit_combination(self) -> DetectorSpec:
        if self.statistics is not None:
            return self._statistics_fit_layers()
        if any(layer.index_file is None or layer.processing_file is None for layer in self.layers):
            raise ValueError("every layer of a vote-only bundle needs an index")
        if self.combination == "single" and len(self.layers) != 1:
            raise ValueError("combination 'single' takes exactly one layer")
        if self.combination != "single":
            if len(self.layers) < 2:
                raise ValueError(f"combination {self.combination!r} takes two layers or more")
            if len({layer.name for layer in self.layers}) != len(self.layers):
                raise ValueError("a layer appears twice")
            if any(layer.calibration_scores_file is None for layer in self.layers):
                raise ValueError(f"combination {self.combination!r} needs per-layer calibration")
        return self

    def _statistics_fit_layers(self) -> DetectorSpec:
        assert self.statistics is not None
        if not self.statistics:
            raise ValueError("a detector needs at least one statistic")
        if (self.combination == "single") != (len(self.statistics) == 1):
            raise ValueError("combination 'single' takes exactly one statistic, and only it does")
        layers = {layer.name: layer for layer in self.layers}
        if len(layers) != len(self.layers):
            raise ValueError("a layer appears twice")
        for statistic in self.statistics:
            layer = layers.get(statistic.layer)
            if layer is None:
                raise ValueError(
                    f"statistic {statistic.kind} reads unknown layer {statistic.layer}"
                )
            if statistic.kind == "mahalanobis" and layer.class_density_file is None:
                raise ValueError(f"mahalanobis@{layer.name} needs the layer's class density")
            if statistic.kind in INDEXED_KINDS and layer.index_file is None:
                raise ValueError(f"{statistic.kind}@{layer.name} needs the layer's index")
            if (statistic.kind == "knn_distance") != (statistic.k is not None):
                raise ValueError("k is set for knn_distance statistics, and only for them")
            gate = (statistic.first_logits, statistic.gate)
            if gate.count(None) != (0 if statistic.kind == "doubt_margin" else 2):
                raise ValueError("doubt_margin statistics, and only they, have a gate (and layer)")
            if statistic.first_logits is not None and statistic.first_logits not in layers:
                raise ValueError(f"a doubt gate reads unknown layer {statistic.first_logits}")
        return self


class CalibrationSpec(_Frozen):
    """Scores of correctly classified held-out authentic images and the thresholds they give."""

    source: Literal["holdout", "directory"]
    holdout_fraction: float | None
    n_images: int
    n_correct: int
    accuracy: float
    mean: float
    std: float
    quantiles: dict[str, float]
    thresholds: dict[str, float]  # retention ("0.98") -> threshold
    operating_retention: float
    threshold: float
    scores_file: str
    # the predicted class's score for every held-out image, errors included: what honest traffic
    # looks like, from which the per-client flag policies are calibrated (absent in older bundles)
    honest_scores_file: str | None = None
    # each of those images' predicted class, in the same order: the per-class reference of the
    # flag policies' values (app.core.flagging.ClassScale); absent in older bundles
    honest_classes_file: str | None = None
    # Combined detectors with statistics: each statistic's values on the correctly classified
    # images of the *reference* part (the p-values' reference) and of the *threshold* part (the
    # threshold above, and any subset's threshold in ablations). Two disjoint held-out parts.
    reference_statistics_file: str | None = None
    threshold_statistics_file: str | None = None
    n_reference: int | None = None


class CountsSpec(_Frozen):
    classes: int
    indexed: int
    holdout: int
    skipped: int
    indexed_per_class: list[int]


class ProvenanceSpec(_Frozen):
    source: str
    split: str | None
    calibration_source: str | None
    per_class_limit: int | None
    seed: int
    built_at: str
    build_seconds: float
    software: dict[str, str]


class Manifest(_Frozen):
    format_version: int = FORMAT_VERSION
    name: str
    model: ModelSpec
    detector: DetectorSpec
    class_names: list[str]
    counts: CountsSpec
    calibration: CalibrationSpec
    provenance: ProvenanceSpec
    files: dict[str, str]  # file name -> sha256

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"unsupported bundle format {self.format_version}")
        if len(self.class_names) != self.model.num_classes:
            raise ValueError("class_names and the model's num_classes differ")
        return self
