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
    """The serving default (one faiss thread) is a cost choice only: a batch's neighbours and
    distances are the same at any thread count; zero threads is refused."""
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
        np.testing.assert_array_equal(found[1].squared_distances, found[2].squared_distances)
        with pytest.raises(ValueError, match="at least 1"):
            search.set_threads(0)
    finally:
        search.set_threads(before)
