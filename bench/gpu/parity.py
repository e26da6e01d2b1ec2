"""CUDA parity: the demo bundle on a GPU answers as on the CPU, image by image.

The reference is the bundle as CI runs it: model on the CPU, faiss flat search on the CPU. Each
other configuration (model on cuda with the index left on faiss; model and torch exact search
both on cuda) classifies the same CIFAR-10 test images, and every image is compared:

- predictions and decisions (accepted or rejected) must be identical: that is the requirement;
- the statistics (the kNN vote, each Mahalanobis distance) must agree within
  ``STATISTIC_TOLERANCE`` of each statistic's spread (the std of its values on the bundle's
  held-out authentic images), plus, for the kNN vote, ``BOUNDARY_SWAPS`` *neighbour steps*.
  cuDNN may run convolutions in TF32 on a GPU (PyTorch's default), which moves features by
  ~1e-3 relative; a spread-relative bound is scale-free, so one number serves votes in [0, 1]
  and squared Mahalanobis distances in the hundreds alike. The vote also needs the steps: it
  is a step function of which training features are the k nearest, so any nudge that swaps the
  k-th neighbour for the (k+1)-th moves it by about the k-th's share of the weights
  (``vote_steps``), however small the nudge. Measured ad hoc on the demo bundle (2,000 test
  images), a nudge of the CPU's own features by 1e-7 relative moved the vote by 5.1e-3 of its
  spread and the Mahalanobis distances by < 1e-4; the H200's IEEE float32 forward pass moved
  them by 5.13e-3 and < 4e-5 (bench/results/gpu, 2026-11-30);
- a gated statistic (the doubted flip margin, the suspect JPEG margin) has a value only for the
  queries its gate reads (``NOT_DOUBTED`` elsewhere): its spread is that of the values read, it
  is compared where both configurations read it, and the queries read by one configuration only
  are counted (``gate_disagreements``), not bounded: a query on the gate may fall either side;
- the score (Fisher's combination of empirical p-values) is reported, not bounded: it is a step
  function of the statistics, so a statistic that moves by a hair across one of the reference
  values moves the score by one step. ``p_value_steps`` counts how many reference values any
  statistic crossed (0 or 1 is what rounding can do).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.core.guard import Guard
from app.core.images import decode_image
from app.core.scoring import neighbour_weights
from app.core.search import SearchBackend
from app.core.statistics import NOT_DOUBTED, KnnVote

STATISTIC_TOLERANCE = 1e-3  # of each statistic's spread on held-out authentic images
BOUNDARY_SWAPS = 2  # k-th neighbour steps a vote may move by, beyond the tolerance
BATCH = 256


@dataclass(frozen=True)
class Answers:
    """Everything compared, for every image."""

    predictions: np.ndarray  # (n,)
    accepted: np.ndarray  # (n,) bool
    values: np.ndarray  # (n, S) raw statistics
    p_values: np.ndarray | None  # (n, S), combined detectors only
    scores: np.ndarray  # (n,)


def answers(guard: Guard, pixels: torch.Tensor) -> Answers:
    """The guard's predictions, statistics and scores, in batches of ``BATCH`` images."""
    predictions, values, p_values, scores = [], [], [], []
    for start in range(0, pixels.shape[0], BATCH):
        batch = guard.infer(pixels[start : start + BATCH])
        evidence = guard.evidence(batch)  # a deferred pass (the suspects' JPEG margin) included
        predictions.append(batch.predictions)
        values.append(evidence.values)
        scores.append(evidence.scores)
        if evidence.p_values is not None:
            p_values.append(evidence.p_values)
    score = np.concatenate(scores)
    return Answers(
        predictions=np.concatenate(predictions),
        accepted=score >= guard.threshold,
        values=np.concatenate(values),
        p_values=np.concatenate(p_values) if p_values else None,
        scores=score,
    )


def spreads(guard: Guard, reference: Answers) -> np.ndarray:
    """(S,) each statistic's std on the bundle's held-out authentic images (its reference part),
    over the values its gate read; a single-statistic bundle keeps none, so the std over these
    images stands in."""
    held_out = guard.detector.reference
    values = held_out if held_out is not None else reference.values
    read = values < NOT_DOUBTED
    spread = np.array(
        [values[read[:, i], i].std() if read[:, i].any() else 0.0 for i in range(values.shape[1])]
    )
    floored: np.ndarray = np.maximum(spread, 1e-12)
    return floored


def vote_steps(guard: Guard, pixels: torch.Tensor) -> np.ndarray:
    """(n, S) per image, the share of the weights its k-th nearest neighbour carries in each
    kNN vote (0 for the other statistics): what swapping that neighbour moves the vote by."""
    statistics = guard.detector.statistics
    steps = np.zeros((pixels.shape[0], len(statistics)))
    for start in range(0, pixels.shape[0], BATCH):
        features = guard.infer(pixels[start : start + BATCH]).features
        for column, statistic in enumerate(statistics):
            if isinstance(statistic, KnnVote):
                found = statistic.neighbours(features[statistic.layer_name])
                valid = found.labels >= 0
                weights = neighbour_weights(
                    found.squared_distances, valid, statistic.score_function
                )
                total = np.maximum(weights.sum(axis=1), 1e-300)
                steps[start : start + BATCH, column] = weights[:, -1] / total
    return steps


