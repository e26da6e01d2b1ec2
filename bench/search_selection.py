"""The vote's exact k-NN search: faiss's own flat search against the threshold selection.

``app.core.search.search`` answers a large-k batch on a CPU flat index with its threshold
selection (faiss's distance matrix, then a sampled threshold and an exact selection: see the
comment above ``_flat_search_by_threshold``) instead of faiss's own reservoir selection. This
benchmark, on a bundle's real features (CIFAR-10 test images through the bundle's model):

1. times both per query at each batch size, one faiss thread (the service's setting), the two
   interleaved in every round so that a noisy machine slows both alike;
2. compares their neighbours (``search.compare_neighbours``: ties may swap, nothing else);
3. scores every image with the bundle's whole detector both ways and counts the decisions at the
   bundle's threshold that differ (the bundle's calibration was computed with faiss's search).

Usage: python -m bench.search_selection [--bundle bundles/cifar10-resnet20] [--images 10000]
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.cli import at_least
from app.core import search
from app.core.guard import Guard
from app.core.statistics import KnnVote
from bench.common import REPO, faiss_selection_only, write_results
from bench.load_service import test_jpegs

SCORING_BATCH = 32


def the_vote(guard: Guard) -> KnnVote:
    votes = [s for s in guard.detector.statistics if isinstance(s, KnnVote)]
    if not votes:
        raise SystemExit("the bundle's detector has no vote")
    return votes[0]


def pixels_of(guard: Guard, jpegs: list[bytes]) -> torch.Tensor:
    return torch.stack(
        [guard.pixels(Image.open(io.BytesIO(data)).convert("RGB")) for data in jpegs]
    )


def score_both_ways(guard: Guard, pixels: torch.Tensor) -> dict[str, Any]:
    """Scores, decisions and the vote's neighbours with the threshold selection and without."""
    vote = the_vote(guard)
    new_scores, old_scores, queries = [], [], []
    agreement = {"positions": 0, "ids_reordered": 0, "ids_unexplained": 0, "out_of_tol": 0}
    max_error = 0.0
    for start in range(0, pixels.shape[0], SCORING_BATCH):
        batch = guard.infer(pixels[start : start + SCORING_BATCH])
        new_scores.append(guard.score(batch))
        processed = vote.layer.processing.apply(batch.features[vote.layer_name])
        queries.append(processed)
        new = search.search(vote.layer.index, processed, vote.k)
        with faiss_selection_only():
            old_scores.append(guard.score(batch))
            old = search.search(vote.layer.index, processed, vote.k)
        compared = search.compare_neighbours(old, new)
        agreement["positions"] += compared.queries * compared.k
        agreement["ids_reordered"] += compared.ids_reordered
        agreement["ids_unexplained"] += compared.ids_unexplained
        agreement["out_of_tol"] += compared.distances_out_of_tolerance
        max_error = max(max_error, compared.max_relative_distance_error)
    new_all, old_all = np.concatenate(new_scores), np.concatenate(old_scores)
    changed = (new_all >= guard.threshold) != (old_all >= guard.threshold)
    return {
        "images": int(new_all.shape[0]),
        "max_abs_score_difference": float(np.abs(new_all - old_all).max()),
        "decisions_changed": int(changed.sum()),
        "accepted_with_selection": int((new_all >= guard.threshold).sum()),
        "accepted_with_faiss_selection": int((old_all >= guard.threshold).sum()),
        "neighbours": {**agreement, "max_relative_distance_error": max_error},
        "queries": np.concatenate(queries),
    }


def ms_per_query(run: Callable[[], object], queries: int, min_s: float) -> float:
    run()  # warm
    calls, start = 0, time.perf_counter()
    while True:
        run()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return elapsed / (calls * queries) * 1e3


def time_both(
    index: Any, queries: np.ndarray, k: int, batches: list[int], rounds: int, min_s: float
) -> dict[str, dict[str, list[float]]]:
    """ms per query of ``search.search`` with faiss's own k-selection and with the threshold
    selection, per batch size, one faiss thread, the two alternating within every round (order
    flipped every round)."""
    search.set_threads(1)
    times: dict[str, dict[str, list[float]]] = {}
    for batch in batches:
        rows = np.ascontiguousarray(queries[:batch])

        def faiss_own(rows: np.ndarray = rows) -> search.SearchResult:
            with faiss_selection_only():
                return search.search(index, rows, k)

        runs = {"faiss": faiss_own, "threshold": lambda rows=rows: search.search(index, rows, k)}
        times[str(batch)] = {name: [] for name in runs}
        for round_ in range(rounds):
            order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
            for name in order:
                times[str(batch)][name].append(ms_per_query(runs[name], batch, min_s))
    return times


