"""Which statistics a bundle's detector computes: named presets and ``kind@layer`` lists.

A statistic is written ``kind@layer``: ``vote@layer3.2``, ``mahalanobis@layer1.0``,
``knn_distance@layer3.2``, ``margin@logits``. Layer aliases expand against the model: ``@blocks``
(every residual block: 9 for ResNet-20, 16 for ResNet-50), ``@stages`` (each stage's last block),
``@last`` (the last residual block, whose pooled output is the paper's pool5 analogue) and
``@logits`` (the classifier's last linear layer, for ``margin``). ``pixels.highpass`` is the
pseudo-layer of the input pixels' high-pass energy (``app.core.features.PixelHighPass``),
``pixels.loghighpass`` its logarithm and ``pixels.chromahighpass`` the same filters over the
colour channels (``ChromaHighPass``), for ``mahalanobis``; ``flip.logits`` the logits of the
mirrored image (a second forward pass), for ``margin`` (the flip margin), ``median.logits``
those of the image median-filtered over 2x2 pixels (another), for ``margin`` (the median
margin), and ``jpeg.logits`` those of the image stored as a JPEG at quality 75 and decoded
(another), for ``margin`` (the JPEG margin).

Presets (``--detector``):
- ``paper``: the paper's detector, one DW-kNN vote at the last layer (Carrara et al. 2017);
- ``v2`` (the default): the configuration chosen by the selection rule in
  ``evaluation/selection.py`` (round 13, ``evaluation/results/selection-13/``): the vote at the
  last block, the Mahalanobis distances of each stage's output, the logit margin, the
  Mahalanobis distances of the pixels' high-pass energy and of the colour channels' high-pass
  energy, and the suspect JPEG margin (the margin on the image stored as a JPEG at quality 75
  and decoded, read only for the fifth of authentic queries the other statistics combine
  lowest), combined by the harmonic-mean p-value; one forward pass, and a JPEG round trip and a
  second pass for the suspects;
- ``v2-dflip``: round 11's default (bundles built from 2026-12-04 evening to 2026-12-06 hold
  it): ``v2`` with the doubted flip margin (the mirrored image's margin, read for the fifth of
  queries the first pass is least sure of) in place of the suspect JPEG margin;
- ``v2-median``: the best detector at any cost of round 10: round 7's ``v2`` (the vote, the
  Mahalanobis distances of each stage's output, the margin, the two high-pass energies) plus
  the median margin (the margin on the image median-filtered over 2x2 pixels: a second forward
  pass for every image; for deployments with the headroom, such as a GPU);
- ``v2-jpeg``: the best detector at any cost of round 12 (``evaluation/results/selection-12/``):
  the vote, the Mahalanobis distances of each stage's output, that of the colour channels'
  high-pass energy and the JPEG margin (the margin on the image stored as a JPEG at quality 75
  and decoded: a second forward pass for every image), harmonic mean; for deployments with the
  headroom whose honest uploads are stored the way the training images were (README, Results);
- ``v2-flip``: the best detector at any cost of rounds 7-9: round 7's ``v2`` plus the flip
  margin (a second forward pass for every image);
- round 9's default (round 10 kept it), which bundles built from 2026-12-02 early morning to
  2026-12-04 evening hold, is the candidate ``knn-last+margin+hp+cn+dflip-hmp`` (round 11's
  with the class-conditional kNN distance at the last block in place of the stage distances);
- round 7's default (round 8 kept it), which bundles built from 2026-12-01 late evening to
  2026-12-02 early morning hold, is the candidate ``maha-stages+margin+hp+cn-hmp``;
- the default of round 6 (round 7's without the stage distances), which bundles built on
  2026-12-01 evening hold, is the candidate ``margin+hp+cn-hmp``; that of rounds 4 and 5 (vote
  + Mahalanobis at each stage's output + margin + the pixels' high-pass energy, harmonic mean),
  which bundles built from 2026-11-30 evening to 2026-12-01 afternoon hold, is the candidate
  ``maha-stages+margin+hp-hmp``; that of round 3 (vote +
  Mahalanobis at every block + margin, harmonic mean) ``maha-blocks+margin-hmp``; that of rounds
  1 and 2 (vote + Mahalanobis at the stage outputs, Fisher) ``maha-stages-fisher``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from app.core.detector import Combination
from app.core.errors import ModelLoadError
from app.core.features import FLIPPED_LOGITS, SECOND_PASS_LAYERS
from app.core.manifest import StatisticSpec
from app.core.models import describe_architecture, logits_layer, residual_blocks
from app.core.statistics import (
    DEFAULT_CLASS_K,
    DOUBTED_SHARE,
    STATISTIC_KINDS,
    StatisticKind,
)


@dataclass(frozen=True)
class DetectorPreset:
    statistics: tuple[str, ...]
    combination: Combination


# The Mahalanobis distance of the pixels' high-pass energy (``app.core.features.PixelHighPass``).
HIGHPASS_STATISTIC = "mahalanobis@pixels.highpass"
# The same energies' logarithms (round 5's candidates).
LOG_HIGHPASS_STATISTIC = "mahalanobis@pixels.loghighpass"
# Round 6's: the colour channels' high-pass energy (``ChromaHighPass``) and the flip margin, the
# predicted class's logit margin on the mirrored image (a second forward pass).
CHROMA_STATISTIC = "mahalanobis@pixels.chromahighpass"
FLIP_STATISTIC = "margin@flip.logits"
# Round 8's: the flip margin read only where the first pass is in doubt (its margin below the
# reference part's 20% quantile), so four authentic queries in five cost no second pass.
DOUBT_STATISTIC = "doubt_margin@flip.logits"
# Round 10's: the predicted class's logit margin on the image median-filtered over 2x2 pixels
# (``app.core.features.median_filter_2x2``; feature squeezing, Xu et al. 2018), a second
# forward pass for every image.
MEDIAN_STATISTIC = "margin@median.logits"
# Round 12's: the predicted class's logit margin on the image stored as a JPEG at quality 75 and
# decoded (``app.core.features.jpeg_squeeze``; Das et al. 2017), a second forward pass for
# every image.
JPEG_STATISTIC = "margin@jpeg.logits"
# Round 13's: the JPEG margin read only for the queries the detector's other statistics doubt
# (their combination below the reference part's 20% quantile: ``app.core.detector.Detector``),
# so four authentic queries in five cost no JPEG round trip and no second pass.
SUSPECT_JPEG_STATISTIC = "suspect_margin@jpeg.logits"
PRESETS: dict[str, DetectorPreset] = {
    "paper": DetectorPreset(("vote@last",), "single"),
    # chosen by the selection rule, round 13 (evaluation/results/selection-13/):
    # maha-stages+margin+hp+cn+sjq-hmp
    "v2": DetectorPreset(
        (
            "vote@last",
            "mahalanobis@stages",
            "margin@logits",
            HIGHPASS_STATISTIC,
            CHROMA_STATISTIC,
            SUSPECT_JPEG_STATISTIC,
        ),
        "hmp",
    ),
    # round 11's default (evaluation/results/selection-11/): maha-stages+margin+hp+cn+dflip-hmp
    "v2-dflip": DetectorPreset(
        (
            "vote@last",
            "mahalanobis@stages",
            "margin@logits",
            HIGHPASS_STATISTIC,
            CHROMA_STATISTIC,
            DOUBT_STATISTIC,
        ),
        "hmp",
    ),
    # the best at any cost of round 10, which median-filters every image for a second pass:
    # maha-stages+margin+hp+cn+med-hmp
    "v2-median": DetectorPreset(
        (
            "vote@last",
            "mahalanobis@stages",
            "margin@logits",
            HIGHPASS_STATISTIC,
            CHROMA_STATISTIC,
            MEDIAN_STATISTIC,
        ),
        "hmp",
    ),
    # the best at any cost of round 12, which stores every image as a JPEG at quality 75 for a
    # second pass: maha-stages+cn+jq-hmp
    "v2-jpeg": DetectorPreset(
        ("vote@last", "mahalanobis@stages", CHROMA_STATISTIC, JPEG_STATISTIC),
        "hmp",
    ),
    # the best at any cost of rounds 7 to 9, which mirrors every image:
    # maha-stages+margin+hp+cn+flip-hmp
    "v2-flip": DetectorPreset(
        (
            "vote@last",
            "mahalanobis@stages",
            "margin@logits",
            HIGHPASS_STATISTIC,
            CHROMA_STATISTIC,
            FLIP_STATISTIC,
        ),
        "hmp",
    ),
}
# Candidates the selection rule chooses among (evaluation.selection); every one keeps the paper's
# vote, the mission's score.
_ROUND_1_STATISTICS: dict[str, tuple[str, ...]] = {
    "maha-blocks": ("vote@last", "mahalanobis@blocks"),
    "maha-stages": ("vote@last", "mahalanobis@stages"),
    "knn-last": ("vote@last", "knn_distance@last"),
    "knn-blocks": ("vote@last", "knn_distance@blocks"),
    "maha-blocks+knn-last": ("vote@last", "mahalanobis@blocks", "knn_distance@last"),
}
# Round 2 (evaluation/selection.py): round 1's sets, each also with the logit margin, and the
# vote with the margin alone.
_ROUND_2_STATISTICS: dict[str, tuple[str, ...]] = {
    **_ROUND_1_STATISTICS,
    **{f"{name}+margin": (*stats, "margin@logits") for name, stats in _ROUND_1_STATISTICS.items()},
    "margin": ("vote@last", "margin@logits"),
}
# Round 4: round 2's sets, each also with the high-pass statistic; round 5: each also with the
# log high-pass statistic instead (listed after round 4's: an exact tie keeps round 4's).
_ROUND_5_STATISTICS: dict[str, tuple[str, ...]] = {
    **_ROUND_2_STATISTICS,
    **{f"{name}+hp": (*stats, HIGHPASS_STATISTIC) for name, stats in _ROUND_2_STATISTICS.items()},
    **{
        f"{name}+lhp": (*stats, LOG_HIGHPASS_STATISTIC)
        for name, stats in _ROUND_2_STATISTICS.items()
    },
}
# Round 6: round 5's sets, then each also with the colour noise (+cn), with the flip margin
# (+flip), and with both (listed after round 5's: an exact tie keeps the earlier round's).
_ROUND_6_ADDITIONS: dict[str, tuple[str, ...]] = {
    "+cn": (CHROMA_STATISTIC,),
    "+flip": (FLIP_STATISTIC,),
    "+cn+flip": (CHROMA_STATISTIC, FLIP_STATISTIC),
}
# Round 8: round 5's sets, each also with the doubted flip margin (+dflip), and with the colour
# noise and it (+cn+dflip), listed after round 6's.
_ROUND_8_ADDITIONS: dict[str, tuple[str, ...]] = {
    "+dflip": (DOUBT_STATISTIC,),
    "+cn+dflip": (CHROMA_STATISTIC, DOUBT_STATISTIC),
}
# Round 10: round 5's sets, each also with the median margin (+med), and with the colour noise
# and it (+cn+med), listed after round 8's.
_ROUND_10_ADDITIONS: dict[str, tuple[str, ...]] = {
    "+med": (MEDIAN_STATISTIC,),
    "+cn+med": (CHROMA_STATISTIC, MEDIAN_STATISTIC),
}
# Round 12: round 5's sets, each also with the JPEG margin (+jq), and with the colour noise and
# it (+cn+jq), listed after round 10's.
_ROUND_12_ADDITIONS: dict[str, tuple[str, ...]] = {
    "+jq": (JPEG_STATISTIC,),
    "+cn+jq": (CHROMA_STATISTIC, JPEG_STATISTIC),
}
# Round 13: round 5's sets, each also with the suspect JPEG margin (+sjq), and with the colour
# noise and it (+cn+sjq), listed after round 12's.
_ROUND_13_ADDITIONS: dict[str, tuple[str, ...]] = {
    "+sjq": (SUSPECT_JPEG_STATISTIC,),
    "+cn+sjq": (CHROMA_STATISTIC, SUSPECT_JPEG_STATISTIC),
}
CANDIDATE_STATISTICS: dict[str, tuple[str, ...]] = {
    **_ROUND_5_STATISTICS,
    **{
        f"{name}{suffix}": (*stats, *added)
        for additions in (
            _ROUND_6_ADDITIONS,
            _ROUND_8_ADDITIONS,
            _ROUND_10_ADDITIONS,
            _ROUND_12_ADDITIONS,
            _ROUND_13_ADDITIONS,
        )
        for suffix, added in additions.items()
        for name, stats in _ROUND_5_STATISTICS.items()
    },
}
CANDIDATE_COMBINATIONS: tuple[Combination, ...] = ("fisher", "hmp", "min_p")
DEFAULT_PRESET = "v2"


def forward_passes(statistics: tuple[str, ...]) -> float:
    """How many forward passes of the classifier a detector costs per authentic image: one,
    and for each second pass it reads (the mirrored image's logits, the median-filtered
    image's, the JPEG-squeezed image's) one more, or the ``DOUBTED_SHARE`` of one when only a
    gated statistic reads it: a ``doubt_margin`` of the mirror (the network mirrors just the
    doubted queries) or a ``suspect_margin`` (the pass runs for the suspects alone)."""
    passes = 1.0
    for layer in SECOND_PASS_LAYERS:
        kinds = {s.partition("@")[0] for s in statistics if s.endswith("@" + layer)}
        if kinds:
            doubted = layer == FLIPPED_LOGITS and kinds == {"doubt_margin"}
            passes += DOUBTED_SHARE if doubted or kinds == {"suspect_margin"} else 1.0
    return passes


def candidate_presets() -> dict[str, DetectorPreset]:
    return {
        f"{name}-{combination}": DetectorPreset(statistics, combination)
        for name, statistics in CANDIDATE_STATISTICS.items()
        for combination in CANDIDATE_COMBINATIONS
    }


def _expand_layer(alias: str, model: nn.Module, arch: str) -> list[str]:
    if alias == "last":
        try:
            return residual_blocks(model)[-1:]
        except ModelLoadError:  # not a ResNet: the architecture's pooled last stage
            return [describe_architecture(arch).default_layer]
    if alias == "blocks":
        return residual_blocks(model)
    if alias == "logits":
        return [logits_layer(model)]
    if alias == "stages":  # the last block of each stage: the stage's output
        blocks = residual_blocks(model)
        stage = [b.split(".")[0] for b in blocks]
        return [b for i, b in enumerate(blocks) if i + 1 == len(blocks) or stage[i + 1] != stage[i]]
    return [alias]


def parse_statistics(
    written: tuple[str, ...], model: nn.Module, arch: str, class_k: int = DEFAULT_CLASS_K
) -> list[StatisticSpec]:
    """``kind@layer`` strings (aliases expanded) -> statistic specs, without repeats."""
    describe_architecture(arch)  # an unknown architecture fails here, with its own message
    specs: list[StatisticSpec] = []
    for item in written:
        kind, sep, layer = item.partition("@")
        if not sep or not layer:
            raise ValueError(f"statistic {item!r}: write it kind@layer, e.g. mahalanobis@blocks")
        if kind not in STATISTIC_KINDS:
            raise ValueError(f"statistic {item!r}: kind must be one of {STATISTIC_KINDS}")
        statistic_kind: StatisticKind = kind
        gated = statistic_kind == "doubt_margin"
        for name in _expand_layer(layer, model, arch):
            spec = StatisticSpec(
                kind=statistic_kind,
                layer=name,
                k=class_k if statistic_kind == "knn_distance" else None,
                first_logits=logits_layer(model) if gated else None,
            )
            if spec not in specs:
                specs.append(spec)
    return specs


def resolve(
    preset: str | None,
    statistics: tuple[str, ...],
    combination: Combination | None,
    layers: tuple[str, ...],
    model: nn.Module,
    arch: str,
    class_k: int = DEFAULT_CLASS_K,
) -> tuple[list[StatisticSpec], Combination]:
    """The detector a build asks for. Explicit ``statistics`` win; then explicit ``layers``
    (one vote per layer: the paper's detector, or the earlier multi-layer Fisher bundle); then
    the preset (``v2`` unless told otherwise)."""
    if statistics:
        specs = parse_statistics(statistics, model, arch, class_k)
        how = combination or ("single" if len(specs) == 1 else "hmp")
    elif layers:
        specs = [StatisticSpec(kind="vote", layer=layer) for layer in layers]
        how = combination or ("single" if len(specs) == 1 else "fisher")
    else:
        chosen = preset or DEFAULT_PRESET
        known = {**PRESETS, **candidate_presets()}
        if chosen not in known:
            raise ValueError(f"unknown detector preset {chosen!r}; use one of {sorted(known)}")
        specs = parse_statistics(known[chosen].statistics, model, arch, class_k)
        how = combination or known[chosen].combination
    if (how == "single") != (len(specs) == 1):
        raise ValueError(
            "a single-statistic detector takes no combination, and several statistics need one "
            "(fisher, hmp or min_p)"
        )
    return specs, how
