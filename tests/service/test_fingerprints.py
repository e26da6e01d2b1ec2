"""The Redis fingerprint store against the in-process one (scanning, and through its index), on
a real redis-server and on the local 3-master cluster: the same queries give the same evidence,
every time; bounds, index and key layout."""

from __future__ import annotations

import uuid
from dataclasses import replace

import numpy as np
import pytest
import redis

from app.core.images import encode_image
from app.core.models import PRESETS
from app.core.stateful.defaults import DEFAULT_RULE, default_scheme
from app.core.stateful.hashes import pixel_digests
from app.core.stateful.index import MIN_SHARED_KEYS
from app.core.stateful.index import index_buckets as buckets
from app.core.stateful.match_rule import Answer, MatchEvidence
from app.core.stateful.store import Decide, InProcessFingerprintStore, StoreQuery
from app.service.fingerprints import (
    SWEEP_BATCH,
    SWEEP_LAG,
    SWEEP_LAG_S,
    Found,
    RedisFingerprintStore,
)
from evaluation.honest_traffic import EDITS, as_served, edit
from tests.core.stateful.probes import attack_sequence, photos  # noqa: F401 (a fixture)
from tests.service.helpers import RedisClusterProcesses, RedisProcess

SCHEME = default_scheme(b"test-secret")


def _answer(i: int) -> Answer:
    return Answer("accepted" if i % 3 else "rejected", i % 10, 0.5 + i / 1000, i / 100)


