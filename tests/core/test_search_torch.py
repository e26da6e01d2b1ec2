"""The torch search backend (``app.core.search.TorchFlatIndex``) against brute force and faiss.

Exact search on other hardware agrees on the neighbours but not bit for bit, so results are
compared with ``search.compare_neighbours``: distances within 1e-4 relative, ids equal except
where (near-)equal distances let neighbours swap. The demo-bundle test does this on real CIFAR-10
test features against the bundle's own faiss flat index.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.core import search
from app.core.bundle import read_manifest
from app.core.errors import BundleError
from app.core.guard import Guard
from app.core.images import decode_image
from app.service.settings import Settings
from bench.load_service import test_jpegs as cifar_test_jpegs
from tests.conftest import DEMO_BUNDLE


def _flat(base: np.ndarray) -> object:
    index = search.new_index(base.shape[1], "flat")
    search.add_vectors(index, [base])
    return index


def _brute(queries: np.ndarray, base: np.ndarray) -> np.ndarray:
    diff = queries[:, None, :].astype(np.float64) - base[None].astype(np.float64)
    distances: np.ndarray = (diff**2).sum(-1)
    return distances


def test_torch_search_is_exact_sorted_and_pads_like_faiss() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(300, 8)).astype(np.float32)
    queries = rng.normal(size=(7, 8)).astype(np.float32)
    index = search.TorchFlatIndex(base)
    found = search.search(index, queries, 10)
    brute = _brute(queries, base)
    np.testing.assert_array_equal(found.ids, np.argsort(brute, axis=1)[:, :10])
    np.testing.assert_allclose(found.squared_distances, np.sort(brute, axis=1)[:, :10], rtol=1e-4)
    assert found.ids.dtype == np.int64 and found.squared_distances.dtype == np.float32
    more = search.search(index, queries, 350)  # k larger than the index
    assert (more.ids[:, 300:] == -1).all() and np.isinf(more.squared_distances[:, 300:]).all()
    assert (np.diff(more.squared_distances[:, :300], axis=1) >= 0).all()
    with pytest.raises(ValueError, match="queries must be"):
        search.search(index, queries[:, :4], 3)


def test_chunked_scan_matches_one_block_whatever_the_chunk() -> None:
    """The chunk size bounds memory only: any chunking gives the same neighbours."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(1000, 16)).astype(np.float32)
    queries = rng.normal(size=(12, 16)).astype(np.float32)
    whole = search.search(search.TorchFlatIndex(base), queries, 50)
    for rows in (1, 7, 49, 50, 333, 999):
        chunked = search.TorchFlatIndex(base, max_chunk_bytes=4 * 12 * rows)
        assert chunked.rows_per_chunk(12) == rows
        found = search.search(chunked, queries, 50)
        np.testing.assert_array_equal(found.ids, whole.ids)
        # BLAS picks other kernels for other block shapes: equal up to float rounding
        np.testing.assert_allclose(found.squared_distances, whole.squared_distances, rtol=1e-6)


def test_equal_distances_are_ordered_by_id() -> None:
    base = np.zeros((6, 4), dtype=np.float32)
    base[[1, 4]] = 1.0  # ids 1 and 4 at distance 4, the rest at distance 0 from the origin
    found = search.search(search.TorchFlatIndex(base), np.zeros((1, 4), np.float32), 6)
    np.testing.assert_array_equal(found.ids[0], [0, 2, 3, 5, 1, 4])
    np.testing.assert_array_equal(found.squared_distances[0], [0, 0, 0, 0, 4, 4])


