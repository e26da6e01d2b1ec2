"""An adaptive white-box attack that knows the detector (issue 4, item 4c; issue 12).

The attacker has the bundle: model, feature processing, indexed training features, labels, class
densities and the detector's reference values. Every statistic is rebuilt in torch, differentiable
almost everywhere:
- a vote: the neighbours picked by an exact top-k, weights 1/d^2 (or 1, or 1/rank) from
  differentiable distances: that vote *is* the detector's score;
- Mahalanobis: the whitened distance to the target class's mean;
- the class-conditional kNN distance: exact top-k among the target class's processed features;
- the logit margin: the target's logit minus the largest other logit.
PGD-Linf then minimises

    CE(f(x'), target) - weight * (sum_votes log(s(x', target) + 1e-6)
                                  + sum_others min(z(x', target), 1))

where z standardises a distance (or margin) statistic by its authentic reference values (mean,
std): the adversarial is classified as the target class *and* looks authentic to every statistic
(pushing a statistic past one standard deviation above the authentic mean buys nothing). Per
image the iterate kept is the best one seen: reaching the target first, then the highest objective.

``norm="l2"`` is the smooth variant (``adaptive_v2_l2``): PGD-L2 from the photo itself, steps
along the normalised gradient, projected onto the L2 ball. PGD-Linf's random start and signed
steps add a dense +-alpha pattern to every pixel, the very noise v2's high-pass statistic
penalises, so the Linf attack fights its own steps; the L2 attack need not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from app.core import search
from app.core.detector import Detector
from app.core.features import SECOND_PASS_LAYERS, FeatureNetwork
from app.core.processing import FeatureProcessing
from app.core.scoring import ScoreFunction
from app.core.statistics import (
    NOT_DOUBTED,
    ClassKnnDistance,
    DoubtMargin,
    KnnVote,
    Mahalanobis,
    Margin,
    SuspectMargin,
)
from evaluation.attacks import AttackOutput


def _process(processing: FeatureProcessing, features: torch.Tensor) -> torch.Tensor:
    """The processing of ``FeatureProcessing.apply``, in torch (differentiable)."""
    if processing.kind == "none":
        return features
    if processing.kind == "l2":
        normalised: torch.Tensor = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return normalised
    assert processing.mean is not None and processing.projection is not None
    mean = torch.from_numpy(processing.mean).to(features.dtype)
    projection = torch.from_numpy(processing.projection).to(features.dtype)
    return (features - mean) @ projection


@dataclass(frozen=True)
class SurrogateLayer:
    """A vote statistic rebuilt in torch."""

    name: str
    processing: FeatureProcessing
    vectors: torch.Tensor  # (N, d) processed training features (the index's content)
    squared_norms: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,) int64
    k: int
    score_function: ScoreFunction

    @classmethod
    def from_vote(cls, vote: KnnVote) -> SurrogateLayer:
        vectors = torch.from_numpy(search.stored_vectors(vote.layer.index))
        return cls(
            name=vote.layer.name,
            processing=vote.layer.processing,
            vectors=vectors,
            squared_norms=vectors.pow(2).sum(dim=1),
            labels=torch.from_numpy(vote.labels),
            k=vote.k,
            score_function=vote.score_function,
        )

    def objective(self, features: dict[str, torch.Tensor], classes: torch.Tensor) -> torch.Tensor:
        return torch.log(self.score(features[self.name], classes) + 1e-6)

    def score(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(n,) kNN score of ``classes`` (same formula as ``app.core.scoring.class_scores``)."""
        z = _process(self.processing, features)
        d2 = (
            z.pow(2).sum(dim=1, keepdim=True) - 2.0 * z @ self.vectors.T + self.squared_norms
        ).clamp_min(1e-12)
        k = min(self.k, d2.shape[1])
        nearest, ids = torch.topk(d2, k, dim=1, largest=False)
        if self.score_function == "dwknn":
            weights = 1.0 / nearest
        elif self.score_function == "wknn":
            weights = (1.0 / torch.arange(1, k + 1, dtype=d2.dtype)).expand(d2.shape[0], k)
        else:
            weights = torch.ones_like(nearest)
        matches = (self.labels[ids] == classes[:, None]).to(weights.dtype)
        return (weights * matches).sum(dim=1) / weights.sum(dim=1)