def compare(
    guard: Guard,
    reference: Answers,
    other: Answers,
    neighbour_steps: np.ndarray,
) -> dict[str, Any]:
    """``neighbour_steps``: ``vote_steps`` of the reference's images."""
    spread = spreads(guard, reference)
    read_by_reference, read_by_other = reference.values < NOT_DOUBTED, other.values < NOT_DOUBTED
    both_read = read_by_reference & read_by_other
    moved = np.where(both_read, np.abs(other.values - reference.values), 0.0) / spread
    allowed = STATISTIC_TOLERANCE + BOUNDARY_SWAPS * neighbour_steps / spread
    same_prediction = other.predictions == reference.predictions
    same_decision = same_prediction & (other.accepted == reference.accepted)
    steps = 0
    if reference.p_values is not None and other.p_values is not None:
        held_out = guard.detector.reference
        assert held_out is not None
        steps = int(
            np.rint(np.abs(other.p_values - reference.p_values) * (len(held_out) + 1)).max()
        )
    within = bool((moved <= allowed).all())
    return {
        "images": int(reference.predictions.size),
        "predictions_identical": int(same_prediction.sum()),
        "decisions_identical": int(same_decision.sum()),
        "all_decisions_identical": bool(same_decision.all()),
        "statistics_max_moved_over_spread": {
            name: float(moved[:, i].max(initial=0.0)) for i, name in enumerate(guard.detector.names)
        },
        "statistics_max_allowed_over_spread": {
            name: float(allowed[:, i].max(initial=0.0))
            for i, name in enumerate(guard.detector.names)
        },
        "statistics_within_tolerance": within,
        "gate_disagreements": {
            name: int((read_by_reference[:, i] != read_by_other[:, i]).sum())
            for i, name in enumerate(guard.detector.names)
        },
        "max_abs_score_difference": float(np.abs(other.scores - reference.scores).max(initial=0)),
        "scores_differing": int((other.scores != reference.scores).sum()),
        "max_p_value_steps": steps,
        "passed": bool(same_decision.all()) and within,
    }


def run(bundle: Path, jpegs: list[bytes], device: str) -> dict[str, Any]:
    """The reference (cpu, faiss) and each ``device`` configuration on the same images."""
    reference_guard = Guard.load(bundle, device="cpu", use_gpu_index=False)
    pixels = torch.stack([reference_guard.pixels(decode_image(data)) for data in jpegs])
    started = time.perf_counter()
    reference = answers(reference_guard, pixels)
    neighbour_steps = vote_steps(reference_guard, pixels)
    configurations: list[tuple[str, SearchBackend]] = [("faiss", "faiss"), ("torch", "torch")]
    rows = [
        {
            "label": "cpu model + faiss flat on cpu (reference)",
            "device": "cpu",
            "search_backend": "faiss",
            "index_device": reference_guard.index_device,
            "seconds": round(time.perf_counter() - started, 2),
        }
    ]
    for name, backend in configurations:
        guard = Guard.load(bundle, device=device, search_backend=backend)
        started = time.perf_counter()
        other = answers(guard, pixels)
        rows.append(
            {
                "label": f"{device} model + {name} search on {guard.index_device}",
                "device": device,
                "search_backend": backend,
                "index_device": guard.index_device,
                "seconds": round(time.perf_counter() - started, 2),
                **compare(guard, reference, other, neighbour_steps),
            }
        )
    compared = rows[1:]
    return {
        "bundle": bundle.name,
        "images": len(jpegs),
        "statistic_tolerance_of_spread": STATISTIC_TOLERANCE,
        "vote_boundary_swaps": BOUNDARY_SWAPS,
        "cudnn_conv_fp32_precision": cudnn_conv_fp32_precision(),
        "accepted_share_reference": float(reference.accepted.mean()),
        "configurations": rows,
        "passed": all(row["passed"] for row in compared),
    }


def cudnn_conv_fp32_precision() -> str:
    """cuDNN's float32 convolution arithmetic outside the model's forward pass: "tf32" is
    PyTorch's default; the forward pass itself runs "ieee" under fp32
    (``app.core.features.ieee_float32_convolutions``). Read through torch's new API only: the
    legacy ``allow_tf32`` getter raises once the two APIs disagree."""
    return str(torch.backends.cudnn.conv.fp32_precision)  # type: ignore[attr-defined]


def table(results: dict[str, Any]) -> str:
    rows = [
        f"| {row['label']} | {row['decisions_identical']} / {row['images']} "
        f"| {row['predictions_identical']} / {row['images']} "
        f"| {max(row['statistics_max_moved_over_spread'].values()):.2e} "
        f"| {row['max_abs_score_difference']:.2e} ({row['scores_differing']} differ) "
        f"| {row['max_p_value_steps']} | {'pass' if row['passed'] else 'FAIL'} |"
        for row in results["configurations"][1:]
    ]
    return (
        f"Demo bundle `{results['bundle']}` on {results['images']} CIFAR-10 test images against "
        "the CPU (model and faiss flat search on the CPU). Pass: every decision identical and "
        f"every statistic within {results['statistic_tolerance_of_spread']:g} of its spread, "
        f"the kNN vote also within {results['vote_boundary_swaps']} steps of its k-th "
        "neighbour's weight per image (a swap at the boundary of the k nearest).\n\n"
        "| configuration | same decisions | same predictions | max statistic moved / spread "
        "| max score difference | p-value steps | |\n| --- | --- | --- | --- | --- | --- | --- |\n"
        + "\n".join(rows)
    )