def stripe_probe(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Square's first probe (ART's L-inf initialisation): +-8/255 on each column of each
    channel: a close copy of the photo and no near-duplicate."""
    signs = rng.choice([-8, 8], size=(3, 1, image.shape[-1]))
    probe: np.ndarray = np.clip(image.astype(np.int16) + signs, 0, 255).astype(np.uint8)
    return probe


def _queries(photos: np.ndarray) -> list[tuple[str, np.ndarray, float]]:  # noqa: F811
    """(client, image, at): two attackers, a Sybil spread over 50 ids, Square's first probes
    (each photo, then its probe from another id), honest bursts of edits, resends and plain
    photos, interleaved; time jumps past the TTLs twice."""
    rng = np.random.default_rng(11)
    preset = PRESETS["cifar"]
    streams: list[list[tuple[str, np.ndarray]]] = [
        [("mallory", image) for image in attack_sequence(photos[0], 25, seed=1)],
        [("eve", image) for image in attack_sequence(photos[1], 25, seed=2)],
        [(f"sybil-{i % 50}", image) for i, image in enumerate(attack_sequence(photos[2], 30, 3))],
        [("alice", photos[3])] * 5,
        [("plain", photos[i]) for i in range(10, 40)],
    ]
    for c in range(30, 36):  # a probe right after its photo (a stream keeps its order)
        streams.append([(f"photo-{c}", photos[c]), (f"probe-{c}", stripe_probe(photos[c], rng))])
    for c in range(4, 8):
        burst = [photos[c]] + [
            as_served(encode_image(edit(photos[c], EDITS[i % len(EDITS)], rng), None), preset)
            for i in range(12)
        ]
        streams.append([(f"honest-{c}", image) for image in burst])
    order = np.concatenate([np.full(len(s), i) for i, s in enumerate(streams)])
    rng.shuffle(order)
    cursor = [0] * len(streams)
    out: list[tuple[str, np.ndarray, float]] = []
    at = 1000.0
    for n, s in enumerate(order.tolist()):
        client, image = streams[s][cursor[s]]
        cursor[s] += 1
        at += 500.0 if n in (90, 150) else 1.0  # past the shared TTL (300 s) twice
        out.append((client, image, at))
    return out


def _same(a: MatchEvidence, b: MatchEvidence) -> None:
    assert (a.client.distinct, a.client.exact) == (b.client.distinct, b.client.exact)
    assert (a.everyone.distinct, a.everyone.exact) == (b.everyone.distinct, b.everyone.exact)
    assert a.client.best == b.client.best and a.everyone.best == b.everyone.best
    assert set(a.other_clients) == set(b.other_clients)
    assert a.anchor == b.anchor
    assert a.consistency == b.consistency  # the consistent count's matches: close copies too
    assert DEFAULT_RULE.detects(a) == DEFAULT_RULE.detects(b)


def _replay(
    photos: np.ndarray,  # noqa: F811
    url: str,
    cluster: bool = False,
) -> tuple[int, RedisFingerprintStore]:
    bounds = {"max_fingerprints": 60, "ttl_s": 300.0, "per_client": 8, "client_ttl_s": 400.0}
    memory = InProcessFingerprintStore(SCHEME, **bounds)  # type: ignore[arg-type]
    indexed = InProcessFingerprintStore(SCHEME, **bounds)  # type: ignore[arg-type] (given keys)
    red = RedisFingerprintStore(
        url, SCHEME, prefix=f"t-{uuid.uuid4().hex[:8]}", cluster=cluster, timeout_s=2.0, **bounds
    )
    queries = _queries(photos)
    images = np.stack([image for _, image, _ in queries])
    prints, keys = SCHEME.fingerprints_and_keys(images)
    digests = pixel_digests(images)
    detections = close_only = 0
    for i, (client, _, at) in enumerate(queries):
        a, stored_a = memory.check_and_store(client, prints[i], digests[i], at, _answer(i))
        b, stored_b = red.check_and_store(client, prints[i], digests[i], at, _answer(i), keys[i])
        c, stored_c = indexed.check_and_store(
            client, prints[i], digests[i], at, _answer(i), keys[i]
        )
        _same(a, b)
        _same(a, c)
        assert stored_a.entry == stored_b.entry == stored_c.entry == i + 1
        assert a.consistency is not None
        close_only += a.consistency.distinct > max(a.client.distinct, a.everyone.distinct)
        if DEFAULT_RULE.detects(a):
            detections += 1
            assert a.anchor is not None
            # silent: the detected query keeps the anchor's answer, in every store
            memory.relabel(stored_a, a.anchor)
            red.relabel(stored_b, a.anchor)
            indexed.relabel(stored_c, a.anchor)
    assert close_only >= 4  # probes whose photo is still live found as close copies only
    return detections, red


def test_redis_and_in_process_stores_agree_query_by_query(
    redis_server: RedisProcess,
    photos: np.ndarray,  # noqa: F811
) -> None:
    detections, red = _replay(photos, redis_server.url)
    assert detections >= 30  # the attacks are detected (the test compares something)
    # bounded: at most the cap plus the sweep's lag, and each client's string at most per_client
    assert len(red) <= red.max_fingerprints + SWEEP_LAG + SWEEP_BATCH
    client = redis.Redis.from_url(redis_server.url)
    assert client.strlen(red.client_key("mallory")) == red.per_client * red.dtype.itemsize
    assert 0 < client.ttl(red.client_key("mallory")) <= 400
    assert client.ttl(red.entries_key) == -1  # bounded by the cap, never evicted


def test_the_stores_agree_on_the_cluster_and_keys_stay_in_one_slot(
    redis_cluster: RedisClusterProcesses,
    photos: np.ndarray,  # noqa: F811
) -> None:
    detections, red = _replay(photos, redis_cluster.url, cluster=True)
    assert detections >= 30
    slots = {
        red.redis.keyslot(key)  # type: ignore[union-attr]
        for key in (red.meta_key, red.entries_key, red.buckets_key)
    }
    assert len(slots) == 1
    assert red.client_key("a{b}").endswith(":{a%7Bb%7D}")  # the escaped id is the hash tag


def test_index_finds_every_match_of_the_scan(photos: np.ndarray) -> None:  # noqa: F811
    """Near-duplicates share many index buckets; unrelated photos almost none, so a lookup
    fetches the few candidates that can match, not the store."""
    sequence = attack_sequence(photos[8], 12, seed=9)
    prints, keys = SCHEME.fingerprints_and_keys(np.concatenate([sequence, photos[10:40]]))
    near = [len(set(buckets(keys[0])) & set(buckets(keys[i]))) for i in range(1, 12)]
    far = [len(set(buckets(keys[0])) & set(buckets(keys[i]))) for i in range(12, len(keys))]
    shared = [int(SCHEME.similarity(prints[0], prints[i : i + 1])[0]) for i in range(1, 12)]
    assert min(shared) >= SCHEME.threshold  # the sequence's queries all match its first
    assert min(near) >= MIN_SHARED_KEYS  # so the index must offer each of them
    assert max(far) < MIN_SHARED_KEYS


def test_redis_down_raises_for_the_caller_to_fail_open() -> None:
    red = RedisFingerprintStore("redis://127.0.0.1:1/0", SCHEME, timeout_s=0.05)
    prints, keys = SCHEME.fingerprints_and_keys(np.zeros((1, 3, 32, 32), np.uint8))
    with pytest.raises(redis.RedisError):
        red.check_and_store("a", prints[0], b"d", 1.0, None, keys[0])
    with pytest.raises(ValueError, match="index keys"):
        red.check_and_store("a", prints[0], b"d", 1.0)
    with pytest.raises(ValueError, match="braces"):
        RedisFingerprintStore("redis://127.0.0.1:1/0", SCHEME, prefix="a{b}")


def _batch_stores(url: str) -> tuple[InProcessFingerprintStore, RedisFingerprintStore]:
    """An in-process store and a Redis one with the same small bounds."""
    bounds = {"max_fingerprints": 60, "ttl_s": 300.0, "per_client": 8, "client_ttl_s": 400.0}
    memory = InProcessFingerprintStore(SCHEME, **bounds)  # type: ignore[arg-type]
    red = RedisFingerprintStore(
        url, SCHEME, prefix=f"t-{uuid.uuid4().hex[:8]}", timeout_s=2.0, **bounds
    )
    return memory, red


def _answered_queries(photos: np.ndarray) -> list[StoreQuery]:  # noqa: F811
    """``_queries`` as store queries, each with its own answer."""
    queries = _queries(photos)
    images = np.stack([image for _, image, _ in queries])
    prints, keys = SCHEME.fingerprints_and_keys(images)
    digests = pixel_digests(images)
    return [
        StoreQuery(client, prints[i], digests[i], at, _answer(i), keys[i])
        for i, (client, _, at) in enumerate(queries)
    ]


def _silent(log: list[MatchEvidence]) -> Decide:
    """``silent``'s decision, logging each query's evidence: a detected query keeps its
    anchor's answer."""

    def decide(query: StoreQuery, evidence: MatchEvidence) -> Answer | None:
        log.append(evidence)
        detected = DEFAULT_RULE.detects(evidence) and evidence.anchor != query.answer
        return evidence.anchor if detected else None

    return decide