@dataclass(frozen=True)
class SurrogateDistance:
    """A Mahalanobis or class-conditional kNN distance statistic rebuilt in torch, standardised
    by its authentic reference values."""

    name: str
    layer: str
    processing: FeatureProcessing | None  # knn_distance: the layer's processing
    means: torch.Tensor | None  # mahalanobis: (C, d)
    whitener: torch.Tensor | None  # mahalanobis: (d, d)
    class_vectors: list[torch.Tensor] | None  # knn_distance: per class (N_c, d)
    k: int
    reference_mean: float
    reference_std: float

    def values(self, features: dict[str, torch.Tensor], classes: torch.Tensor) -> torch.Tensor:
        """(n,) the statistic (higher = more authentic), as app.core.statistics computes it."""
        x = features[self.layer].double()
        if self.means is not None and self.whitener is not None:
            whitened = (x - self.means[classes]) @ self.whitener
            return -whitened.pow(2).sum(dim=1)
        assert self.processing is not None and self.class_vectors is not None
        z = _process(self.processing, x)
        out = torch.empty(x.shape[0], dtype=x.dtype)
        for c in torch.unique(classes).tolist():
            rows = (classes == c).nonzero().squeeze(1)
            vectors = self.class_vectors[c]
            zc = z[rows]
            d2 = (
                zc.pow(2).sum(dim=1, keepdim=True)
                - 2.0 * zc @ vectors.T
                + vectors.pow(2).sum(dim=1)
            ).clamp_min(0.0)
            kk = min(self.k, vectors.shape[0])
            out = out.index_put((rows,), -d2.topk(kk, dim=1, largest=False).values[:, -1])
        return out

    def objective(self, features: dict[str, torch.Tensor], classes: torch.Tensor) -> torch.Tensor:
        return _capped_z(self.values(features, classes), self.reference_mean, self.reference_std)


