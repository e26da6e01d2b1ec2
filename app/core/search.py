"""The one module that imports faiss: build, save, load and search the feature index.

Indexes are exact L2 (``flat``) by default; ``ivf`` (inverted lists over a k-means coarse
quantiser, searched with ``nprobe`` lists) is an option for very large sets. Distances returned
are squared L2, as faiss gives them. On a CUDA machine with a GPU build of faiss, ``to_device``
moves the index to the GPU; GPU indexes are not thread-safe, so exactly one thread (the service's
batch worker, or the builder) must own an index.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

IndexType = Literal["flat", "ivf"]
INDEX_TYPES: tuple[IndexType, ...] = ("flat", "ivf")
GPU_MAX_K = 2048  # faiss GPU k-selection limit


@dataclass(frozen=True)
class SearchResult:
    squared_distances: np.ndarray  # (n, k) float32, ascending; inf where missing
    ids: np.ndarray  # (n, k) int64, -1 where missing


def faiss_version() -> str:
    return str(faiss.__version__)


def gpu_count() -> int:
    """Number of GPUs faiss can use (0 for faiss-cpu builds)."""
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return int(get_num_gpus()) if get_num_gpus is not None else 0


def new_index(
    dim: int,
    index_type: IndexType = "flat",
    nlist: int = 4096,
    training_sample: np.ndarray | None = None,
) -> Any:
    """An empty index, trained when it needs training (IVF: k-means on ``training_sample``)."""
    if index_type == "flat":
        return faiss.IndexFlatL2(dim)
    if index_type != "ivf":
        raise ValueError(f"unknown index type {index_type!r}; use one of {INDEX_TYPES}")
    if training_sample is None or training_sample.shape[0] < nlist:
        raise ValueError(f"IVF with nlist={nlist} needs at least {nlist} training vectors")
    quantizer = faiss.IndexFlatL2(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_L2)
    index.train(np.ascontiguousarray(training_sample, dtype=np.float32))
    return index


def add_vectors(index: Any, chunks: Iterable[np.ndarray]) -> None:
    """Append vectors chunk by chunk (ids are sequential: row i of the labels array)."""
    for chunk in chunks:
        index.add(np.ascontiguousarray(chunk, dtype=np.float32))


def set_nprobe(index: Any, nprobe: int) -> None:
    if hasattr(index, "nprobe"):
        index.nprobe = nprobe
    else:  # GPU clones and wrapped indexes
        ivf = faiss.extract_index_ivf(index) if hasattr(faiss, "extract_index_ivf") else None
        if ivf is not None:
            ivf.nprobe = nprobe


def save_index(index: Any, path: Path) -> None:
    if gpu_count() and hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        index = faiss.index_gpu_to_cpu(index)
    faiss.write_index(index, str(path))


def load_index(path: Path) -> Any:
    return faiss.read_index(str(path))


def to_device(index: Any, use_gpu: bool) -> tuple[Any, str]:
    """Move an index to GPU 0 when asked and possible. Returns (index, "gpu" | "cpu")."""
    if use_gpu and gpu_count() > 0:
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
        gpu_index.referenced_resources = resources  # type: ignore[attr-defined]  # keep alive
        return gpu_index, "gpu"
    return index, "cpu"


def search(index: Any, queries: np.ndarray, k: int) -> SearchResult:
    """k nearest neighbours of each query row; missing results are id -1 with distance inf."""
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise ValueError(f"queries must be (n, {index.d}), got {queries.shape}")
    distances, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    distances = np.where(ids < 0, np.inf, distances).astype(np.float32)
    return SearchResult(squared_distances=distances, ids=ids.astype(np.int64))


@dataclass(frozen=True)
class Neighbours:
    """Nearest training features of each query, with their labels (-1 where missing)."""

    ids: np.ndarray  # (n, k) int64
    labels: np.ndarray  # (n, k) int64
    squared_distances: np.ndarray  # (n, k) float32, ascending; inf where missing

    @classmethod
    def of(cls, found: SearchResult, labels: np.ndarray) -> Neighbours:
        valid = found.ids >= 0
        neighbour_labels = np.where(valid, labels[np.maximum(found.ids, 0)], -1).astype(np.int64)
        return cls(found.ids, neighbour_labels, found.squared_distances)


class ClassIndexes:
    """One exact flat index per class over that class's indexed vectors, for class-conditional
    searches: queries are grouped by the class they are searched in, one search per group.

    Built from a layer's main index (its stored vectors and labels), so a bundle stores each
    layer's vectors once. On a GPU, each class index is moved like any other (``to_device``).
    """

    def __init__(self, indexes: list[Any]) -> None:
        self.indexes = indexes

    @classmethod
    def from_vectors(
        cls, vectors: np.ndarray, labels: np.ndarray, num_classes: int
    ) -> ClassIndexes:
        indexes = []
        for c in range(num_classes):
            index = faiss.IndexFlatL2(vectors.shape[1])
            members = np.ascontiguousarray(vectors[labels == c], dtype=np.float32)
            if members.shape[0] == 0:
                raise ValueError(f"class {c} has no indexed vectors")
            index.add(members)
            indexes.append(index)
        return cls(indexes)

    def to_device(self, use_gpu: bool) -> str:
        device = "cpu"
        for c, index in enumerate(self.indexes):
            self.indexes[c], device = to_device(index, use_gpu)
        return device

    def kth_squared_distance(self, queries: np.ndarray, classes: np.ndarray, k: int) -> np.ndarray:
        """(n,) squared distance of query i to its k-th nearest vector of class ``classes[i]``
        (the farthest one the class has, when it has fewer than k)."""
        if classes.shape != (queries.shape[0],):
            raise ValueError("need one class per query")
        out = np.empty(queries.shape[0], dtype=np.float32)
        for c in np.unique(classes):
            if not 0 <= c < len(self.indexes):
                raise ValueError(f"class {c} out of range")
            rows = np.flatnonzero(classes == c)
            index = self.indexes[int(c)]
            kk = min(k, index_size(index))
            found = search(index, queries[rows], kk)
            out[rows] = found.squared_distances[:, kk - 1]
        return out


def index_size(index: Any) -> int:
    return int(index.ntotal)


def stored_vectors(index: Any) -> np.ndarray:
    """(ntotal, d) float32 copy of the indexed vectors (flat indexes; used by white-box attacks)."""
    if gpu_count() and hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        index = faiss.index_gpu_to_cpu(index)
    if isinstance(index, faiss.IndexIVF):
        index.make_direct_map()
    vectors: np.ndarray = index.reconstruct_n(0, index.ntotal)
    return np.ascontiguousarray(vectors, dtype=np.float32)