def markdown(args: argparse.Namespace, timing: dict[str, Any], scored: dict[str, Any]) -> str:
    lines = [
        f"Bundle `{args.bundle.name}`: the vote's exact k = {timing['k']} search over "
        f"{timing['vectors']:,} x {timing['dim']} indexed features, queries = the vote layer's "
        f"processed features of CIFAR-10 test images. One faiss thread; median of {args.rounds} "
        "rounds, the two searches alternating within each round.",
        "",
        "| batch | faiss's own search, ms per query | threshold selection, ms per query | "
        "speed-up |",
        "| --- | --- | --- | --- |",
    ]
    for batch, row in timing["batches"].items():
        faiss_ms, threshold_ms = row["faiss_median_ms"], row["threshold_median_ms"]
        lines.append(
            f"| {batch} | {faiss_ms:.3f} | {threshold_ms:.3f} | {faiss_ms / threshold_ms:.2f}x |"
        )
    n = scored["neighbours"]
    lines += [
        "",
        f"Batches under {search.THRESHOLD_SELECTION_MIN_QUERIES} queries keep faiss's own search "
        "(`search.search` then calls it: its row is the same code both ways).",
        "",
        f"Neighbours over {scored['images']:,} images x k (`search.compare_neighbours`, "
        f"{n['positions']:,} positions): {n['ids_unexplained']} differ where no tie explains it, "
        f"{n['ids_reordered']} reordered among equal distances, {n['out_of_tol']} distances out "
        f"of tolerance, largest relative distance difference "
        f"{n['max_relative_distance_error']:.2e}.",
        "",
        f"The whole detector, batches of {SCORING_BATCH}: largest score difference "
        f"{scored['max_abs_score_difference']:.2e}; decisions at the bundle's threshold that "
        f"differ: **{scored['decisions_changed']} of {scored['images']:,}** (accepted "
        f"{scored['accepted_with_selection']:,} with the threshold selection, "
        f"{scored['accepted_with_faiss_selection']:,} with faiss's).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bundle",
        type=Path,
        default=REPO / "bundles" / "cifar10-resnet20",
        help="bundle directory (default: the demo's)",
    )
    parser.add_argument(
        "--images",
        type=at_least(1),
        default=10000,
        help="CIFAR-10 test images scored; their vote features are the queries "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--batches",
        type=at_least(1),
        nargs="+",
        default=[1, 4, 8, 16, 32, 64],
        help="queries per search, a row each (default: %(default)s)",
    )
    parser.add_argument(
        "--rounds",
        type=at_least(1),
        default=5,
        help="timing rounds, the two searches alternating in each (default: %(default)s)",
    )
    parser.add_argument("--min-seconds", type=float, default=0.5, help="per timing")
    args = parser.parse_args(argv)
    if args.images < max(args.batches):
        parser.error("--images must cover the largest batch")
    torch.set_num_threads(1)
    guard = Guard.load(args.bundle, device="cpu")
    scored = score_both_ways(guard, pixels_of(guard, test_jpegs(args.images)))
    vote = the_vote(guard)
    raw = time_both(
        vote.layer.index, scored.pop("queries"), vote.k, args.batches, args.rounds, args.min_seconds
    )
    timing = {
        "k": vote.k,
        "vectors": search.index_size(vote.layer.index),
        "dim": int(vote.layer.index.d),
        "batches": {
            batch: {
                "faiss_ms": row["faiss"],
                "threshold_ms": row["threshold"],
                "faiss_median_ms": float(np.median(row["faiss"])),
                "threshold_median_ms": float(np.median(row["threshold"])),
            }
            for batch, row in raw.items()
        },
    }
    results = {"bundle": str(args.bundle), "timing": timing, "scores": scored}
    path = write_results("search_selection", results, markdown(args, timing, scored))
    print(path.read_text())
    return 0


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m bench.search_selection"))