@pytest.mark.parametrize("batch", [7, 64])
def test_batches_in_one_round_trip_give_what_one_query_at_a_time_gives(
    redis_server: RedisProcess,
    photos: np.ndarray,  # noqa: F811
    batch: int,
) -> None:
    """``check_and_store_many`` pipelines a batch's scripts and decides on the replies in
    order, writing kept (silent) answers into the later replies itself: the same evidence and
    the same kept answers as the in-process store one query at a time, in every batch size."""
    memory, red = _batch_stores(redis_server.url)
    batch_queries = _answered_queries(photos)

    expected: list[MatchEvidence] = []
    memory.check_and_store_many(batch_queries, _silent(expected))
    got: list[MatchEvidence] = []
    for start in range(0, len(batch_queries), batch):
        red.check_and_store_many(batch_queries[start : start + batch], _silent(got))
    assert len(got) == len(expected) == len(batch_queries)
    for a, b in zip(expected, got, strict=True):
        _same(a, b)
    relabelled = [e for e in expected if DEFAULT_RULE.detects(e) and e.anchor is not None]
    assert len(relabelled) >= 30  # detections whose kept answers later queries read


@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_looked_up_before_their_answers_the_queries_give_what_one_at_a_time_gives(
    redis_server: RedisProcess,
    photos: np.ndarray,  # noqa: F811
    ahead: int,
) -> None:
    """The service's order: each batch looked up (stored, answers pending) while the model
    classifies it, ``ahead`` batches before the oldest is decided; each decided on what its
    look-up found, in order. Pending records of this store's queries read as decided (kept
    answers included), so every query's evidence is what the in-process store gives one query
    at a time, and the records end up holding the answers."""
    memory, red = _batch_stores(redis_server.url)
    answered = _answered_queries(photos)
    batches = [answered[start : start + 5] for start in range(0, len(answered), 5)]

    expected: list[MatchEvidence] = []
    memory.check_and_store_many(answered, _silent(expected))
    got: list[MatchEvidence] = []
    in_flight: list[tuple[list[StoreQuery], list[Found]]] = []
    for batch in [*batches, *[[]] * ahead]:
        if batch:
            found = red.look_up_many([replace(query, answer=None) for query in batch])
            assert found is not None
            in_flight.append((batch, found))
        if len(in_flight) > ahead or (not batch and in_flight):
            oldest, its_found = in_flight.pop(0)
            red.check_and_store_many(oldest, _silent(got), its_found)
    assert len(got) == len(expected) == len(answered)
    for a, b in zip(expected, got, strict=True):
        _same(a, b)
    assert sum(DEFAULT_RULE.detects(e) for e in expected) >= 30  # kept answers were read
    client = redis.Redis.from_url(redis_server.url)

    def pending() -> int:
        records = np.frombuffer(
            b"".join(blob[: red.dtype.itemsize] for blob in client.hvals(red.entries_key)),
            red.dtype,
        )
        assert len(records) > 0
        return int((records["decision"] == 0).sum())

    assert 0 < pending() <= 5 * (1 + ahead)  # the last answers wait for the next round trip
    red.write_answers()
    assert pending() == 0  # every answer written, kept ones included
    own = np.frombuffer(client.get(red.client_key("mallory")), red.dtype)
    assert len(own) and (own["decision"] != 0).all()


