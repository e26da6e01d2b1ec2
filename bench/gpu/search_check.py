"""Exact search on the GPU: the same neighbours as the CPU flat index, and its speed at scale.

1. Demo bundle: the bundle's own flat index (the file its manifest lists), searched by faiss on
   the CPU and by the torch backend on the GPU (and by faiss-gpu where it is installed), for the
   processed features of real CIFAR-10 test images at the bundle's k; compared with
   ``search.compare_neighbours`` (distances within 1e-4 relative, ids equal except where
   near-equal distances let neighbours swap; ``ids_reordered`` says how many did).
2. Scale: ``bench.search_scale``'s 1.28M x 256 Gaussian clusters, k = 1000: ms per query at
   each batch size for the torch backend on the GPU, faiss-gpu where installed, and faiss-cpu on
   this machine's CPU (fewer repeats: it is ~1000x slower), plus the neighbours of
   ``compare_queries`` queries against faiss-cpu's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.core import search
from app.core.bundle import read_manifest
from app.core.guard import Guard
from app.core.images import decode_image
from app.core.statistics import KnnVote
from bench.search_scale import (
    clustered,
    clustered_vectors,
    flat_index,
    neighbours_against_flat,
    time_search,
    timing_table,
)

RTOL = 1e-4


def demo_neighbours(bundle: Path, jpegs: list[bytes], device: str) -> dict[str, Any]:
    """Neighbours of real CIFAR-10 test features on the demo bundle's index, per backend."""
    manifest = read_manifest(bundle)
    guard = Guard.load(bundle, device="cpu", use_gpu_index=False)
    vote = next(s for s in guard.detector.statistics if isinstance(s, KnnVote))
    pixels = torch.stack([guard.pixels(decode_image(data)) for data in jpegs])
    features = np.concatenate(
        [
            guard.infer(pixels[i : i + 256]).features[vote.layer.name]
            for i in range(0, len(jpegs), 256)
        ]
    )
    queries = vote.layer.processing.apply(features)
    reference = vote.layer.index
    k = manifest.detector.k
    rows = {}
    for label, backend in backends(device):
        index, placed = search.to_device(reference, device == "cuda", backend)
        rows[f"{label} on {placed}"] = neighbours_against_flat(reference, index, queries, k)
    return {
        "bundle": bundle.name,
        "queries": int(queries.shape[0]),
        "rows": search.index_size(reference),
        "dim": int(queries.shape[1]),
        "k": k,
        "rtol": RTOL,
        "against_cpu_flat": rows,
        "passed": all(row["identical_neighbours"] for row in rows.values()),
    }


def backends(device: str) -> list[tuple[str, search.SearchBackend]]:
    """The exact searches to try on ``device``: torch, and faiss-gpu when faiss has GPUs."""
    chosen: list[tuple[str, search.SearchBackend]] = [("torch", "torch")]
    if device == "cuda" and search.gpu_count() > 0:
        chosen.append(("faiss-gpu", "faiss"))
    return chosen


def at_scale(
    n: int,
    dim: int,
    k: int,
    batches: tuple[int, ...],
    repeats: int,
    cpu_repeats: int,
    compare_queries: int,
    device: str,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Timings and neighbours at ``n`` x ``dim``; also returns the vectors and their cluster
    labels, which the service check indexes next (generated once: ~5 s at 1.28M)."""
    started = time.perf_counter()
    base, labels = clustered(n, dim, seed=0)
    generate_s = time.perf_counter() - started
    queries = clustered_vectors(max(batches) * repeats + repeats, dim, seed=1)
    cpu_flat = flat_index(base)
    timings: dict[str, Any] = {}
    neighbours: dict[str, Any] = {}
    for label, backend in backends(device):
        t0 = time.perf_counter()
        index = flat_index(base, backend, device)
        load_s = time.perf_counter() - t0
        timings[f"{label} ({device})"] = {
            "load_seconds": round(load_s, 2),
            "batches": time_search(index, queries, k, batches, repeats),
        }
        neighbours[f"{label} ({device})"] = neighbours_against_flat(
            cpu_flat, index, queries[:compare_queries], k
        )
        del index
        if device == "cuda":
            torch.cuda.empty_cache()
    timings["faiss-cpu (cpu)"] = {
        "batches": time_search(cpu_flat, queries, k, batches, cpu_repeats),
    }
    results = {
        "n": n,
        "dim": dim,
        "k": k,
        "repeats": repeats,
        "cpu_repeats": cpu_repeats,
        "generate_seconds": round(generate_s, 2),
        "faiss": search.faiss_version(),
        "faiss_gpus": search.gpu_count(),
        "chunk_bytes": search.DEFAULT_CHUNK_BYTES,
        "timings": timings,
        "neighbours_against_cpu_flat": neighbours,
        "passed": all(row["identical_neighbours"] for row in neighbours.values()),
    }
    return results, base, labels


def table(demo: dict[str, Any], scale: dict[str, Any]) -> str:
    demo_rows = "\n".join(
        f"| {name} | {row['distances_out_of_tolerance']} | {row['ids_unexplained']} "
        f"| {row['ids_reordered']} | {row['max_relative_distance_error']:.1e} "
        f"| {'pass' if row['identical_neighbours'] else 'FAIL'} |"
        for name, row in {
            **{f"demo: {k}": v for k, v in demo["against_cpu_flat"].items()},
            **{
                f"{scale['n']:,} x {scale['dim']}: {k}": v
                for k, v in scale["neighbours_against_cpu_flat"].items()
            },
        }.items()
    )
    timing = "\n\n".join(
        f"{name}:\n\n{timing_table(row['batches'])}" for name, row in scale["timings"].items()
    )
    return (
        f"Neighbours against faiss's flat search on the CPU: demo bundle `{demo['bundle']}` "
        f"({demo['rows']:,} x {demo['dim']}, {demo['queries']} CIFAR-10 test queries, "
        f"k = {demo['k']}) and {scale['n']:,} x {scale['dim']} clusters (k = {scale['k']}). "
        f"Pass: distances within {demo['rtol']:g} relative and ids equal wherever distances "
        "are not tied.\n\n"
        "| search | distances off | ids unexplained | ids reordered (ties) | max rel. distance "
        "error | |\n| --- | --- | --- | --- | --- | --- |\n"
        f"{demo_rows}\n\nms per query, {scale['n']:,} x {scale['dim']}, k = {scale['k']} "
        f"(median of {scale['repeats']} batches per device search, "
        f"{scale['cpu_repeats']} for faiss-cpu; "
        "each timing ends with the results in host memory):\n\n"
        f"{timing}"
    )
