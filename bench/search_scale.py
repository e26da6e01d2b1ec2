"""Exact k=1000 search at ILSVRC scale: 1.28M x 256 synthetic vectors in a flat index.

Reports ms per query at batch 1 and batch 64 on this machine's CPU (faiss-cpu), through the
project's own search module. Usage: python -m bench.search_scale [--n 1281167] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from app.core import search
from bench.common import write_results


def clustered_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """Gaussian clusters (1000 classes), whitened scale: closer to real features than iid noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, (1000, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    step = 100_000
    for start in range(0, n, step):
        stop = min(start + step, n)
        labels = rng.integers(0, 1000, stop - start)
        out[start:stop] = centres[labels] + rng.normal(0, 0.8, (stop - start, dim))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1_281_167)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    base = clustered_vectors(args.n, args.dim, seed=0)
    index = search.new_index(args.dim, "flat")
    started = time.perf_counter()
    search.add_vectors(index, np.array_split(base, 16))
    add_seconds = time.perf_counter() - started
    queries = clustered_vectors(64 * args.repeats + args.repeats, args.dim, seed=1)
    rows = {}
    for batch in (1, 64):
        search.search(index, queries[:batch], args.k)  # warm-up
        timings = []
        for r in range(args.repeats):
            chunk = queries[r * batch : (r + 1) * batch]
            t0 = time.perf_counter()
            search.search(index, chunk, args.k)
            timings.append(time.perf_counter() - t0)
        per_query_ms = [1000 * t / batch for t in timings]
        rows[batch] = {
            "batch_ms_median": 1000 * float(np.median(timings)),
            "per_query_ms_median": float(np.median(per_query_ms)),
            "per_query_ms_min": float(np.min(per_query_ms)),
        }
    results = {
        "n": args.n,
        "dim": args.dim,
        "k": args.k,
        "index": "flat (exact L2)",
        "faiss": search.faiss_version(),
        "add_seconds": add_seconds,
        "batches": rows,
    }
    table = (
        f"Exact flat index, {args.n:,} x {args.dim} float32, k = {args.k}, faiss "
        f"{search.faiss_version()} on CPU, median of {args.repeats} batches.\n\n"
        "| batch | ms per batch | ms per query | best ms per query |\n|---|---|---|---|\n"
        + "\n".join(
            f"| {b} | {r['batch_ms_median']:.1f} | {r['per_query_ms_median']:.1f} | "
            f"{r['per_query_ms_min']:.1f} |"
            for b, r in rows.items()
        )
    )
    print(write_results("search_scale", results, table).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
