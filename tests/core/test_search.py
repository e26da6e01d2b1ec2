import numpy as np
import pytest

from app.core import search


def test_flat_search_is_exact_and_marks_missing():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, 8)).astype(np.float32)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    index = search.new_index(8, "flat")
    search.add_vectors(index, np.array_split(base, 3))
    found = search.search(index, queries, 10)
    brute = ((queries[:, None, :] - base[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(found.ids, np.argsort(brute, axis=1)[:, :10])
    np.testing.assert_allclose(found.squared_distances, np.sort(brute, axis=1)[:, :10], rtol=1e-4)
    more = search.search(index, queries, 250)  # k larger than the index
    assert (more.ids[:, 200:] == -1).all() and np.isinf(more.squared_distances[:, 200:]).all()


def test_ivf_index_finds_near_neighbours(tmp_path):
    rng = np.random.default_rng(1)
    base = rng.normal(size=(2000, 16)).astype(np.float32)
    index = search.new_index(16, "ivf", nlist=16, training_sample=base)
    search.add_vectors(index, [base])
    search.set_nprobe(index, 16)  # all lists: exact
    search.save_index(index, tmp_path / "i.faiss")
    loaded = search.load_index(tmp_path / "i.faiss")
    search.set_nprobe(loaded, 16)
    found = search.search(loaded, base[:20], 1)
    np.testing.assert_array_equal(found.ids[:, 0], np.arange(20))


def test_search_threads_are_set_for_the_calling_thread_and_leave_batch_results_unchanged():
    """The serving default (one faiss thread) is a cost choice only: a batch's neighbours are
    the same at any thread count, and its distances equal up to float rounding (the threshold
    selection's matrix product splits its work by thread); zero threads is refused."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(5000, 16)).astype(np.float32)
    queries = rng.normal(size=(16, 16)).astype(np.float32)
    index = search.new_index(16, "flat")
    search.add_vectors(index, [base])
    before = search.threads()
    try:
        found = {}
        for count in (1, 2):
            search.set_threads(count)
            assert search.threads() == count
            found[count] = search.search(index, queries, 300)
        np.testing.assert_array_equal(found[1].ids, found[2].ids)
        np.testing.assert_allclose(
            found[1].squared_distances, found[2].squared_distances, rtol=1e-6
        )
        with pytest.raises(ValueError, match="at least 1"):
            search.set_threads(0)
    finally:
        search.set_threads(before)


def _brute_force(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: the k smallest of each row, ascending by value then column."""
    order = np.lexsort((np.broadcast_to(np.arange(values.shape[1]), values.shape), values))
    chosen = order[:, :k]
    return np.take_along_axis(values, chosen, axis=1), chosen


def test_k_smallest_matches_brute_force_with_ties_and_padding():
    rng = np.random.default_rng(2)
    # integer distances: many ties, also at the k-th place
    values = rng.integers(0, 50, size=(6, 9000)).astype(np.float32)
    for k in (1, 101, 1000):
        got_d, got_i = search.k_smallest(values, k)
        want_d, want_i = _brute_force(values, k)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_array_equal(got_d, want_d)
    few = values[:, :300]
    got_d, got_i = search.k_smallest(few, 1000)  # fewer columns than k: faiss's padding
    want_d, want_i = _brute_force(few, 300)
    np.testing.assert_array_equal(got_i[:, :300], want_i)
    assert (got_i[:, 300:] == -1).all() and np.isinf(got_d[:, 300:]).all()


def test_k_smallest_falls_back_to_the_whole_row_when_the_sample_threshold_is_too_low():
    """The sampled columns are made the row's smallest values, so the sample's threshold passes
    fewer than k columns: the whole row must be selected from, and the answer stays exact."""
    k, m = 1000, 45000
    stride = search.CANDIDATE_SLACK * k // search.SAMPLE_RANK
    values = np.random.default_rng(3).uniform(10, 20, size=(2, m)).astype(np.float32)
    values[:, ::stride] = np.linspace(0, 1, values[:, ::stride].shape[1], dtype=np.float32)
    passing = (values[0] <= np.sort(values[0, ::stride])[search.SAMPLE_RANK - 1]).sum()
    assert passing < k  # the situation under test
    got_d, got_i = search.k_smallest(values, k)
    want_d, want_i = _brute_force(values, k)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_d, want_d)


@pytest.mark.parametrize("chunk_bytes", [None, 16 * 4 * 3000])
def test_large_k_batch_on_a_flat_index_matches_faiss_and_brute_force(monkeypatch, chunk_bytes):
    """The threshold selection (k >= 101, >= 4 queries, CPU flat index) returns faiss's own
    neighbours: exact against brute force, also when the vectors are scanned in chunks."""
    if chunk_bytes is not None:
        monkeypatch.setattr(search, "THRESHOLD_SELECTION_CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(4)
    base = rng.normal(size=(20000, 16)).astype(np.float32)
    queries = rng.normal(size=(16, 16)).astype(np.float32)
    index = search.new_index(16, "flat")
    search.add_vectors(index, [base])
    k = 500
    assert search._selects_by_threshold(index, queries, k)
    found = search.search(index, queries, k)
    brute = ((queries[:, None, :].astype(np.float64) - base[None]) ** 2).sum(-1)
    np.testing.assert_allclose(found.squared_distances, np.sort(brute, axis=1)[:, :k], rtol=1e-4)
    faiss_d, faiss_i = index.search(queries, k)
    agreement = search.compare_neighbours(search.SearchResult(faiss_d, faiss_i), found)
    assert agreement.identical_neighbours, agreement
    assert np.all(np.diff(found.squared_distances, axis=1) >= 0)


def test_small_batches_small_k_and_nan_queries_keep_faiss_own_search():
    rng = np.random.default_rng(5)
    base = rng.normal(size=(3000, 8)).astype(np.float32)
    index = search.new_index(8, "flat")
    search.add_vectors(index, [base])
    queries = rng.normal(size=(8, 8)).astype(np.float32)
    assert not search._selects_by_threshold(index, queries[:3], 200)  # a small batch
    assert not search._selects_by_threshold(index, queries, 100)  # faiss's heap is cheap here
    with_nan = queries.copy()
    with_nan[0, 0] = np.nan
    assert not search._selects_by_threshold(index, with_nan, 200)
    found = search.search(index, with_nan, 200)  # answered as faiss always answered it
    assert found.ids.shape == (8, 200)
    with pytest.raises(ValueError, match="positive"):
        search.search(index, queries, 0)
