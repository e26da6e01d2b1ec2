"""The one module that imports faiss: build, save, load and search the feature index.

Indexes are exact L2 (``flat``) by default; ``ivf`` (inverted lists over a k-means coarse
quantiser, searched with ``nprobe`` lists) is an option for very large sets. Distances returned
are squared L2, as faiss gives them. On a CUDA machine with a GPU build of faiss, ``to_device``
moves the index to the GPU; GPU indexes are not thread-safe, so exactly one thread (the service's
batch worker, or the builder) must own an index.

Two search backends (``SearchBackend``): ``faiss`` (the default, as above) and ``torch``, an
exact flat search by matmul + top-k over the vectors held in a torch tensor on the CPU or a
CUDA device (``TorchFlatIndex``). The torch backend exists because faiss-gpu is a large,
CUDA-specific wheel that is not always installable next to a given torch build, while torch
alone already reaches the GPU: the same bundle files, searched exactly on whichever device the
model runs on. Bundles always store faiss indexes; ``to_device(..., backend="torch")`` turns a
loaded flat index into a ``TorchFlatIndex``, and every function here accepts either kind.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import torch

IndexType = Literal["flat", "ivf"]
INDEX_TYPES: tuple[IndexType, ...] = ("flat", "ivf")
SearchBackend = Literal["faiss", "torch"]
SEARCH_BACKENDS: tuple[SearchBackend, ...] = ("faiss", "torch")
GPU_MAX_K = 2048  # faiss GPU k-selection limit
# Largest (queries x database rows) float32 distance block the torch backend holds at once: the
# database is scanned in chunks of rows sized to this, so memory stays bounded whatever its size
# (1.28M rows x 256 queries would be 1.3 GB in one block).
DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class SearchResult:
    squared_distances: np.ndarray  # (n, k) float32, ascending; inf where missing
    ids: np.ndarray  # (n, k) int64, -1 where missing


@contextmanager
def _full_float32(device: torch.device) -> Iterator[None]:
    """Distances in true float32: no TF32 or reduced-precision matmul passes (a global torch
    setting someone may lower for the model's speed) and no autocast (the service may run the
    model under bf16/fp16 autocast). Lower precision would reorder close neighbours."""
    previous = torch.get_float32_matmul_precision()
    if previous != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        if previous != "highest":
            torch.set_float32_matmul_precision(previous)


class TorchFlatIndex:
    """Exact squared-L2 k-NN over vectors held in a torch tensor, on the CPU or a CUDA device.

    Distances are ||q||^2 - 2 q.x + ||x||^2 (one matmul per block, faiss's own formula for
    batched flat search), clamped at 0, then ``torch.topk`` keeps the k smallest of each block
    and a running merge keeps the k best over all blocks. Blocks are chunks of database rows
    sized so one (queries x rows) distance block stays under ``max_chunk_bytes``. Results are
    sorted ascending, equal distances by smaller id; but of several vectors tied at the k-th
    distance, which are kept is ``torch.topk``'s choice, not always the smaller ids as in
    ``_flat_search_by_threshold`` (``NeighbourAgreement`` allows for it). Same interface as the
    faiss indexes this module uses (``d``, ``ntotal``, ``add``); like a faiss GPU index, one
    thread must own it.
    """

    def __init__(
        self,
        vectors: np.ndarray | torch.Tensor,
        device: str | torch.device = "cpu",
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be (n, d), got {tuple(vectors.shape)}")
        if max_chunk_bytes < 4:
            raise ValueError("max_chunk_bytes must hold at least one distance")
        self.max_chunk_bytes = max_chunk_bytes
        self._device = torch.device(device)
        self.vectors = self._tensor(vectors)
        self.squared_norms = (self.vectors * self.vectors).sum(dim=1)

    def _tensor(self, rows: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(rows, np.ndarray):
            rows = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
        return rows.to(device=self._device, dtype=torch.float32).contiguous()

    @classmethod
    def from_faiss(
        cls,
        index: Any,
        device: str | torch.device = "cpu",
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> TorchFlatIndex:
        """The vectors of an exact L2 faiss index; approximate (IVF) or other-metric indexes are
        refused, since an exact search over them would answer differently from the bundle."""
        if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_L2:
            kind = type(index).__name__
            raise ValueError(f"the torch backend searches exact L2 (flat) indexes only, not {kind}")
        return cls(stored_vectors(index), device, max_chunk_bytes)

    @property
    def d(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def ntotal(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: str | torch.device) -> TorchFlatIndex:
        return TorchFlatIndex(self.vectors, device, self.max_chunk_bytes)

    def add(self, rows: np.ndarray) -> None:
        """Append rows (ids continue sequentially, as with faiss)."""
        if rows.ndim != 2 or rows.shape[1] != self.d:
            raise ValueError(f"rows must be (n, {self.d}), got {rows.shape}")
        added = self._tensor(rows)
        self.vectors = torch.cat([self.vectors, added])
        self.squared_norms = torch.cat([self.squared_norms, (added * added).sum(dim=1)])

    def rows_per_chunk(self, n_queries: int) -> int:
        return max(1, self.max_chunk_bytes // (4 * max(n_queries, 1)))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids) like ``faiss.Index.search``: (n, k) ascending, -1 ids where missing."""
        n = queries.shape[0]
        if k <= 0:
            raise ValueError("k must be positive")
        with torch.inference_mode(), _full_float32(self._device):
            q = self._tensor(queries)
            best_d = torch.empty((n, 0), dtype=torch.float32, device=self._device)
            best_i = torch.empty((n, 0), dtype=torch.int64, device=self._device)
            step = self.rows_per_chunk(n)
            for start in range(0, self.ntotal, step):
                block_d, block_i = self._block(q, start, min(start + step, self.ntotal), k)
                best_d, best_i = _keep_smallest(
                    torch.cat([best_d, block_d], dim=1), torch.cat([best_i, block_i], dim=1), k
                )
            best_d, best_i = _sorted_by_distance_then_id(best_d, best_i)
            distances = best_d.cpu().numpy()
            ids = best_i.cpu().numpy()
        if ids.shape[1] < k:  # fewer vectors than k: faiss's padding
            missing = k - ids.shape[1]
            distances = np.pad(distances, ((0, 0), (0, missing)), constant_values=np.inf)
            ids = np.pad(ids, ((0, 0), (0, missing)), constant_values=-1)
        return distances.astype(np.float32), ids.astype(np.int64)

    def _block(
        self, q: torch.Tensor, start: int, stop: int, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k smallest squared distances of every query to rows ``start:stop`` (unsorted)."""
        rows = self.vectors[start:stop]
        # one (queries x rows) block: ||x||^2 - 2 q.x, then + ||q||^2 and the clamp in place
        distances = torch.addmm(self.squared_norms[start:stop], q, rows.T, alpha=-2.0)
        distances.add_((q * q).sum(dim=1, keepdim=True)).clamp_(min=0.0)
        kept = min(k, stop - start)
        values, positions = torch.topk(distances, kept, dim=1, largest=False, sorted=False)
        return values, positions + start


def _keep_smallest(
    distances: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if distances.shape[1] <= k:
        return distances, ids
    values, positions = torch.topk(distances, k, dim=1, largest=False, sorted=False)
    return values, torch.gather(ids, 1, positions)


def _sorted_by_distance_then_id(
    distances: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending distance; equal distances by ascending id (a deterministic order for ties)."""
    by_id = torch.argsort(ids, dim=1)
    distances, ids = torch.gather(distances, 1, by_id), torch.gather(ids, 1, by_id)
    order = torch.sort(distances, dim=1, stable=True).indices
    return torch.gather(distances, 1, order), torch.gather(ids, 1, order)


def faiss_version() -> str:
    return str(faiss.__version__)


# faiss's OpenMP threads for CPU searches in a serving process (``set_threads``). A flat search
# of a serving batch splits its queries (or, for one query, the vectors) over threads; on cores
# the model's forward pass and the web server also use, a second thread cost more CPU than it
# saved time: bench/results/service_vs_bare.md compares the two in one run.
SERVING_THREADS = 1


def set_threads(threads: int) -> None:
    """OpenMP threads of the faiss CPU searches the *calling thread* makes: OpenMP keeps the
    setting per thread, so the thread that searches (the service's batch worker) calls it.
    GPU indexes ignore it. Neighbours do not depend on it; distances may, by float rounding:
    faiss's own batched search gave identical scores at 1 and 2 threads (demo bundle, batches of
    2 to 128), while the threshold selection's matrix product (``_flat_search_by_threshold``)
    rounds by under 1e-6 relative differently. A lone query takes another faiss kernel than a
    batch at any thread count, and its float32 distances round differently: statistics moved by
    under 2e-3, no decision of 1,000 CIFAR-10 test images changed."""
    if threads < 1:
        raise ValueError(f"search threads must be at least 1, got {threads}")
    faiss.omp_set_num_threads(threads)


def threads() -> int:
    """The OpenMP threads the calling thread's faiss CPU searches use."""
    return int(faiss.omp_get_max_threads())


def gpu_count() -> int:
    """Number of GPUs faiss can use (0 for faiss-cpu builds)."""
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return int(get_num_gpus()) if get_num_gpus is not None else 0


def new_index(
    dim: int,
    index_type: IndexType = "flat",
    nlist: int = 4096,
    training_sample: np.ndarray | None = None,
    backend: SearchBackend = "faiss",
) -> Any:
    """An empty index, trained when it needs training (IVF: k-means on ``training_sample``).
    ``backend="torch"`` gives an empty ``TorchFlatIndex`` on the CPU (flat only)."""
    if backend == "torch":
        if index_type != "flat":
            raise ValueError("the torch backend searches exact L2 (flat) indexes only")
        return TorchFlatIndex(np.empty((0, dim), dtype=np.float32))
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
    if isinstance(index, TorchFlatIndex):
        return  # exact: nothing to probe
    if hasattr(index, "nprobe"):
        index.nprobe = nprobe
    else:  # GPU clones and wrapped indexes
        ivf = faiss.extract_index_ivf(index) if hasattr(faiss, "extract_index_ivf") else None
        if ivf is not None:
            ivf.nprobe = nprobe


def save_index(index: Any, path: Path) -> None:
    """Bundles hold faiss indexes whatever backend searched them (a torch index is saved flat)."""
    if isinstance(index, TorchFlatIndex):
        flat = faiss.IndexFlatL2(index.d)
        flat.add(stored_vectors(index))
        index = flat
    if gpu_count() and hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        index = faiss.index_gpu_to_cpu(index)
    faiss.write_index(index, str(path))


def load_index(path: Path) -> Any:
    return faiss.read_index(str(path))


def to_device(index: Any, use_gpu: bool, backend: SearchBackend = "faiss") -> tuple[Any, str]:
    """Move an index to GPU 0 when asked and possible. Returns (index, "gpu" | "cpu").

    ``backend="torch"`` turns a flat index into a ``TorchFlatIndex`` (on CUDA device 0 when asked
    and torch sees one, else on the CPU); ``"faiss"`` keeps a faiss index (on the GPU only with a
    GPU build of faiss).
    """
    if backend == "torch":
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        if isinstance(index, TorchFlatIndex):
            moved = index if index.device.type == device else index.to(device)
        else:
            moved = TorchFlatIndex.from_faiss(index, device)
        return moved, "gpu" if device == "cuda" else "cpu"
    if backend != "faiss":
        raise ValueError(f"unknown search backend {backend!r}; use one of {SEARCH_BACKENDS}")
    if isinstance(index, TorchFlatIndex):
        flat = faiss.IndexFlatL2(index.d)
        flat.add(stored_vectors(index))
        index = flat
    if use_gpu and gpu_count() > 0:
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
        gpu_index.referenced_resources = resources  # type: ignore[attr-defined]  # keep alive
        return gpu_index, "gpu"
    return index, "cpu"


def search(index: Any, queries: np.ndarray, k: int) -> SearchResult:
    """k nearest neighbours of each query row; missing results are id -1 with distance inf.
    ``index`` is a faiss index or a ``TorchFlatIndex`` (the same ``search(queries, k)`` call).
    A large-k batch on a CPU flat index is answered by ``_flat_search_by_threshold`` (the same
    exact neighbours, at about half faiss's cost for the vote's k = 1000)."""
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise ValueError(f"queries must be (n, {index.d}), got {queries.shape}")
    if k <= 0:
        raise ValueError("k must be positive")
    rows = np.ascontiguousarray(queries, dtype=np.float32)
    if _selects_by_threshold(index, rows, k):
        distances, ids = _flat_search_by_threshold(index, rows, k)
    else:
        distances, ids = index.search(rows, k)
    distances = np.where(ids < 0, np.inf, distances).astype(np.float32)
    return SearchResult(squared_distances=distances, ids=ids.astype(np.int64))


# Exact large-k search on a CPU flat index (``_flat_search_by_threshold``).
#
# faiss's flat search keeps each query's k best in a heap, or for k above
# ``distance_compute_min_k_reservoir`` (100) in a reservoir; at the vote's k = 1000 over the demo
# bundle's 45,000 x 64 vectors that selection, not the distances, is most of the cost (0.55 ms
# per query on one thread, of which the distances are ~0.1). The threshold selection below
# computes the same distance matrix with faiss (``pairwise_distances``: one BLAS product, the
# formula faiss's own batched search uses) and then, per query:
#   1. takes the SAMPLE_RANK-th smallest distance of an evenly strided sample of the vectors, the
#      stride chosen so that about CANDIDATE_SLACK * k vectors are expected to lie below it;
#   2. keeps the vectors at or below that threshold, and selects the k smallest among them.
# When at least k vectors pass, the threshold is at or beyond the k-th smallest distance, so
# every true neighbour passes: the result is exact. When fewer pass, the whole row is selected
# from instead: slower, never wrong. That needs 64 of the sampled vectors among the k nearest,
# where ~32 are expected; for vectors stored in an order unrelated to their distance to the
# query, well under one query in a million. Ties go to the smaller id, also at the k-th place.
# bench/results/search_selection.md measures it against faiss's own search.
THRESHOLD_SELECTION_MIN_K = 101  # faiss's reservoir starts above 100
THRESHOLD_SELECTION_MIN_QUERIES = 4  # below this, faiss's one-query kernels are cheaper
SAMPLE_RANK = 64
CANDIDATE_SLACK = 2
# Largest (queries x vectors) float32 distance block held at once: larger indexes are scanned in
# chunks of vectors, each chunk's k best kept, then merged.
THRESHOLD_SELECTION_CHUNK_BYTES = 64 * 1024 * 1024


def _selects_by_threshold(index: Any, queries: np.ndarray, k: int) -> bool:
    """A CPU exact-L2 faiss flat index (GPU and IVF indexes are other classes), a batch, a large
    k and finite queries (a NaN query goes to faiss, which answers it as it always has)."""
    return (
        isinstance(index, faiss.IndexFlat)
        and index.metric_type == faiss.METRIC_L2
        and k >= THRESHOLD_SELECTION_MIN_K
        and queries.shape[0] >= THRESHOLD_SELECTION_MIN_QUERIES
        and index.ntotal > 0
        and bool(np.isfinite(queries).all())
    )


def _flat_search_by_threshold(
    index: Any, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids) like ``faiss.Index.search`` on a flat L2 index, padded with inf / -1
    where the index holds fewer than k vectors (see the comment above)."""
    n, total = queries.shape[0], int(index.ntotal)
    vectors = faiss.rev_swig_ptr(index.get_xb(), total * index.d).reshape(total, index.d)
    step = max(1, THRESHOLD_SELECTION_CHUNK_BYTES // (4 * n))
    kept_d: list[np.ndarray] = []
    kept_i: list[np.ndarray] = []
    for start in range(0, total, step):
        block = faiss.pairwise_distances(queries, vectors[start : start + step])
        np.maximum(block, 0.0, out=block)  # rounding can take a squared distance below 0
        values, columns = k_smallest(block, k)
        kept_d.append(values)
        kept_i.append(np.where(columns >= 0, columns + start, -1))
    distances, ids = np.concatenate(kept_d, axis=1), np.concatenate(kept_i, axis=1)
    if len(kept_d) > 1:  # merge the chunks' k best
        chosen = np.argsort(distances, axis=1, kind="stable")[:, :k]  # chunks ascend in id
        distances = np.take_along_axis(distances, chosen, axis=1)
        ids = np.take_along_axis(ids, chosen, axis=1)
    return distances, ids


def k_smallest(distances: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest values of each row of ``distances`` (n, m; float32, non-negative) and
    their columns, ascending, equal values by the smaller column; rows padded with inf / -1 when
    m < k. Exact: a strided sample's threshold only narrows the candidates when at least k of
    them pass it."""
    n, m = distances.shape
    if m >= 2**32:
        raise ValueError("at most 2^32 - 1 columns: a column must fit in 32 bits of its key")
    kept = min(k, m)
    out_d = np.full((n, k), np.inf, dtype=np.float32)
    out_i = np.full((n, k), -1, dtype=np.int64)
    stride = CANDIDATE_SLACK * kept // SAMPLE_RANK
    thresholds: np.ndarray | None = None
    if stride >= 2 and m // stride > SAMPLE_RANK:
        sample = distances[:, ::stride]
        thresholds = np.partition(sample, SAMPLE_RANK - 1, axis=1)[:, SAMPLE_RANK - 1]
    for row in range(n):
        values = distances[row]
        columns = None if thresholds is None else np.flatnonzero(values <= thresholds[row])
        if columns is None or columns.size < kept:
            columns = np.arange(m)
        out_i[row, :kept] = _smallest_by_value_then_column(values[columns], columns, kept)
        out_d[row, :kept] = values[out_i[row, :kept]]
    return out_d, out_i


def _smallest_by_value_then_column(values: np.ndarray, columns: np.ndarray, k: int) -> np.ndarray:
    """The columns of the k smallest ``values`` (non-negative float32), ascending by value then
    column. One int64 key per candidate, the value's bits over the column's: the bits of a
    non-negative float32 order as the floats do, and the keys are unique, so one partition and
    one sort of plain integers give the order without a stable sort."""
    bits = (values + np.float32(0.0)).view(np.int32).astype(np.int64)  # + 0: -0.0 becomes 0.0
    keys = (bits << 32) | columns.astype(np.int64)
    if keys.size > k:
        keys = np.partition(keys, k - 1)[:k]
    keys.sort()
    return keys & 0xFFFFFFFF


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

    def to_device(self, use_gpu: bool, backend: SearchBackend = "faiss") -> str:
        device = "cpu"
        for c, index in enumerate(self.indexes):
            self.indexes[c], device = to_device(index, use_gpu, backend)
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
    if isinstance(index, TorchFlatIndex):
        return np.ascontiguousarray(index.vectors.cpu().numpy(), dtype=np.float32)
    if gpu_count() and hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        index = faiss.index_gpu_to_cpu(index)
    if isinstance(index, faiss.IndexIVF):
        index.make_direct_map()
    vectors: np.ndarray = index.reconstruct_n(0, index.ntotal)
    return np.ascontiguousarray(vectors, dtype=np.float32)


@dataclass(frozen=True)
class NeighbourAgreement:
    """How closely one search result matches a reference one (another backend or device).

    Exact searches on different hardware agree on the neighbours but not bit for bit: distances
    differ by float rounding, so neighbours at (nearly) equal distance may swap places, and at
    the k-th place a tie may let either of two vectors in. Hence ids are compared within groups of
    positions whose reference distances are equal up to the tolerance (a swap inside a group is
    no disagreement), and the last group of a row, which the k cut may split, is not compared.
    """

    queries: int
    k: int
    rtol: float
    atol: float
    max_relative_distance_error: float  # over positions with a finite, positive reference
    distances_out_of_tolerance: int  # positions where |d - d_ref| > rtol * d_ref + atol
    ids_reordered: int  # positions whose ids differ at all (ties reordered included)
    ids_unexplained: int  # positions whose ids differ where no tie explains it

    @property
    def identical_neighbours(self) -> bool:
        return self.distances_out_of_tolerance == 0 and self.ids_unexplained == 0


def compare_neighbours(
    reference: SearchResult, other: SearchResult, rtol: float = 1e-4, atol: float = 0.0
) -> NeighbourAgreement:
    """``other`` against ``reference`` (``NeighbourAgreement``): both (n, k), same queries."""
    ref_d, ref_i = reference.squared_distances, reference.ids
    other_d, other_i = other.squared_distances, other.ids
    if ref_d.shape != other_d.shape or ref_i.shape != other_i.shape:
        raise ValueError(f"shapes differ: {ref_i.shape} and {other_i.shape}")
    n, k = ref_i.shape
    finite = np.isfinite(ref_d)
    with np.errstate(invalid="ignore"):
        error = np.abs(other_d.astype(np.float64) - ref_d.astype(np.float64))
        out = np.where(finite, error > rtol * np.abs(ref_d) + atol, np.isfinite(other_d))
        positive = finite & (ref_d > 0)
        relative = np.where(positive, error / np.where(positive, ref_d, 1.0), 0.0)
        tied_with_next = np.diff(ref_d, axis=1) <= rtol * np.abs(ref_d[:, 1:]) + atol
    groups = np.concatenate(
        [np.zeros((n, 1), dtype=np.int64), np.cumsum(~tied_with_next, axis=1)], axis=1
    )
    # ids sorted within each group, in both results: equal when the groups hold the same ids
    span = int(max(ref_i.max(initial=0), other_i.max(initial=0))) + 2
    ref_sorted = np.sort(groups * span + (ref_i + 1), axis=1)
    other_sorted = np.sort(groups * span + (other_i + 1), axis=1)
    compared = groups < groups[:, -1:]  # the last group may be cut by k
    return NeighbourAgreement(
        queries=n,
        k=k,
        rtol=rtol,
        atol=atol,
        max_relative_distance_error=float(relative.max(initial=0.0)),
        distances_out_of_tolerance=int(out.sum()),
        ids_reordered=int((ref_i != other_i).sum()),
        ids_unexplained=int(((ref_sorted != other_sorted) & compared).sum()),
    )