def test_torch_backend_matches_faiss_and_round_trips_through_the_module(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    base = rng.normal(size=(2000, 32)).astype(np.float32)
    queries = rng.normal(size=(64, 32)).astype(np.float32)
    flat = _flat(base)
    torch_index, device = search.to_device(flat, use_gpu=False, backend="torch")
    assert isinstance(torch_index, search.TorchFlatIndex) and device == "cpu"
    assert search.index_size(torch_index) == 2000 and torch_index.d == 32
    np.testing.assert_array_equal(search.stored_vectors(torch_index), base)
    agreement = search.compare_neighbours(
        search.search(flat, queries, 100), search.search(torch_index, queries, 100)
    )
    assert agreement.identical_neighbours, agreement
    assert agreement.max_relative_distance_error < 1e-5
    # saved as a faiss flat index (bundles hold faiss files), loaded back into either backend
    search.save_index(torch_index, tmp_path / "i.faiss")
    loaded = search.load_index(tmp_path / "i.faiss")
    np.testing.assert_array_equal(search.stored_vectors(loaded), base)
    back, _ = search.to_device(torch_index, use_gpu=False, backend="faiss")
    assert not isinstance(back, search.TorchFlatIndex)
    np.testing.assert_array_equal(
        search.search(back, queries, 5).ids, search.search(flat, queries, 5).ids
    )
    search.set_nprobe(torch_index, 8)  # exact: a no-op, not an error
    # add() continues ids like faiss
    grown = search.TorchFlatIndex(base[:1500])
    search.add_vectors(grown, [base[1500:1800], base[1800:]])
    np.testing.assert_array_equal(
        search.search(grown, queries, 20).ids, search.search(torch_index, queries, 20).ids
    )


def test_a_torch_index_is_built_like_a_faiss_one() -> None:
    rng = np.random.default_rng(7)
    base = rng.normal(size=(400, 8)).astype(np.float32)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    built = search.new_index(8, "flat", backend="torch")
    assert isinstance(built, search.TorchFlatIndex) and search.index_size(built) == 0
    empty = search.search(built, queries, 3)  # nothing indexed yet: all missing
    assert (empty.ids == -1).all() and np.isinf(empty.squared_distances).all()
    search.add_vectors(built, np.array_split(base, 3))
    np.testing.assert_array_equal(
        search.search(built, queries, 30).ids, search.search(_flat(base), queries, 30).ids
    )
    with pytest.raises(ValueError, match="flat"):
        search.new_index(8, "ivf", nlist=4, training_sample=base, backend="torch")


def test_torch_backend_refuses_approximate_indexes() -> None:
    rng = np.random.default_rng(3)
    base = rng.normal(size=(600, 8)).astype(np.float32)
    ivf = search.new_index(8, "ivf", nlist=4, training_sample=base)
    search.add_vectors(ivf, [base])
    with pytest.raises(ValueError, match="exact L2"):
        search.to_device(ivf, use_gpu=False, backend="torch")
    with pytest.raises(ValueError, match="unknown search backend"):
        search.to_device(ivf, use_gpu=False, backend="annoy")  # type: ignore[arg-type]


def test_distances_stay_float32_under_autocast_and_reduced_matmul_precision() -> None:
    """The service may run the model under bf16 autocast, or someone may allow TF32/bf16 matmul
    passes globally: the search must not inherit either (it would reorder close neighbours)."""
    rng = np.random.default_rng(4)
    base = rng.normal(size=(500, 64)).astype(np.float32)
    queries = rng.normal(size=(32, 64)).astype(np.float32)
    index = search.TorchFlatIndex(base)
    reference = search.search(index, queries, 40)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            found = search.search(index, queries, 40)
        assert torch.get_float32_matmul_precision() == "medium"  # restored
    finally:
        torch.set_float32_matmul_precision(previous)
    np.testing.assert_array_equal(found.ids, reference.ids)
    np.testing.assert_array_equal(found.squared_distances, reference.squared_distances)


def test_class_indexes_on_the_torch_backend_match_faiss() -> None:
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(900, 16)).astype(np.float32)
    labels = rng.integers(0, 3, 900)
    queries = rng.normal(size=(40, 16)).astype(np.float32)
    classes = rng.integers(0, 3, 40)
    on_faiss = search.ClassIndexes.from_vectors(vectors, labels, 3)
    on_torch = search.ClassIndexes.from_vectors(vectors, labels, 3)
    assert on_torch.to_device(use_gpu=False, backend="torch") == "cpu"
    assert all(isinstance(index, search.TorchFlatIndex) for index in on_torch.indexes)
    np.testing.assert_allclose(
        on_torch.kth_squared_distance(queries, classes, 50),
        on_faiss.kth_squared_distance(queries, classes, 50),
        rtol=1e-5,
    )


def test_compare_neighbours_tells_swapped_ties_from_wrong_neighbours() -> None:
    distances = np.array([[1.0, 2.0, 2.0, 3.0, 4.0, 4.0]], dtype=np.float32)
    ids = np.array([[10, 11, 12, 13, 14, 15]])
    reference = search.SearchResult(distances, ids)
    swapped = search.SearchResult(distances, np.array([[10, 12, 11, 13, 15, 99]]))
    agreement = search.compare_neighbours(reference, swapped)
    # the tie (11, 12) swapped, and the last group (distance 4) cut by k: not disagreements
    assert agreement.identical_neighbours
    assert agreement.ids_reordered == 4 and agreement.ids_unexplained == 0
    wrong = search.SearchResult(distances, np.array([[10, 11, 12, 77, 14, 15]]))
    assert search.compare_neighbours(reference, wrong).ids_unexplained == 1
    farther = search.SearchResult(distances * np.float32(1.001), ids)
    off = search.compare_neighbours(reference, farther, rtol=1e-4)
    assert off.distances_out_of_tolerance == 6 and not off.identical_neighbours
    assert off.max_relative_distance_error == pytest.approx(1e-3, rel=1e-3)
    missing = search.SearchResult(
        np.array([[1.0, np.inf]], np.float32), np.array([[3, -1]], np.int64)
    )
    assert search.compare_neighbours(missing, missing).identical_neighbours
    with pytest.raises(ValueError, match="shapes differ"):
        search.compare_neighbours(reference, missing)


