"""The paper's figures: ROC per set (Fig. 2), rates against the threshold (Fig. 3), densities
(Fig. 4). Matplotlib with the Agg backend, PNG output."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from evaluation.metrics import auroc, roc_curve

_FLOOR = 1e-5  # scores of 0 drawn at this value on log axes


def plot_roc(authentic: np.ndarray, sets: dict[str, np.ndarray], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, scores in sets.items():
        roc = roc_curve(authentic, scores)
        ax.plot(roc.fpr, roc.tpr, label=f"{name} (AUROC {auroc(authentic, scores):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate (set accepted)")
    ax.set_ylabel("true positive rate (authentic correct accepted)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rates(
    authentic: np.ndarray,
    sets: dict[str, np.ndarray],
    title: str,
    path: Path,
    operating_threshold: float | None = None,
) -> None:
    """Share of each set accepted (score >= t) against the threshold t, log x axis."""
    everything = np.concatenate([authentic, *sets.values()])
    low = max(float(np.maximum(everything, _FLOOR).min()), _FLOOR)
    grid = np.logspace(np.log10(low), 0.0, 300)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))

    def accepted(scores: np.ndarray) -> np.ndarray:
        share: np.ndarray = (scores[None, :] >= grid[:, None]).mean(axis=1)
        return share

    ax.plot(grid, accepted(authentic), color="black", linewidth=2, label="TPR authentic")
    for name, scores in sets.items():
        ax.plot(grid, accepted(scores), label=f"FPR {name}")
    if operating_threshold is not None:
        ax.axvline(operating_threshold, color="grey", linestyle="--", linewidth=1)
        ax.annotate(
            "bundle threshold", (operating_threshold, 0.02), fontsize=7, rotation=90, color="grey"
        )
    ax.set_xscale("log")
    ax.set_xlabel("threshold on the score s(x, f(x))")
    ax.set_ylabel("share accepted")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_densities(
    authentic: np.ndarray, sets: dict[str, np.ndarray], title: str, path: Path
) -> None:
    """Histogram densities of log10(score) per set."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    everything = np.log10(np.maximum(np.concatenate([authentic, *sets.values()]), _FLOOR))
    bins = np.linspace(everything.min(), 0.0, 50).tolist()
    ax.hist(
        np.log10(np.maximum(authentic, _FLOOR)),
        bins=bins,
        density=True,
        histtype="stepfilled",
        alpha=0.3,
        color="black",
        label="authentic",
    )
    for name, scores in sets.items():
        ax.hist(
            np.log10(np.maximum(scores, _FLOOR)),
            bins=bins,
            density=True,
            histtype="step",
            linewidth=1.5,
            label=name,
        )
    ax.set_xlabel("log10 score s(x, f(x))")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
