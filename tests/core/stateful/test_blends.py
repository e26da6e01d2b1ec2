"""The blend test: against a brute-force numpy reference, on rounded blends (flagged within
the rounding bound), and on what it must leave alone (brightness and contrast changes, near
copies); the sketch; a client's recent queries."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

from app.core.stateful.blends import (
    SKETCH_SIDE,
    BlendBatch,
    BlendEntry,
    BlendRule,
    InProcessBlendMemory,
    RecentSketches,
    find_blend,
    find_blends,
    pooled_cells,
    sketch,
    sketches,
)
from app.core.stateful.match_rule import Answer

RULE = BlendRule()


def reference(recent: np.ndarray, query: np.ndarray, rule: BlendRule) -> tuple[float, int, int]:
    """Pair by pair, with least squares: the smallest admitted residual and its pair."""
    dims = query.size
    best = (np.inf, -1, -1)

    def rms(v: np.ndarray) -> float:
        return float(np.sqrt((v**2).mean()))

    for i, a in enumerate(recent):
        for j, b in enumerate(recent):
            if i == j or min(rms(query - a), rms(query - b), rms(b - a)) < rule.min_separation:
                continue
            span = np.stack([a, np.ones(dims)], axis=1)
            coef, *_ = np.linalg.lstsq(span, b - a, rcond=None)
            if rms(b - a - span @ coef) < rule.min_novelty * rms(b - a):
                continue
            direction = (b - a)[:, None]
            t, *_ = np.linalg.lstsq(direction, query - a, rcond=None)
            residual = rms(query - a - direction[:, 0] * t[0])
            if residual < best[0]:
                best = (residual, i, j)
    return best


def random_images(rng: np.random.Generator, n: int, dims: int = 768) -> np.ndarray:
    """Smooth-ish random images in grey levels, well inside [0, 255]."""
    base = rng.uniform(40, 215, size=(n, 1))
    return np.clip(base + rng.normal(0, 30, size=(n, dims)), 0, 255)


@pytest.mark.parametrize("seed", range(12))
def test_find_blend_matches_the_pairwise_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    recent = random_images(rng, 6)
    if seed % 2:  # a planted blend of two of them, rounded, as the query
        t = rng.uniform(0.2, 0.8)
        query = np.round((1 - t) * recent[1] + t * recent[4])
    else:
        query = random_images(rng, 1)[0]
    rule = BlendRule(max_residual=50.0 if seed % 3 == 0 else 0.5)
    found = find_blend(recent, query, rule)
    residual, i, j = reference(recent, query, rule)
    if residual > rule.max_residual:
        assert found is None
    else:
        assert found is not None
        assert found.residual == pytest.approx(residual, rel=1e-6, abs=1e-9)
        # the line through i, j is the line through j, i: either order is the same pair
        assert {found.first, found.second} == {i, j}


def test_a_batch_search_finds_what_each_query_finds_alone() -> None:
    """Queries with 0 to 8 recent sketches each, padded into one array, some of them planted
    blends: the batch gives each query the match of its own search, exactly."""
    rng = np.random.default_rng(21)
    counts = np.array([0, 1, 2, 5, 8, 3, 8, 4, 6, 2])
    recents = np.zeros((len(counts), 8, 768))
    queries = random_images(rng, len(counts))
    for row, count in enumerate(counts):
        recents[row, :count] = rng.uniform(0, 255, size=(count, 768))  # no brightness pairs
        if row % 2 and count >= 2:
            first, second = rng.choice(count, size=2, replace=False)
            t = rng.uniform(0.35, 0.65)
            queries[row] = np.round((1 - t) * recents[row, first] + t * recents[row, second])
    batched = find_blends(recents, counts, queries, RULE)
    alone = [
        find_blend(recents[row, :count], queries[row], RULE) for row, count in enumerate(counts)
    ]
    assert batched == alone
    planted = [row % 2 == 1 and count >= 2 for row, count in enumerate(counts)]
    assert [match is not None for match in alone] == planted


def test_a_batch_walk_finds_what_a_walk_query_by_query_finds() -> None:
    """A batch holding several queries of one client (the third a blend of its first two,
    all new to the memory) and of others: each query judged against what its client sent
    before it, in the batch or earlier."""
    rng = np.random.default_rng(8)
    rule = BlendRule()
    photos = rng.integers(0, 256, size=(6, 3, 32, 32)).astype(np.float64)
    midpoint = np.round(0.5 * photos[0] + 0.5 * photos[1])
    earlier = np.round(0.3 * photos[4] + 0.7 * photos[5])
    images = [photos[0], photos[2], photos[1], midpoint, photos[3], earlier]
    clients = ["a", "b", "a", "a", "b", "c"]
    queries = np.stack([sketch(image.astype(np.uint8)) for image in images])
    history = [BlendEntry(sketch(photos[i].astype(np.uint8)), bytes([i])) for i in (4, 5)]
    walked = {client: RecentSketches(rule, history if client == "c" else []) for client in "abc"}
    expected = []
    for row, client in enumerate(clients):
        expected.append(walked[client].find(queries[row]))
        walked[client].add(BlendEntry(queries[row], bytes([10 + row])))
    recents = {client: RecentSketches(rule, history if client == "c" else []) for client in "abc"}
    positions = [2 * row + 1 for row in range(len(clients))]  # indices in a wider batch
    batch = BlendBatch(rule, recents, positions, clients, queries)
    found = []
    for row, client in enumerate(clients):
        found.append(batch.find(positions[row], client))
        batch.add(client, BlendEntry(batch.sketches[positions[row]], bytes([10 + row])))
    assert found == expected
    assert [f is not None for f in found] == [False, False, False, True, False, True]
    assert {client: len(entries) for client, entries in batch.added.items()} == {
        "a": 3,
        "b": 2,
        "c": 1,
    }


def test_recent_sketches_of_another_size_are_not_compared() -> None:
    """A client's recent sketches of another size (a Redis shared with a service of another
    input size) are no evidence, and the first query of the new size replaces them."""
    rng = np.random.default_rng(2)
    small = rng.integers(0, 256, size=(2, 3, 8, 8)).astype(np.uint8)
    recent = RecentSketches(
        BlendRule(), [BlendEntry(sketch(s), bytes([i])) for i, s in enumerate(small)]
    )
    photo = rng.integers(0, 256, size=(3, 32, 32)).astype(np.uint8)
    assert recent.find(sketch(photo)) is None
    assert recent.add(BlendEntry(sketch(photo), b"new"))
    assert recent.digests == [b"new"] and recent.sketches.shape == (1, 768)


@pytest.mark.parametrize("t", [0.5, 0.25, 0.75, 0.4, 0.03, 0.97, 1.5])
def test_a_rounded_blend_is_within_the_rounding_bound_of_its_line(t: float) -> None:
    """Flagged within 0.5 grey levels, unless it is too close to an end to be its own image
    (separation: x and s here are ~52 levels apart in the sketch) or clipped off the line."""
    rng = np.random.default_rng(7)
    x, s = rng.integers(0, 256, size=(2, 3, 32, 32)).astype(np.float64)
    blend = np.clip(np.round((1 - t) * x + t * s), 0, 255)
    recent = np.stack([sketch(x.astype(np.uint8)), sketch(s.astype(np.uint8))])
    match = find_blend(recent.astype(np.float64), sketch(blend.astype(np.uint8)), RULE)
    if t > 1 or min(t, 1 - t) * 52 < RULE.min_separation:
        assert match is None
    else:
        assert match is not None and match.residual <= 0.5


def test_brightness_and_contrast_changes_of_a_photo_are_not_blends() -> None:
    rng = np.random.default_rng(3)
    photo = rng.uniform(60, 190, size=(3, 32, 32))
    edits = [photo, 1.2 * photo, 0.8 * photo + 20, 1.1 * (photo - 128) + 128]
    recent = np.stack([sketch(np.round(e).astype(np.uint8)) for e in edits[:3]])
    query = sketch(np.round(edits[3]).astype(np.uint8))
    assert find_blend(recent.astype(np.float64), query, RULE) is None
    # the same query as a blend of two different photos is one
    other = rng.uniform(0, 255, size=(3, 32, 32))
    recent = np.stack([sketch(np.round(e).astype(np.uint8)) for e in (photo, other)])
    query = sketch(np.round(0.6 * photo + 0.4 * other).astype(np.uint8))
    assert find_blend(recent.astype(np.float64), query, RULE) is not None


def test_near_copies_are_not_blends_however_close_to_a_line() -> None:
    rng = np.random.default_rng(5)
    photo = rng.integers(0, 256, size=(3, 32, 32))
    copies = [np.clip(photo + rng.integers(-2, 3, size=photo.shape), 0, 255) for _ in range(4)]
    recent = np.stack([sketch(c.astype(np.uint8)) for c in copies[:3]]).astype(np.float64)
    assert find_blend(recent, sketch(copies[3].astype(np.uint8)), RULE) is None


def test_the_sketch_is_the_area_mean_and_linear() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(3, 32, 32)).astype(np.uint8)
    expected = image.reshape(3, 16, 2, 16, 2).mean(axis=(2, 4)).reshape(-1)
    assert np.array_equal(sketch(image).astype(np.float64), expected)  # exact in float16
    other = rng.integers(0, 256, size=(3, 32, 32)).astype(np.uint8)
    blend = np.round(0.3 * image + 0.7 * other).astype(np.uint8)
    line = 0.3 * sketch(image).astype(np.float64) + 0.7 * sketch(other).astype(np.float64)
    assert np.abs(sketch(blend).astype(np.float64) - line).max() <= 0.5


@pytest.mark.parametrize(("height", "width"), [(10, 7), (37, 50), (224, 224)])
def test_the_sketch_of_any_size_averages_bands_that_cover_the_image(
    height: int, width: int
) -> None:
    flat = np.full((3, height, width), 77, dtype=np.uint8)
    out = sketch(flat)
    assert out.shape == (3 * min(height, SKETCH_SIDE) * min(width, SKETCH_SIDE),)
    assert np.all(out == 77)


def test_recent_sketches_keep_the_last_distinct_queries_and_flag_a_blend() -> None:
    rng = np.random.default_rng(11)
    rule = BlendRule(window=3)
    recent = RecentSketches(rule)
    photos = rng.integers(0, 256, size=(5, 3, 32, 32)).astype(np.uint8)
    for i, photo in enumerate(photos):
        assert recent.check_and_add(sketch(photo), bytes([i])) is None
    # the first two photos have left the window: their midpoint is no longer seen
    old = np.round(0.5 * photos[0].astype(np.float64) + 0.5 * photos[1]).astype(np.uint8)
    assert recent.check_and_add(sketch(old), b"old") is None
    # a resend of a kept photo is not kept twice: the window still holds photo 4
    assert recent.check_and_add(sketch(photos[4]), bytes([4])) is None
    new = np.round(0.5 * photos[4].astype(np.float64) + 0.5 * old).astype(np.uint8)
    assert recent.check_and_add(sketch(new), b"new") is not None


@pytest.mark.parametrize(
    "kwargs",
    [{"max_residual": -1.0}, {"min_separation": 0.0}, {"window": 1}, {"min_novelty": 1.5}],
)
def test_an_invalid_rule_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BlendRule(**kwargs)  # type: ignore[arg-type]


def test_a_found_blend_carries_the_answer_of_its_lines_older_end() -> None:
    rng = np.random.default_rng(4)
    x, s = rng.integers(0, 256, size=(2, 3, 32, 32))
    recent = RecentSketches(BlendRule())
    recent.add(BlendEntry(sketch(x), b"x", Answer("accepted", 1, 0.9, 0.0)))
    recent.add(BlendEntry(sketch(s), b"s", Answer("accepted", 2, 0.8, 0.0)))
    found = recent.find(sketch(np.round(0.5 * x + 0.5 * s)))
    assert found is not None and found.anchor == Answer("accepted", 1, 0.9, 0.0)
    assert not recent.add(BlendEntry(sketch(x), b"x"))  # a copy is not kept twice


def test_the_in_process_memory_is_bounded_by_clients_and_time() -> None:
    rule = BlendRule(window=2)
    memory = InProcessBlendMemory(rule, max_clients=2, ttl_s=10.0)
    entry = BlendEntry(np.zeros(3, np.float16), b"e")
    memory.keep({"a": [entry]}, 0.0)
    memory.keep({"b": [entry]}, 1.0)
    memory.keep({"a": [BlendEntry(np.ones(3, np.float16), b"f")] * 2}, 2.0)
    memory.keep({"c": [entry]}, 3.0)  # the least recently active, b, makes room
    assert len(memory) == 2 and memory.recall(["b"])["b"].entries == []
    assert [e.digest for e in memory.recall(["a"])["a"].entries] == [b"f", b"f"]  # the window
    memory.keep({"c": [entry]}, 12.5)  # a, silent for 10.5 s, is forgotten
    assert len(memory) == 1 and memory.recall(["a"])["a"].entries == []
    with pytest.raises(ValueError):
        InProcessBlendMemory(rule, max_clients=0)


@pytest.mark.parametrize(
    ("height", "width"), [(32, 32), (224, 224), (33, 17), (15, 40), (10, 7), (16, 48)]
)
def test_host_pooling_is_torchs_adaptive_pooling(height: int, width: int) -> None:
    rng = np.random.default_rng(height * width)
    values = torch.from_numpy(rng.random((2, 3, height, width), dtype=np.float32))
    cells = (min(height, SKETCH_SIDE), min(width, SKETCH_SIDE))
    by_torch = torch.nn.functional.adaptive_avg_pool2d(values, cells)
    assert np.allclose(pooled_cells(values.numpy(), cells), by_torch.numpy(), rtol=0, atol=1e-6)
    as_float16 = (by_torch * 255).reshape(2, -1).numpy().astype(np.float16)
    # the same float16 value, or its neighbour where float32 rounding straddles a half-step
    apart = np.abs(sketches(values, 255.0).astype(np.float64) - as_float16.astype(np.float64))
    assert np.all(apart <= np.spacing(as_float16).astype(np.float64))
    eight_bit = torch.from_numpy(rng.integers(0, 256, (2, 3, height, width), dtype=np.uint8))
    assert np.array_equal(
        sketches(eight_bit),
        torch.nn.functional.adaptive_avg_pool2d(eight_bit.float(), cells)
        .reshape(2, -1)
        .numpy()
        .astype(np.float16),
    )


def test_sketching_on_another_thread_starts_no_thread_team() -> None:
    """The screening thread is not the model's: a torch op that splits its work there would
    start a second OpenMP team beside the model's (``sketches``)."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(2)
    counts: list[int] = []

    def sketch_a_batch() -> None:
        counts.append(len(os.listdir("/proc/self/task")))
        sketches(torch.rand(16, 3, 32, 32), 255.0)
        counts.append(len(os.listdir("/proc/self/task")))

    try:
        worker = threading.Thread(target=sketch_a_batch)
        worker.start()
        worker.join()
    finally:
        torch.set_num_threads(threads_before)
    assert counts[1] <= counts[0]