def test_a_cluster_looks_up_when_it_decides(
    redis_cluster: RedisClusterProcesses,
) -> None:
    """On a cluster a query's two scripts need its answer: nothing is looked up early."""
    red = RedisFingerprintStore(redis_cluster.url, SCHEME, cluster=True, timeout_s=2.0)
    prints, keys = SCHEME.fingerprints_and_keys(np.zeros((1, 3, 32, 32), np.uint8))
    query = StoreQuery("a", prints[0], b"d", 1.0, None, keys[0])
    assert red.look_up_many([query]) is None


def test_a_photo_resent_thousands_of_times_does_not_hide_later_probes(
    redis_server: RedisProcess,
    photos: np.ndarray,  # noqa: F811
) -> None:
    """The Redis store fetches at most MAX_CANDIDATES candidates a lookup. It kept the oldest:
    that many resends of one photo (honest, a viral picture) then filled the list, and probes
    sent from fresh ids after them never reached the rule (a review: never detected). It keeps
    the newest: the probes are found, as by the in-process store, which keeps the same bound."""
    from app.core.stateful.index import MAX_CANDIDATES

    probes = attack_sequence(photos[3], 9, seed=5)[1:]
    images = np.concatenate([np.repeat(photos[3][None], MAX_CANDIDATES, 0), probes])
    prints, keys = SCHEME.fingerprints_and_keys(images)
    digests = pixel_digests(images)
    bounds = {"max_fingerprints": 5_000, "ttl_s": 3600.0, "per_client": 16}
    red = RedisFingerprintStore(
        redis_server.url, SCHEME, prefix=uuid.uuid4().hex, timeout_s=5.0, **bounds
    )
    memory = InProcessFingerprintStore(SCHEME, **bounds)
    answer = Answer("accepted", 3, 0.9, 0.5)
    queries = [
        StoreQuery(f"id-{i}", prints[i], digests[i], 1000.0 + i, answer, keys[i])
        for i in range(len(images))
    ]
    flooded = queries[:MAX_CANDIDATES]
    for start in range(0, len(flooded), 250):  # the resends, in batches (one round trip each)
        red.check_and_store_many(flooded[start : start + 250], lambda q, e: None)
    for query in flooded:
        memory.check_and_store(
            query.client_id, query.fingerprint, query.digest, query.at, answer, query.keys
        )
    detected = 0
    for query in queries[MAX_CANDIDATES:]:
        args = (query.client_id, query.fingerprint, query.digest, query.at, answer, query.keys)
        in_redis, _ = red.check_and_store(*args)
        in_memory, _ = memory.check_and_store(*args)
        assert in_redis.everyone.distinct == in_memory.everyone.distinct
        detected += DEFAULT_RULE.detects(in_redis, answer)
    assert detected >= 3  # the later probes, each from a fresh id: only everyone's scope sees them