def _capped_z(values: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """A statistic standardised by its authentic reference values, capped at +1 std: looking
    more authentic than that buys the attacker nothing."""
    return ((values - mean) / std).clamp(max=1.0)


@dataclass(frozen=True)
class SurrogateMargin:
    """The logit margin statistic in torch, standardised by its authentic reference values."""

    name: str
    layer: str  # the layer whose output is the logits
    reference_mean: float
    reference_std: float

    def values(self, features: dict[str, torch.Tensor], classes: torch.Tensor) -> torch.Tensor:
        """(n,) logit of ``classes`` minus the largest other logit (as ``logit_margins``)."""
        logits = features[self.layer].double()
        own = logits.gather(1, classes[:, None]).squeeze(1)
        chosen = F.one_hot(classes, logits.shape[1]).bool()
        return own - logits.masked_fill(chosen, -torch.inf).amax(dim=1)

    def objective(self, features: dict[str, torch.Tensor], classes: torch.Tensor) -> torch.Tensor:
        return _capped_z(self.values(features, classes), self.reference_mean, self.reference_std)


Surrogate = SurrogateLayer | SurrogateDistance | SurrogateMargin


def second_passes_read(layers: list[Surrogate]) -> frozenset[str]:
    """The second passes whose logits a surrogate reads (``flip.logits`` for the flip margin,
    ``median.logits`` for the median margin): the attack pays for those of the network's second
    passes only (none for statistics of the first pass)."""
    return frozenset(
        s.layer for s in layers if isinstance(s, SurrogateMargin) and s.layer in SECOND_PASS_LAYERS
    )


def surrogates(detector: Detector) -> list[Surrogate]:
    """Every statistic of ``detector`` rebuilt in torch."""
    out: list[Surrogate] = []
    for column, statistic in enumerate(detector.statistics):
        if isinstance(statistic, KnnVote):
            out.append(SurrogateLayer.from_vote(statistic))
            continue
        if detector.reference is None:
            raise ValueError("a distance statistic needs the detector's reference values")
        reference = detector.reference[:, column]
        if isinstance(statistic, DoubtMargin | SuspectMargin):  # scaled by the margins read
            reference = reference[reference < NOT_DOUBTED]
            reference = reference if reference.size else np.zeros(1)
        scale = dict(
            reference_mean=float(reference.mean()),
            reference_std=float(max(reference.std(), 1e-12)),
        )
        if isinstance(statistic, Margin | DoubtMargin | SuspectMargin):
            # a doubted flip margin as the flip margin itself, a suspect JPEG margin as the JPEG
            # margin: raising it helps the attacker whether or not the query ends in doubt
            name = f"{statistic.kind}@{statistic.layer_name}"
            out.append(SurrogateMargin(name, statistic.layer_name, **scale))
        elif isinstance(statistic, Mahalanobis):
            out.append(
                SurrogateDistance(
                    name=f"mahalanobis@{statistic.layer_name}",
                    layer=statistic.layer_name,
                    processing=None,
                    means=torch.from_numpy(statistic.density.means),
                    whitener=torch.from_numpy(statistic.density.whitener),
                    class_vectors=None,
                    k=0,
                    **scale,
                )
            )
        else:
            assert isinstance(statistic, ClassKnnDistance)
            out.append(
                SurrogateDistance(
                    name=f"knn_distance@{statistic.layer_name}",
                    layer=statistic.layer_name,
                    processing=statistic.layer.processing,
                    means=None,
                    whitener=None,
                    class_vectors=[
                        torch.from_numpy(search.stored_vectors(index)).double()
                        for index in statistic.class_indexes.indexes
                    ],
                    k=statistic.k,
                    **scale,
                )
            )
    return out


def _step(
    adv: torch.Tensor,
    grad: torch.Tensor,
    x: torch.Tensor,
    eps: float,
    alpha: float,
    norm: Literal["linf", "l2"],
) -> torch.Tensor:
    """One descent step of ``alpha`` in the norm's steepest direction, projected back onto the
    norm's ball of radius ``eps`` around ``x`` and onto [0, 1]."""
    if norm == "linf":
        stepped = adv - alpha * grad.sign()
        projected: torch.Tensor = torch.min(torch.max(stepped, x - eps), x + eps)
        return projected.clamp(0.0, 1.0)
    grad_norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    delta = adv - alpha * grad / grad_norms - x
    delta_norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    delta = delta * delta_norms.clamp_min(eps).reciprocal() * eps  # inside the ball: unchanged
    moved: torch.Tensor = x + delta
    return moved.clamp(0.0, 1.0)


def adaptive_pgd(
    network: FeatureNetwork,
    layers: list[Surrogate],
    pixels: torch.Tensor,
    target: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    weight: float = 1.0,
    batch_size: int = 250,
    seed: int = 0,
    norm: Literal["linf", "l2"] = "linf",
) -> AttackOutput:
    """PGD on the objective above: Linf (random start, signed steps) or L2 (from the photo,
    normalised-gradient steps, L2-ball projection)."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    second_passes = second_passes_read(layers)  # the network runs only the passes read
    out = []
    for start in range(0, pixels.shape[0], batch_size):
        x = pixels[start : start + batch_size]
        t = target[start : start + batch_size]
        if norm == "linf":
            noise = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
            adv = (x + noise).clamp(0.0, 1.0)
        else:
            adv = x.clone()
        best = x.clone()
        best_key = torch.full((x.shape[0],), -np.inf, dtype=torch.float64)
        for step in range(steps + 1):
            adv.requires_grad_(True)
            output = network(adv, second_passes=second_passes)
            log_score = sum(
                (layer.objective(output.features, t) for layer in layers),
                torch.zeros(x.shape[0], dtype=torch.float64),  # no statistic: plain PGD
            )
            reached = output.logits.argmax(dim=1) == t
            # reaching the target dominates; among those, the highest detector score
            key = reached.double() * 1e3 + log_score.detach().double()
            better = key > best_key
            best[better] = adv.detach()[better]
            best_key = torch.where(better, key, best_key)
            if step == steps:
                break
            loss = F.cross_entropy(output.logits, t, reduction="sum") - weight * log_score.sum()
            (grad,) = torch.autograd.grad(loss, adv)
            adv = _step(adv.detach(), grad, x, eps, alpha, norm)
        out.append(best.numpy())
    return AttackOutput(np.concatenate(out).astype(np.float32), time.perf_counter() - started)
