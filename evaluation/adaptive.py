"""An adaptive white-box attack that knows the detector (issue 4, item 4c).

The attacker has the bundle: model, feature processing, indexed training features and labels.
The detector's score of a class is a kNN vote over the k nearest processed training features;
with the neighbours picked by an exact top-k in torch and the weights 1/d^2 (or 1, or 1/rank)
computed from differentiable distances, that vote *is* the detector's score, differentiable
almost everywhere (through the distances of the selected neighbours). PGD-Linf then minimises

    CE(f(x'), target) - weight * sum_layers log(s_layer(x', target) + 1e-6)

so the adversarial is classified as the target class *and* sits among the target class's
training features at every detector layer. Per image the iterate kept is the best one seen:
reaching the target first, then the highest summed log-score.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from app.core import search
from app.core.detector import Detector
from app.core.features import FeatureNetwork
from app.core.processing import FeatureProcessing
from app.core.scoring import ScoreFunction
from evaluation.attacks import AttackOutput


@dataclass(frozen=True)
class SurrogateLayer:
    name: str
    processing: FeatureProcessing
    vectors: torch.Tensor  # (N, d) processed training features (the index's content)
    squared_norms: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,) int64
    k: int
    score_function: ScoreFunction

    @classmethod
    def from_detector(cls, detector: Detector) -> SurrogateLayer:
        vectors = torch.from_numpy(search.stored_vectors(detector.layer.index))
        return cls(
            name=detector.layer.name,
            processing=detector.layer.processing,
            vectors=vectors,
            squared_norms=vectors.pow(2).sum(dim=1),
            labels=torch.from_numpy(detector.labels),
            k=detector.k,
            score_function=detector.score_function,
        )

    def process(self, features: torch.Tensor) -> torch.Tensor:
        """The processing of ``FeatureProcessing.apply``, in torch (differentiable)."""
        p = self.processing
        if p.kind == "none":
            return features
        if p.kind == "l2":
            normalised: torch.Tensor = features / features.norm(dim=1, keepdim=True).clamp_min(
                1e-12
            )
            return normalised
        assert p.mean is not None and p.projection is not None
        mean = torch.from_numpy(p.mean).to(features.dtype)
        projection = torch.from_numpy(p.projection).to(features.dtype)
        return (features - mean) @ projection

    def score(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(n,) kNN score of ``classes`` (same formula as ``app.core.scoring.class_scores``)."""
        z = self.process(features)
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


def adaptive_pgd(
    network: FeatureNetwork,
    layers: list[SurrogateLayer],
    pixels: torch.Tensor,
    target: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    weight: float = 1.0,
    batch_size: int = 250,
    seed: int = 0,
) -> AttackOutput:
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, pixels.shape[0], batch_size):
        x = pixels[start : start + batch_size]
        t = target[start : start + batch_size]
        noise = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
        adv = (x + noise).clamp(0.0, 1.0)
        best = x.clone()
        best_key = torch.full((x.shape[0],), -np.inf, dtype=torch.float64)
        for step in range(steps + 1):
            adv.requires_grad_(True)
            output = network(adv)
            log_score = sum(
                torch.log(layer.score(output.features[layer.name], t) + 1e-6) for layer in layers
            )
            assert isinstance(log_score, torch.Tensor)
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
            adv = adv.detach() - alpha * grad.sign()
            adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0.0, 1.0)
        out.append(best.numpy())
    return AttackOutput(np.concatenate(out).astype(np.float32), time.perf_counter() - started)
