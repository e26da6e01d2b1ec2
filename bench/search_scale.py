"""Exact k=1000 search at ILSVRC scale: 1.28M x 256 synthetic vectors in a flat index.

Reports ms per query at each batch size (1 and 64 by default) through the project's own search
module, with either backend: faiss (``--backend faiss``, CPU with faiss-cpu) or the torch exact
search (``--backend torch --device cuda`` on a GPU). ``--compare-queries N`` also checks that the
backend returns the CPU flat index's neighbours for N queries (``search.compare_neighbours``;
for faiss on the CPU, those of faiss's own k-selection). ``--faiss-own`` also times faiss's own
k-selection in the same run (the project's search selects by a threshold at batches >= 4).
Usage: python -m bench.search_scale [--n 1281167] [--repeats 5] [--faiss-own]
       [--backend torch --device cuda]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from app.cli import at_least
from app.core import search
from bench.common import faiss_selection_only, write_results


def clustered(n: int, dim: int, seed: int, classes: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, cluster labels): Gaussian clusters at whitened scale, closer to real features
    than iid noise (``classes`` centres; the labels say which centre each row came from)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, (classes, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    step = 100_000
    for start in range(0, n, step):
        stop = min(start + step, n)
        labels[start:stop] = rng.integers(0, classes, stop - start)
        out[start:stop] = centres[labels[start:stop]] + rng.normal(0, 0.8, (stop - start, dim))
    return out, labels


def clustered_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    return clustered(n, dim, seed)[0]


def flat_index(
    base: np.ndarray, backend: search.SearchBackend = "faiss", device: str = "cpu"
) -> Any:
    """An exact index over ``base`` on ``backend``; ``device`` "cuda" puts it on the GPU (the
    torch backend always can; faiss only with a GPU build)."""
    if backend == "torch":  # straight from the array: no faiss copy of 1.3 GB on the way
        return search.TorchFlatIndex(base, "cuda" if device == "cuda" else "cpu")
    index = search.new_index(base.shape[1], "flat")
    search.add_vectors(index, np.array_split(base, 16))
    moved, _ = search.to_device(index, device == "cuda", backend)
    return moved


def time_search(
    index: Any, queries: np.ndarray, k: int, batches: Sequence[int], repeats: int
) -> dict[str, dict[str, float]]:
    """Per batch size: one warm-up search, then ``repeats`` searches of distinct query slices.
    A search returns numpy arrays, so every timing includes the device's work to the end."""
    rows: dict[str, dict[str, float]] = {}
    for batch in batches:
        if queries.shape[0] < batch * repeats:
            raise ValueError(f"need {batch * repeats} queries for batch {batch}")
        search.search(index, queries[:batch], k)  # warm-up
        timings = []
        for r in range(repeats):
            chunk = queries[r * batch : (r + 1) * batch]
            t0 = time.perf_counter()
            search.search(index, chunk, k)
            timings.append(time.perf_counter() - t0)
        per_query_ms = [1000 * t / batch for t in timings]
        rows[str(batch)] = {
            "batch_ms_median": 1000 * float(np.median(timings)),
            "per_query_ms_median": float(np.median(per_query_ms)),
            "per_query_ms_min": float(np.min(per_query_ms)),
        }
    return rows


def neighbours_against_flat(
    reference: Any, index: Any, queries: np.ndarray, k: int
) -> dict[str, Any]:
    """``index``'s neighbours against the CPU flat index's for the same queries."""
    return agreement(search.search(reference, queries, k), search.search(index, queries, k))


def agreement(reference: search.SearchResult, found: search.SearchResult) -> dict[str, Any]:
    compared = search.compare_neighbours(reference, found)
    return {**vars(compared), "identical_neighbours": compared.identical_neighbours}