def _noise_queries(count: int, start: float, step: float) -> list[StoreQuery]:
    """``count`` unrelated queries (noise images, each from its own id), ``step`` seconds apart."""
    images = np.random.default_rng(count).integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)
    prints, keys = SCHEME.fingerprints_and_keys(images)
    digests = pixel_digests(images)
    return [
        StoreQuery(f"id-{i}", prints[i], digests[i], start + i * step, None, keys[i])
        for i in range(count)
    ]


def test_the_sweep_lags_the_live_bounds_and_keeps_up(redis_server: RedisProcess) -> None:
    """A query's candidates are fetched a round trip after its script, so the sweep keeps
    ``SWEEP_LAG`` entries past the cap and ``SWEEP_LAG_S`` seconds past the TTL (never matched:
    the agreement tests), and deletes the rest as it goes: memory follows the live entries."""
    cap, ttl = 10, 100.0
    red = RedisFingerprintStore(
        redis_server.url, SCHEME, prefix=uuid.uuid4().hex, max_fingerprints=cap, ttl_s=ttl,
        per_client=4, timeout_s=5.0,
    )  # fmt: skip
    queries = _noise_queries(cap + SWEEP_LAG + 40, 1000.0, 0.01)
    red.check_and_store_many(queries[:-40], lambda q, e: None)
    for query in queries[-40:]:
        red.check_and_store(query.client_id, query.fingerprint, query.digest, query.at, None,
                            query.keys)  # fmt: skip
    assert len(red) == cap + SWEEP_LAG + 1  # the sweep keeps up with the cap, one a query
    within_lag = _noise_queries(1, 1000.0 + ttl + SWEEP_LAG_S - 1, 0.0)[0]
    later = _noise_queries(40, 1000.0 + ttl + SWEEP_LAG_S + 10, 0.01)
    for query in [within_lag, *later]:
        red.check_and_store(query.client_id, query.fingerprint, query.digest, query.at, None,
                            query.keys)  # fmt: skip
    assert len(red) == 1 + len(later)  # past the TTL and its lag: all swept, 8 a query