def test_the_service_selects_the_backend_by_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().search_backend == "faiss"
    monkeypatch.setenv("ADVGUARD_SEARCH_BACKEND", "torch")
    assert Settings().search_backend == "torch"
    monkeypatch.setenv("ADVGUARD_SEARCH_BACKEND", "annoy")
    with pytest.raises(ValueError, match="search_backend"):
        Settings()


@pytest.mark.slow
def test_torch_backend_equals_faiss_flat_on_the_demo_bundle() -> None:
    """Issue 15's acceptance: on the committed demo bundle's index (the file its manifest lists),
    the torch backend returns faiss's flat-search neighbours for real CIFAR-10 test features:
    distances within 1e-4 relative, the same ids wherever distances differ."""
    manifest = read_manifest(DEMO_BUNDLE)
    (layer,) = [spec for spec in manifest.detector.layers if spec.index_file is not None]
    assert layer.index_type == "flat" and layer.index_file is not None
    flat = search.load_index(DEMO_BUNDLE / layer.index_file)
    guard = Guard.load(DEMO_BUNDLE, device="cpu", use_gpu_index=False)
    pixels = torch.stack([guard.pixels(decode_image(data)) for data in cifar_test_jpegs(300)])
    features = guard.infer(pixels).features[layer.name]
    vote = next(s for s in guard.detector.statistics if s.kind == "vote")
    queries = vote.layer.processing.apply(features)
    torch_index, _ = search.to_device(flat, use_gpu=False, backend="torch")
    k = manifest.detector.k
    expected = search.search(flat, queries, k)
    found = search.search(torch_index, queries, k)
    agreement = search.compare_neighbours(expected, found, rtol=1e-4)
    assert agreement.queries == 300 and agreement.k == k
    assert agreement.distances_out_of_tolerance == 0, agreement
    assert agreement.ids_unexplained == 0, agreement
    assert agreement.max_relative_distance_error <= 1e-4


@pytest.mark.slow
def test_guard_on_the_torch_backend_gives_the_faiss_verdicts() -> None:
    """The whole detector on the torch backend (every statistic reading an index) answers as on
    faiss: same predictions, same decisions, scores equal up to float rounding."""
    on_faiss = Guard.load(DEMO_BUNDLE, device="cpu", use_gpu_index=False)
    on_torch = Guard.load(DEMO_BUNDLE, device="cpu", use_gpu_index=False, search_backend="torch")
    assert on_torch.index_device == "cpu"
    pixels = torch.stack([on_faiss.pixels(decode_image(d)) for d in cifar_test_jpegs(200)])
    expected, found = on_faiss.classify_pixels(pixels), on_torch.classify_pixels(pixels)
    assert [v.accepted for v in found] == [v.accepted for v in expected]
    assert [v.predicted_class for v in found] == [v.predicted_class for v in expected]
    np.testing.assert_allclose(
        [v.score for v in found], [v.score for v in expected], rtol=1e-6, atol=1e-9
    )


def test_an_ivf_bundle_on_the_torch_backend_is_a_bundle_error(tmp_path: Path) -> None:
    from app.core.guard import _load_layer
    from app.core.manifest import LayerSpec
    from app.core.processing import fit_processing

    rng = np.random.default_rng(6)
    base = rng.normal(size=(600, 8)).astype(np.float32)
    ivf = search.new_index(8, "ivf", nlist=4, training_sample=base)
    search.add_vectors(ivf, [base])
    search.save_index(ivf, tmp_path / "i.faiss")
    fit_processing("none", [base], 8, 8).save(tmp_path / "p.npz")
    spec = LayerSpec(
        name="layer3",
        input_dim=8,
        processing="none",
        output_dim=8,
        processing_file="p.npz",
        index_file="i.faiss",
        index_type="ivf",
        nlist=4,
        nprobe=4,
    )
    with pytest.raises(BundleError, match="exact L2"):
        _load_layer(tmp_path, spec, want_gpu=False, backend="torch")
    _load_layer(tmp_path, spec, want_gpu=False, backend="faiss")  # faiss searches it as before
