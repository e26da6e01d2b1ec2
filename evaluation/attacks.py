"""Targeted attacks on the bundle's classifier, all in pixel space [0, 1].

- FGSM (Goodfellow et al.): one signed-gradient step *down* the cross-entropy of the target.
- Box-constrained L-BFGS (Szegedy et al., paper Section 3.2, Eq. 1): minimise
  ||eta||^2 + C * H(f(x + eta), target) inside the pixel box with scipy's L-BFGS-B over torch
  gradients; a coarse grid on C (ascending: each image keeps the first C that reaches the
  target), then a per-image binary (geometric) search between the last failing and the first
  succeeding C. The squared norm keeps the objective smooth at eta = 0, as in Szegedy et al.'s
  and Tabacof & Valle's implementations. A whole batch is one L-BFGS-B problem: the objective
  is a sum of per-image terms (each with its own C), so its minimiser is every image's minimiser.
- PGD-Linf and CW-L2 from torchattacks, targeted by label.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import fmin_l_bfgs_b
from torch import nn

from app.core.features import FeatureNetwork


class LogitsModel(nn.Module):
    """The feature network seen as a plain classifier (pixels in [0, 1] -> logits)."""

    def __init__(self, network: FeatureNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network.classify(pixels)


@dataclass(frozen=True)
class AttackOutput:
    adversarial: np.ndarray  # (n, 3, H, W) float32 in [0, 1]
    seconds: float


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def predict(model: nn.Module, pixels: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for part in _batches(pixels.shape[0], batch_size):
            out.append(model(pixels[part]).argmax(dim=1).cpu().numpy())
    return np.concatenate(out).astype(np.int64)


def _fgsm(
    model: nn.Module,
    pixels: torch.Tensor,
    classes: torch.Tensor,
    step: float,
    batch_size: int,
) -> AttackOutput:
    """One signed-gradient step of size |step| on the cross-entropy of ``classes``: negative
    ``step`` descends it (towards a target), positive ascends it (away from the true class)."""
    started = time.perf_counter()
    out = []
    for part in _batches(pixels.shape[0], batch_size):
        x = pixels[part].clone().requires_grad_(True)
        loss = F.cross_entropy(model(x), classes[part], reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
        out.append((x.detach() + step * grad.sign()).clamp(0.0, 1.0).numpy())
    return AttackOutput(np.concatenate(out).astype(np.float32), time.perf_counter() - started)


def fgsm_targeted(
    model: nn.Module, pixels: torch.Tensor, target: torch.Tensor, eps: float, batch_size: int = 250
) -> AttackOutput:
    return _fgsm(model, pixels, target, -eps, batch_size)


def fgsm_untargeted(
    model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, eps: float, batch_size: int = 250
) -> AttackOutput:
    """One step up the true class's cross-entropy: the commonest attack in the wild."""
    return _fgsm(model, pixels, labels, eps, batch_size)