def test_a_bucket_drops_the_numbers_of_deleted_entries_when_touched(
    redis_server: RedisProcess,
) -> None:
    """One photo resent past the cap and the sweep's lag: every query reads and rewrites the
    same buckets, so each list holds exactly the entries not yet deleted (memory follows the
    live entries; the script skips the trim's copy only where no number is below ``lo``)."""
    cap = 10
    red = RedisFingerprintStore(
        redis_server.url, SCHEME, prefix=uuid.uuid4().hex, max_fingerprints=cap, per_client=4,
        timeout_s=5.0,
    )  # fmt: skip
    photo = _noise_queries(1, 1000.0, 0.0)[0]
    resent = [replace(photo, client_id=f"id-{i}", at=1000.0 + i * 0.01) for i in range(300)]
    red.check_and_store_many(resent, lambda q, e: None)
    client = redis.Redis.from_url(redis_server.url)
    lowest = int(client.hget(red.meta_key, "lo") or 0)
    assert lowest == len(resent) - cap - SWEEP_LAG  # the sweep deleted the entries before it
    assert photo.keys is not None
    for bucket in np.unique(buckets(photo.keys)).tolist():
        filed = client.hget(red.buckets_key, int(bucket).to_bytes(4, "big"))
        assert filed is not None
        numbers = np.frombuffer(filed, ">u4").tolist()
        assert numbers == list(range(lowest, len(resent) + 1))


def test_a_bucket_list_it_cannot_read_is_dropped(redis_server: RedisProcess) -> None:
    """Foreign bytes in a bucket (no whole entry numbers) would make every lookup through it
    fail: the script drops such a list and files the query afresh there."""
    red = RedisFingerprintStore(redis_server.url, SCHEME, prefix=uuid.uuid4().hex)
    query = _noise_queries(1, 1.0, 0.0)[0]
    assert query.keys is not None
    bucket = int(buckets(query.keys)[0]).to_bytes(4, "big")  # a field's name: its 4 bytes
    client = redis.Redis.from_url(redis_server.url)
    client.hset(red.buckets_key, bucket, b"\1\2\3")
    red.check_and_store("bob", query.fingerprint, query.digest, 1.0, None, query.keys)
    assert client.hget(red.buckets_key, bucket) == np.array([1], ">u4").tobytes()


def test_records_it_cannot_read_are_the_store_failing(redis_server: RedisProcess) -> None:
    """A client's string of another record layout (foreign data under the prefix) raised a
    ValueError, which the service does not take for the store failing: a 500 for that client's
    next 256 queries. It is a Redis error now, so the query is answered as usual (fail open)."""
    red = RedisFingerprintStore(redis_server.url, SCHEME, prefix=uuid.uuid4().hex)
    image = np.random.default_rng(0).integers(0, 255, (1, 3, 32, 32), dtype=np.uint8)
    prints, keys = SCHEME.fingerprints_and_keys(image)
    redis.Redis.from_url(redis_server.url).set(red.client_key("bob"), b"\0" * 100, ex=60)
    digest = pixel_digests(image)[0]
    with pytest.raises(redis.RedisError, match="unreadable fingerprint records"):
        red.check_and_store("bob", prints[0], digest, 1.0, _answer(1), keys[0])
    # and the unreadable string is dropped: the client's next query is screened as usual
    evidence, _ = red.check_and_store("bob", prints[0], digest, 2.0, _answer(1), keys[0])
    assert evidence.client.exact == 0  # its string was dropped, the first query with it
    assert evidence.everyone.exact == 1  # everyone's scope kept the first query


def test_stores_of_another_record_layout_keep_apart(
    redis_server: RedisProcess,
    photos: np.ndarray,  # noqa: F811
) -> None:
    """Replicas with close copies on and off (629- and 181-byte records), or of two versions,
    on one Redis and prefix: each keeps its own keys and matches its own queries; neither reads
    the other's records (which it would refuse as unreadable: the query answered unscreened)."""
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    bare = default_scheme(b"test-secret", close_radius=None)
    stores = [
        RedisFingerprintStore(redis_server.url, scheme, prefix=prefix, timeout_s=2.0)
        for scheme in (SCHEME, bare)
    ]
    assert {s.dtype.itemsize for s in stores} == {629, 181}
    assert stores[0].entries_key != stores[1].entries_key
    assert stores[0].client_key("a") != stores[1].client_key("a")
    near = attack_sequence(photos[4], 2, seed=5)
    for store in stores:
        prints, keys = store.scheme.fingerprints_and_keys(near)
        digests = pixel_digests(near)
        first, _ = store.check_and_store("a", prints[0], digests[0], 1.0, _answer(1), keys[0])
        assert first.everyone.distinct == 0  # the other layout's query is not seen
        second, _ = store.check_and_store("a", prints[1], digests[1], 2.0, _answer(2), keys[1])
        assert second.client.distinct == second.everyone.distinct == 1


