"""The bounded, account-oblivious in-process store on real CIFAR-10 photos: its ring, TTL and
client cap, a Sybil spread, honest near-duplicate bursts, answers kept and relabelled."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from app.core.images import encode_image
from app.core.models import PRESETS
from app.core.stateful import index
from app.core.stateful.defaults import DEFAULT_RULE, default_scheme
from app.core.stateful.hashes import pixel_digests
from app.core.stateful.match_rule import Answer, Consistency, MatchEvidence
from app.core.stateful.store import (
    Decide,
    InProcessFingerprintStore,
    StoreQuery,
    check_and_store_each,
)
from evaluation.honest_traffic import EDITS, as_served, edit
from tests.core.stateful.probes import SECRET, attack_sequence


def _send(
    store: InProcessFingerprintStore, client: str, images: np.ndarray, start: float = 0.0
) -> list[MatchEvidence]:
    scheme = store.scheme
    prints = scheme.fingerprints(images)
    digests = pixel_digests(images)
    return [
        store.check_and_store(client, prints[i], digests[i], start + i)[0]
        for i in range(len(images))
    ]


def test_account_oblivious_matching(photos: np.ndarray) -> None:
    store = InProcessFingerprintStore(default_scheme(SECRET))
    near = attack_sequence(photos[0], 2, seed=3)
    _send(store, "alice", near[:1])
    (evidence,) = _send(store, "mallory", near[1:], start=1.0)
    assert evidence.client.distinct == 0  # mallory has sent nothing before
    assert evidence.everyone.distinct == 1 and evidence.other_clients == ("alice",)


def test_resends_are_exact_copies_not_near_duplicates(photos: np.ndarray) -> None:
    store = InProcessFingerprintStore(default_scheme(SECRET))
    evidence = _send(store, "alice", np.repeat(photos[:1], 20, axis=0))
    assert all(e.client.distinct == 0 and e.everyone.distinct == 0 for e in evidence)
    assert evidence[-1].client.exact == 19


def test_store_ring_is_bounded(photos: np.ndarray) -> None:
    store = InProcessFingerprintStore(default_scheme(SECRET), max_fingerprints=10, per_client=4)
    _send(store, "alice", photos[:30])
    assert len(store) == 10
    # the oldest photos have left both the shared ring and alice's buffer
    near_old = attack_sequence(photos[0], 2, seed=4)[1:]
    (evidence,) = _send(store, "bob", near_old, start=100.0)
    assert evidence.everyone.distinct == 0
    near_new = attack_sequence(photos[29], 2, seed=4)[1:]
    (evidence,) = _send(store, "alice", near_new, start=101.0)
    assert evidence.everyone.distinct == 1 and evidence.client.distinct == 1


def test_store_ttl_and_client_cap(photos: np.ndarray) -> None:
    store = InProcessFingerprintStore(
        default_scheme(SECRET), ttl_s=10.0, client_ttl_s=10.0, max_clients=3
    )
    _send(store, "alice", photos[:1], start=0.0)
    near = attack_sequence(photos[0], 2, seed=5)[1:]
    (late,) = _send(store, "alice", near, start=50.0)
    assert late.client.distinct == 0 and late.everyone.distinct == 0  # expired
    assert len(store) == 1  # the expired entry was swept
    for i, client in enumerate(["b", "c", "d", "e"]):
        _send(store, client, photos[i + 1 : i + 2], start=51.0 + i)
    assert store.clients == 3


def test_sybil_spread_is_still_detected(photos: np.ndarray) -> None:
    """One attack sequence sent round-robin by 50 client ids: no id sends twice within the
    first 50 queries, but the account-oblivious count sees every earlier step."""
    store = InProcessFingerprintStore(default_scheme(SECRET))
    sequence = attack_sequence(photos[5], 40, seed=6)
    prints = store.scheme.fingerprints(sequence)
    digests = pixel_digests(sequence)
    detected = None
    for i in range(len(sequence)):
        evidence = store.check_and_store(f"sybil-{i % 50}", prints[i], digests[i], float(i))[0]
        assert evidence.client.distinct == 0
        if DEFAULT_RULE.detects(evidence):
            detected = i + 1
            assert len(evidence.other_clients) >= DEFAULT_RULE.global_matches - 1
            break
    assert detected is not None and detected <= DEFAULT_RULE.global_matches + 3


def test_single_client_attack_detected_within_a_few_queries(photos: np.ndarray) -> None:
    store = InProcessFingerprintStore(default_scheme(SECRET))
    for seed, photo in enumerate(photos[:10]):
        evidence = _send(store, f"attacker-{seed}", attack_sequence(photo, 20, seed))
        first = next(i + 1 for i, e in enumerate(evidence) if DEFAULT_RULE.detects(e))
        assert first <= DEFAULT_RULE.client_matches + 3


def test_honest_near_duplicate_bursts_not_flagged(photos: np.ndarray) -> None:
    """Each photo and 15 edits of it (every kind, PNG or JPEG uploads), 40 clients in one store,
    and the photo resent: no query reaches the default rule."""
    store = InProcessFingerprintStore(default_scheme(SECRET))
    rng = np.random.default_rng(7)
    preset = PRESETS["cifar"]
    for c, photo in enumerate(photos):
        burst = [photo, photo]
        for i in range(15):
            quality = None if i % 2 else int(rng.choice([95, 90, 85, 75]))
            burst.append(
                as_served(encode_image(edit(photo, EDITS[i % len(EDITS)], rng), quality), preset)
            )
        for evidence in _send(store, f"honest-{c}", np.stack(burst), start=100.0 * c):
            assert not DEFAULT_RULE.detects(evidence)


def test_the_store_keeps_answers_and_relabels(photos: np.ndarray) -> None:
    store = InProcessFingerprintStore(default_scheme(SECRET), ttl_s=2.5)
    near = attack_sequence(photos[3], 3, seed=8)
    prints, digests = store.scheme.fingerprints(near), pixel_digests(near)
    first, second = Answer("accepted", 3, 0.8, 0.4), Answer("rejected", 5, 0.6, 0.1)
    relabelled = Answer("accepted", 7, 0.7, 0.3)
    evidence, _ = store.check_and_store("a", prints[0], digests[0], 0.0, first)
    assert evidence.anchor is None
    evidence, stored = store.check_and_store("b", prints[1], digests[1], 1.0, second)
    assert evidence.anchor == first  # another client's: account-oblivious
    store.relabel(stored, relabelled)
    # at 3.0 a's query has left everyone's window; b's own, relabelled, is the anchor
    evidence, _ = store.check_and_store("b", prints[2], digests[2], 3.0, second)
    assert evidence.anchor == relabelled


def test_a_close_copy_widens_the_consistent_count_only(photos: np.ndarray) -> None:
    """A probe that matches no window hash but is a close copy of a stored photo: no
    near-duplicate (the flagging counts and ``changes_answer`` see nothing), one for the
    consistent count, whose anchor is the photo's answer, from another client too. Without
    close copies (``close_radius=None``) the probe matches nothing."""
    cat, dog = Answer("accepted", 3, 0.9, 0.5), Answer("accepted", 5, 0.8, 0.4)
    signs = np.random.default_rng(4).choice([-8, 8], size=(3, 1, 32))
    probe = np.clip(photos[5].astype(int) + signs, 0, 255).astype(np.uint8)
    images = np.stack([photos[5], probe])
    for radius, found in ((9, 1), (None, 0)):
        scheme = default_scheme(SECRET, close_radius=radius)
        store = InProcessFingerprintStore(scheme)
        rows, keys = scheme.fingerprints_and_keys(images)
        digests = pixel_digests(images)
        store.check_and_store("photo", rows[0], digests[0], 0.0, cat, keys[0])
        evidence, _ = store.check_and_store("probe", rows[1], digests[1], 1.0, dog, keys[1])
        assert evidence.client.distinct == evidence.everyone.distinct == 0
        assert evidence.anchor is None and not DEFAULT_RULE.detects(evidence, dog)
        assert evidence.consistency == Consistency(found, cat if found else None)
        assert DEFAULT_RULE.keeps_anchor(evidence, dog) == bool(found)


def _mixed_traffic(photos: np.ndarray, seed: int) -> list[StoreQuery]:
    """A stream that exercises every path of a lookup: attack probes spread over clients,
    resends of one photo (rows that fill and spill), distinct photos, close-copy probes, a
    client sending several queries in one batch, and pauses past the stores' TTLs; then a run
    of resends of another photo."""
    rng = np.random.default_rng(seed)
    scheme = default_scheme(SECRET)
    parts = [attack_sequence(photos[i], 12, seed=seed + i) for i in range(4)]
    parts.append(np.repeat(photos[4:5], 24, axis=0))  # resent: many entries in its buckets
    parts.append(photos[5:25])
    signs = rng.choice([-8, 8], size=(6, 3, 1, 32))
    parts.append(np.clip(photos[25].astype(int) + signs, 0, 255).astype(np.uint8))
    images = np.concatenate(parts)[rng.permutation(sum(len(part) for part in parts))]
    # then a run of resends: the ring's every entry in the photo's buckets, rows full
    images = np.concatenate([images, np.repeat(photos[26:27], 30, axis=0)])
    prints, keys = scheme.fingerprints_and_keys(images)
    digests = pixel_digests(images)
    at = np.cumsum(rng.choice([0.5, 0.5, 0.5, 40.0], size=len(images)))
    at[-30:] = at[-31] + 0.5 * np.arange(1, 31)  # the resends without a pause
    clients = rng.choice(["a", "b", "c", "d", "e"], size=len(images), p=[0.4, 0.3, 0.1, 0.1, 0.1])
    return [
        StoreQuery(str(clients[i]), prints[i], digests[i], float(at[i]), None, keys[i])
        for i in range(len(images))
    ]


@pytest.mark.parametrize("max_fingerprints", [10, 60, 1000])
@pytest.mark.parametrize("reference", ["scan", "one by one"])
def test_a_batch_gives_what_one_query_at_a_time_gives(
    photos: np.ndarray, max_fingerprints: int, reference: str, monkeypatch: Any
) -> None:
    """``check_and_store_many`` (the batch's index buckets computed at once, then each query
    looked up, filed, matched and decided in turn) on twin stores against the same queries one
    at a time, in batches of 1 to 12: the same evidence for every query, the same answers
    kept. The reference either scans every live entry, without the index (so that the index's
    lookups, rows full and spilled, and its count of shared buckets are checked against
    comparing every row), or looks each query up in the index, with a query's newest
    candidates cut to 2, which a scan does not do. The ring wraps inside a batch (10
    entries), entries expire (TTL 30 s, pauses of 40 s), and each query decided with a match
    relabels its entry (the silent policy's anchor), which the batch's later queries read."""
    if reference == "one by one":
        monkeypatch.setattr(index, "MAX_CANDIDATES", 2)
    queries = _mixed_traffic(photos, seed=max_fingerprints)
    rng = np.random.default_rng(max_fingerprints)
    stores = [
        InProcessFingerprintStore(
            default_scheme(SECRET), max_fingerprints=max_fingerprints, ttl_s=30.0, per_client=6
        )
        for _ in range(2)
    ]
    seen: list[list[MatchEvidence]] = [[], []]

    def deciding(log: list[MatchEvidence]) -> Decide:
        def decide(query: StoreQuery, evidence: MatchEvidence) -> Answer | None:
            log.append(evidence)
            if evidence.everyone.distinct or evidence.everyone.exact:
                return Answer("accepted", len(log) % 10, 0.5, 0.2)
            return None

        return decide

    start = 0
    while start < len(queries):
        batch = queries[start : start + int(rng.integers(1, 13))]
        one_by_one = batch if reference == "one by one" else [replace(q, keys=None) for q in batch]
        check_and_store_each(stores[0], one_by_one, deciding(seen[0]))
        stores[1].check_and_store_many(batch, deciding(seen[1]))
        start += len(batch)
    assert seen[0] == seen[1]
    assert sum(bool(e.everyone.distinct) for e in seen[0]) > 10  # matches were there to find
    assert sum(e.everyone.exact for e in seen[0]) > 50  # and resends, rows full
    assert stores[0]._answers == stores[1]._answers