def _lbfgs_run(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    c: np.ndarray,
    maxiter: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One L-BFGS-B solve for a batch with per-image C. Returns (adversarial, reached target)."""
    shape = x.shape
    x0 = x.detach().numpy().astype(np.float64).ravel()
    c_t = torch.from_numpy(c.astype(np.float32))

    def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
        adv = torch.from_numpy(flat.astype(np.float32)).view(shape).requires_grad_(True)
        eta = adv - x
        ce = F.cross_entropy(model(adv), target, reduction="none")
        loss = (eta.flatten(1).pow(2).sum(dim=1) + c_t * ce).sum()
        (grad,) = torch.autograd.grad(loss, adv)
        return float(loss.detach()), grad.numpy().astype(np.float64).ravel()

    bounds = np.zeros((x0.size, 2))
    bounds[:, 1] = 1.0
    solution, _, _ = fmin_l_bfgs_b(objective, x0, bounds=bounds, maxiter=maxiter)
    adv = solution.astype(np.float32).reshape(shape)
    with torch.inference_mode():
        reached = model(torch.from_numpy(adv)).argmax(dim=1) == target
    return adv, reached.numpy()


def _lbfgs_batch(
    model: nn.Module,
    x_all: torch.Tensor,
    t_all: torch.Tensor,
    c_grid: tuple[float, ...],
    binary_steps: int,
    maxiter: int,
    progress: Callable[[str], None] | None,
) -> np.ndarray:
    n = x_all.shape[0]
    best = x_all.numpy().astype(np.float32).copy()
    best_norm = np.full(n, np.inf)
    low = np.zeros(n)  # largest C known to fail
    high = np.full(n, np.inf)  # smallest C known to succeed

    def attempt(rows: np.ndarray, c: np.ndarray) -> None:
        index = torch.from_numpy(rows)
        adv, reached = _lbfgs_run(model, x_all[index], t_all[index], c, maxiter)
        norms = np.sqrt(((adv - x_all[index].numpy()) ** 2).reshape(len(rows), -1).sum(1))
        for j, row in enumerate(rows):
            if reached[j]:
                high[row] = min(high[row], c[j])
                if norms[j] < best_norm[row]:
                    best_norm[row], best[row] = norms[j], adv[j]
            else:
                low[row] = max(low[row], c[j])

    for c_value in c_grid:
        pending = np.flatnonzero(~np.isfinite(high))
        if pending.size == 0:
            break
        attempt(pending, np.full(pending.size, c_value))
        if progress:
            progress(f"L-BFGS grid C={c_value:g}: {int(np.isfinite(high).sum())}/{n} found")
    for step in range(binary_steps):
        rows = np.flatnonzero(np.isfinite(high))
        if rows.size == 0:
            break
        lo = np.where(low[rows] > 0, low[rows], high[rows] / 10.0)
        attempt(rows, np.sqrt(lo * high[rows]))
        if progress:
            progress(f"L-BFGS binary step {step + 1}/{binary_steps}")
    return best


def lbfgs_targeted(
    model: nn.Module,
    pixels: torch.Tensor,
    target: torch.Tensor,
    c_grid: tuple[float, ...],
    binary_steps: int,
    maxiter: int,
    batch_size: int = 250,
    progress: Callable[[str], None] | None = None,
) -> AttackOutput:
    """Smallest-L2 targeted adversarials; images never reaching the target are returned as is."""
    started = time.perf_counter()
    result = pixels.detach().numpy().astype(np.float32).copy()
    for part in _batches(pixels.shape[0], batch_size):
        result[part] = _lbfgs_batch(
            model, pixels[part], target[part], c_grid, binary_steps, maxiter, progress
        )
    return AttackOutput(result, time.perf_counter() - started)


def torchattacks_run(
    attack: object,
    pixels: torch.Tensor,
    classes: torch.Tensor,
    targeted: bool,
    batch_size: int = 250,
) -> AttackOutput:
    """Run a torchattacks attack (already configured) towards ``classes`` (targeted) or away
    from them (the true labels, untargeted)."""
    started = time.perf_counter()
    if targeted:
        attack.set_mode_targeted_by_label(quiet=True)  # type: ignore[attr-defined]
    out = []
    for part in _batches(pixels.shape[0], batch_size):
        adv = attack(pixels[part], classes[part])  # type: ignore[operator]
        out.append(adv.detach().cpu().numpy())
    return AttackOutput(np.concatenate(out).astype(np.float32), time.perf_counter() - started)


def pgd_targeted(
    model: nn.Module,
    pixels: torch.Tensor,
    target: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    batch_size: int = 250,
) -> AttackOutput:
    """PGD-Linf towards ``target`` (the reported targeted PGD sets)."""
    return _pgd("linf", model, pixels, target, True, eps, alpha, steps, batch_size)


def _pgd(
    norm: Literal["linf", "l2"],
    model: nn.Module,
    pixels: torch.Tensor,
    classes: torch.Tensor,
    targeted: bool,
    eps: float,
    alpha: float,
    steps: int,
    batch_size: int,
) -> AttackOutput:
    """torchattacks' PGD (Linf) or PGDL2, random start, towards or away from ``classes``."""
    import torchattacks

    kind = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    attack = kind(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
    return torchattacks_run(attack, pixels, classes, targeted, batch_size)


def cw_targeted(
    model: nn.Module,
    pixels: torch.Tensor,
    target: torch.Tensor,
    c: float,
    kappa: float,
    steps: int,
    lr: float,
    batch_size: int = 250,
) -> AttackOutput:
    import torchattacks

    attack = torchattacks.CW(model, c=c, kappa=kappa, steps=steps, lr=lr)
    return torchattacks_run(attack, pixels, target, True, batch_size)


def deepfool_untargeted(
    model: nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 50,
    overshoot: float = 0.02,
    batch_size: int = 250,
) -> AttackOutput:
    """DeepFool (Moosavi-Dezfooli et al. 2016): the smallest L2 step across the nearest linearised
    decision boundary, repeated; adversarials end just past the boundary (torchattacks)."""
    import torchattacks

    attack = torchattacks.DeepFool(model, steps=steps, overshoot=overshoot)
    return torchattacks_run(attack, pixels, labels, False, batch_size)


def perturbation_norms(adversarial: np.ndarray, original: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-image (L2, Linf) norms of the perturbation, in [0, 1] pixel units."""
    delta = (adversarial.astype(np.float64) - original.astype(np.float64)).reshape(
        adversarial.shape[0], -1
    )
    return np.sqrt((delta**2).sum(axis=1)), np.abs(delta).max(axis=1)


def pgd_untargeted(
    model: nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    batch_size: int = 250,
) -> AttackOutput:
    """Untargeted PGD-Linf away from ``labels`` (the reported untargeted PGD sets)."""
    return _pgd("linf", model, pixels, labels, False, eps, alpha, steps, batch_size)


def pgd_l2_untargeted(
    model: nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    batch_size: int = 250,
) -> AttackOutput:
    """Untargeted PGD-L2: the reported PGD-L2 sets, and since round 7 a selection attack (on
    the selection images)."""
    return _pgd("l2", model, pixels, labels, False, eps, alpha, steps, batch_size)


def pgd_l2_targeted(
    model: nn.Module,
    pixels: torch.Tensor,
    target: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    batch_size: int = 250,
) -> AttackOutput:
    """PGD-L2 towards ``target`` (the selection's L2 attack since round 6; no reported set
    uses it)."""
    return _pgd("l2", model, pixels, target, True, eps, alpha, steps, batch_size)