def test_stores_of_another_bucket_count_keep_apart(
    redis_server: RedisProcess,
    photos: np.ndarray,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An index of another bucket count (a replica of a version before 2^19 buckets) files its
    entries elsewhere: sharing its keys, each would look for the other's entries in the wrong
    buckets. The bucket bits are in the key layout, so each keeps its own keys."""
    import app.core.stateful.index as index_keys

    prefix = f"t-{uuid.uuid4().hex[:8]}"
    near = attack_sequence(photos[4], 2, seed=5)
    prints, keys = SCHEME.fingerprints_and_keys(near)
    digests = pixel_digests(near)
    today = RedisFingerprintStore(redis_server.url, SCHEME, prefix=prefix, timeout_s=2.0)
    assert today.layout == f"r{today.dtype.itemsize}b{index_keys.BUCKET_BITS}f4"
    today.check_and_store("a", prints[0], digests[0], 1.0, _answer(1), keys[0])
    monkeypatch.setattr(index_keys, "BUCKET_BITS", 17)  # every store reads it there
    older = RedisFingerprintStore(redis_server.url, SCHEME, prefix=prefix, timeout_s=2.0)
    assert older.buckets_key != today.buckets_key
    assert older.client_key("a") != today.client_key("a")
    first, _ = older.check_and_store("a", prints[1], digests[1], 2.0, _answer(2), keys[1])
    assert first.client.distinct == first.everyone.distinct == 0  # today's query is not seen
    second, _ = older.check_and_store("a", prints[0], digests[0], 3.0, _answer(1), keys[0])
    assert second.client.distinct == second.everyone.distinct == 1  # its own query is


def test_past_the_candidate_bound_both_stores_compare_the_newest(
    redis_server: RedisProcess,
    photos: np.ndarray,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both stores compare a query with its newest ``MAX_CANDIDATES`` index candidates: past
    that bound the Redis store and the in-process one still decide alike (the in-process store
    had no bound, and an attack's 257th near-duplicate could find another earliest match, the
    anchor whose answer ``consistent`` serves), while the scan, unbounded, sees more."""
    from app.core.stateful import index

    monkeypatch.setattr(index, "MAX_CANDIDATES", 4)
    images = attack_sequence(photos[3], 12, seed=5)
    prints, keys = SCHEME.fingerprints_and_keys(images)
    digests = pixel_digests(images)
    bounds = {"max_fingerprints": 500, "ttl_s": 3600.0, "per_client": 8}
    red = RedisFingerprintStore(
        redis_server.url, SCHEME, prefix=uuid.uuid4().hex, timeout_s=5.0, **bounds
    )
    indexed = InProcessFingerprintStore(SCHEME, **bounds)  # type: ignore[arg-type]
    scanned = InProcessFingerprintStore(SCHEME, **bounds)  # type: ignore[arg-type]
    past_the_bound = 0
    for i in range(len(images)):
        at, answer = 1000.0 + i, _answer(i)
        args = (f"id-{i}", prints[i], digests[i], at, answer)  # fresh ids: everyone's scope
        in_redis, _ = red.check_and_store(*args, keys[i])
        in_memory, _ = indexed.check_and_store(*args, keys[i])
        scan, _ = scanned.check_and_store(*args)
        _same(in_redis, in_memory)
        assert in_memory.everyone.distinct <= 4
        past_the_bound += scan.everyone.distinct > in_memory.everyone.distinct
    assert past_the_bound >= 3  # the bound was reached (the test compares something)