def timing_table(rows: dict[str, dict[str, float]]) -> str:
    return "| batch | ms per batch | ms per query | best ms per query |\n|---|---|---|---|\n" + (
        "\n".join(
            f"| {b} | {r['batch_ms_median']:.2f} | {r['per_query_ms_median']:.3f} | "
            f"{r['per_query_ms_min']:.3f} |"
            for b, r in rows.items()
        )
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--n", type=at_least(1), default=1_281_167, help="indexed vectors (default: %(default)s)"
    )
    parser.add_argument(
        "--dim", type=at_least(1), default=256, help="vector dimensions (default: %(default)s)"
    )
    parser.add_argument(
        "--k", type=at_least(1), default=1000, help="neighbours per query (default: %(default)s)"
    )
    parser.add_argument(
        "--repeats",
        type=at_least(1),
        default=5,
        help="timed searches per batch size (default: %(default)s)",
    )
    parser.add_argument(
        "--batches",
        type=at_least(1),
        nargs="+",
        default=[1, 64],
        help="queries per search, a row each (default: %(default)s)",
    )
    parser.add_argument(
        "--backend",
        choices=search.SEARCH_BACKENDS,
        default="faiss",
        help="search backend (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the index lives (faiss on cuda: a GPU build only) (default: %(default)s)",
    )
    parser.add_argument(
        "--compare-queries", type=at_least(0), default=0, help="check neighbours against CPU flat"
    )
    parser.add_argument(
        "--faiss-own",
        action="store_true",
        help="also time faiss's own k-selection (faiss backend on the CPU), in the same run",
    )
    parser.add_argument("--name", default="search_scale", help="result file name")
    return parser


Rows = dict[str, dict[str, float]]  # per batch size: its timings (``time_search``)


def measure(args: argparse.Namespace) -> tuple[dict[str, Any], Rows, Rows | None]:
    """Build the flat index of clustered vectors, time its searches at each batch size (and,
    with ``--faiss-own``, through faiss's own k-selection), and check neighbours: (results,
    the timed rows, faiss's own rows or None)."""
    base = clustered_vectors(args.n, args.dim, seed=0)
    started = time.perf_counter()
    index = flat_index(base, args.backend, args.device)
    add_seconds = time.perf_counter() - started
    queries = clustered_vectors(max(args.batches) * args.repeats + args.repeats, args.dim, seed=1)
    rows = time_search(index, queries, args.k, args.batches, args.repeats)
    own_rows = None
    if args.faiss_own:
        with faiss_selection_only():
            own_rows = time_search(index, queries, args.k, args.batches, args.repeats)
    results: dict[str, Any] = {
        "n": args.n,
        "dim": args.dim,
        "k": args.k,
        "index": "flat (exact L2)",
        "backend": args.backend,
        "device": args.device,
        "faiss": search.faiss_version(),
        "add_seconds": add_seconds,
        "batches": rows,
    }
    if own_rows is not None:
        results["faiss_own_selection_batches"] = own_rows
    if args.compare_queries:
        probe = queries[: args.compare_queries]
        if args.backend == "faiss" and args.device == "cpu":  # against faiss's own k-selection
            with faiss_selection_only():
                reference = search.search(index, probe, args.k)
            results["neighbours"] = agreement(reference, search.search(index, probe, args.k))
        else:
            results["neighbours"] = neighbours_against_flat(flat_index(base), index, probe, args.k)
    return results, rows, own_rows


def report(args: argparse.Namespace, rows: Rows, own_rows: Rows | None) -> str:
    """The results file's markdown: the timing table, and faiss's own beside it when timed."""
    where = "CPU" if args.device == "cpu" else "GPU"
    table = (
        f"Exact flat index, {args.n:,} x {args.dim} float32, k = {args.k}, {args.backend} "
        f"backend on {where} (faiss {search.faiss_version()}), median of {args.repeats} "
        f"batches.\n\n{timing_table(rows)}"
    )
    if own_rows is not None:
        table += (
            "\n\nThe same index and queries through faiss's own k-selection (the project's search "
            "takes its threshold selection for batches of 4 or more at k above 100: "
            f"app/core/search.py):\n\n{timing_table(own_rows)}"
        )
    return table


def main(argv: list[str] | None = None) -> int:
    """parse -> measure -> report, written to bench/results/<name>.json and .md."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.faiss_own and (args.backend != "faiss" or args.device != "cpu"):
        parser.error("--faiss-own times the faiss backend on the CPU")  # before the index is built
    results, rows, own_rows = measure(args)
    print(write_results(args.name, results, report(args, rows, own_rows)).read_text())
    return 0


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m bench.search_scale"))
