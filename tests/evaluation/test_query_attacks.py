"""Query attacks through the client's view (evaluation.query_attacks), the honest look-alike
traffic and the stateful replay (evaluation.stateful_eval), on the demo bundle and real
CIFAR-10 photos: the attacker's encodings, the recorder's memory, cap and stop, the record
cache, tiny end-to-end ART runs in process and one over HTTP."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.core.guard import Guard
from app.core.stateful.defaults import DEFAULT_RULE, default_scheme
from evaluation.data import ImageSplit
from evaluation.honest_traffic import (
    HonestQuery,
    TrafficKind,
    TrafficPlan,
    as_served,
    encode,
    interleave,
    to_pil,
)
from evaluation.query_attacks import REPLAYED, http_check
from evaluation.query_oracles import Answer, GuardOracle, HttpOracle, parse_answer
from evaluation.query_runs import (
    SQUARE_EPS,
    AttackStopped,
    Budget,
    QueryRecorder,
    decision_vectors,
    load_records,
    records_path,
    run_attack,
    save_records,
    score_vectors,
    square_adversarial,
    square_margin,
)
from evaluation.simulate_cli import is_loopback
from evaluation.stateful_eval import (
    CALIBRATION_BUDGET,
    HonestCounts,
    LazyAnswers,
    LazyFingerprints,
    calibrate,
    false_flags,
    honest_timeline,
    replay_attack,
    summarise_outcomes,
)
from evaluation.stateful_eval import _viral_note as viral_note
from evaluation.stateful_eval import main as stateful_eval_main
from tests.conftest import CIFAR_TAR, DEMO_BUNDLE


@pytest.fixture(scope="module")
def guard() -> Guard:
    torch.set_num_threads(1)
    return Guard.load(DEMO_BUNDLE, device="cpu")


@pytest.fixture(scope="module")
def labelled(guard: Guard) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 test photos the model classifies correctly and the guard accepts, 2 per class."""
    images, labels = [], []
    names = guard.class_names
    counts = dict.fromkeys(names, 0)
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or parts[0] != "test" or counts.get(parts[1], 2) >= 4:
                continue
            handle = tar.extractfile(member)
            assert handle is not None
            picture = Image.open(io.BytesIO(handle.read())).convert("RGB")
            images.append(np.asarray(picture).transpose(2, 0, 1))
            labels.append(names.index(parts[1]))
            counts[parts[1]] += 1
            if all(c >= 4 for c in counts.values()):
                break
    pixels, targets = np.stack(images), np.array(labels)
    verdicts = guard.classify_pixels(torch.from_numpy(pixels.astype(np.float32) / 255.0))
    keep = [v.accepted and v.predicted_class == t for v, t in zip(verdicts, targets, strict=True)]
    return pixels[keep], targets[keep]


# --------------------------------------------------------------------------- the client's view


def test_score_vectors_hide_what_the_answer_hides() -> None:
    answers = [Answer("accepted", 2, 0.91), Answer("rejected"), Answer("unguarded", 0, 0.5)]
    vectors = score_vectors(answers, 4)
    assert vectors.shape == (3, 5)
    assert vectors[0, 2] == pytest.approx(0.91) and vectors[0, 0] == pytest.approx(0.03)
    assert np.allclose(vectors[1, :4], 0.25) and vectors[1, 4] == 1.0
    labels = np.array([2, 2, 1])
    assert square_margin(vectors, labels) == pytest.approx([0.88, 0.0, -(0.5 - 0.5 / 3)])
    assert square_adversarial(vectors, labels).tolist() == [False, False, True]


def test_decision_vectors_read_a_rejection_as_the_true_label() -> None:
    answers = [Answer("accepted", 2, 0.9), Answer("rejected"), Answer("refused")]
    vectors = decision_vectors(answers, 4, label=1)
    assert vectors.argmax(axis=1).tolist() == [2, 1, 1]


def test_parse_answer() -> None:
    body = {"decision": "accepted", "prediction": {"class_index": 3, "probability": 0.7}}
    assert parse_answer(200, body) == Answer("accepted", 3, 0.7)
    assert parse_answer(200, {"decision": "rejected", "prediction": None}) == Answer("rejected")
    assert parse_answer(403, {"error": "client_flagged"}) == Answer("refused")
    assert is_loopback("http://127.0.0.1:8000") and not is_loopback("http://10.0.0.1:8000")
    with pytest.raises(ValueError):
        HttpOracle("http://192.0.2.1:8000")


class CountingOracle:
    """Answers class (sum of pixels) % 3, accepted, and keeps what it was sent."""

    num_classes = 3

    def __init__(self, constant: int | None = None) -> None:
        self.constant = constant
        self.sent: list[np.ndarray] = []

    def ask(self, images: np.ndarray) -> list[Answer]:
        self.sent.extend(images)
        return [
            Answer(
                "accepted", self.constant if self.constant is not None else int(i.sum()) % 3, 0.9
            )
            for i in images
        ]


def test_recorder_memory_and_cap() -> None:
    """Repeats, and float queries that round to an image already sent, are answered from the
    attacker's memory; the query past the cap ends the run."""
    original = np.full((3, 4, 4), 100, np.uint8)
    oracle = CountingOracle(constant=0)  # always the true class: never a success
    recorder = QueryRecorder(oracle, original, label=0, cap=3, budget=Budget("inf", 8 / 255))
    x = original[None].astype(np.float32) / 255.0
    recorder.ask(np.concatenate([x, x]))
    recorder.ask(x + 0.2 / 255)
    assert len(oracle.sent) == 1 and len(recorder.queries) == 1
    recorder.ask(np.concatenate([x + 1 / 255, x + 2 / 255, x]))
    assert len(recorder.queries) == 3 and recorder.first_success is None
    with pytest.raises(AttackStopped):
        recorder.ask(x + 3 / 255)
    assert recorder.stopped == "cap" and len(oracle.sent) == 3


def test_recorder_stops_a_run_that_only_repeats_itself_when_asked_to() -> None:
    """``stall_asks``: that many consecutive asks answered from memory end the run; a fresh
    query resets the count; without it a run may repeat itself forever."""
    original = np.full((3, 4, 4), 100, np.uint8)
    x = original[None].astype(np.float32) / 255.0
    patient = QueryRecorder(CountingOracle(0), original, 0, 10, Budget("inf", 8 / 255))
    for _ in range(50):
        patient.ask(x)
    assert patient.stopped == "finished" and len(patient.queries) == 1

    recorder = QueryRecorder(
        CountingOracle(0), original, 0, 10, Budget("inf", 8 / 255), stall_asks=3
    )
    recorder.ask(x)  # fresh
    recorder.ask(x)
    recorder.ask(x)  # two stale asks
    recorder.ask(x + 1 / 255)  # fresh again: the count restarts
    recorder.ask(x)
    recorder.ask(x)
    with pytest.raises(AttackStopped):
        recorder.ask(x + 1 / 255)  # the third stale ask in a row
    assert recorder.stopped == "stalled" and len(recorder.queries) == 2


def test_recorder_stops_at_first_in_budget_success() -> None:
    original = np.full((3, 4, 4), 100, np.uint8)  # sum 4800, class 0
    recorder = QueryRecorder(CountingOracle(), original, 0, 10, Budget("inf", 8 / 255))
    x = original[None].astype(np.float32) / 255.0
    step = np.zeros_like(x)
    step[0, 0, 0, 0] = 1 / 255  # sum 4801: class 1, one grey level away
    with pytest.raises(AttackStopped):
        recorder.ask(np.concatenate([x, x + step]))
    assert recorder.stopped == "success" and recorder.first_success == 1


def test_guard_oracle_answers_like_the_service(
    guard: Guard, labelled: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = labelled
    pixels = torch.from_numpy(images.astype(np.float32) / 255.0)
    on = GuardOracle(guard, guarded=True).ask(images)
    for answer, verdict in zip(on, guard.classify_pixels(pixels), strict=True):
        assert answer.decision == ("accepted" if verdict.accepted else "rejected")
        assert answer.class_index == (verdict.predicted_class if verdict.accepted else None)
    off = GuardOracle(guard, guarded=False).ask(images)
    assert {a.decision for a in off} == {"unguarded"}
    assert [a.class_index for a in off] == labels.tolist()


# --------------------------------------------------------------------------- ART end to end


@pytest.mark.parametrize(("attack", "cap"), [("square", 60), ("hopskipjump", 150)])
def test_tiny_attack_runs_in_process(
    guard: Guard, labelled: tuple[np.ndarray, np.ndarray], attack: str, cap: int, tmp_path: Path
) -> None:
    images, labels = labelled
    pool = images[labels != labels[0]]
    records = []
    for guarded in (False, True):
        oracle = GuardOracle(guard, guarded=guarded)
        record = run_attack(oracle, attack, images[0], int(labels[0]), cap, 0, 0, pool)  # type: ignore[arg-type]
        assert 0 < len(record.queries) <= cap and record.queries.dtype == np.uint8
        assert np.array_equal(record.queries[0], images[0])  # ART asks about the original first
        assert len({q.tobytes() for q in record.queries}) == len(record.queries)  # no repeats
        assert record.stopped in ("success", "cap", "finished")
        if record.succeeded:
            i = record.first_success
            assert record.classes[i] not in (-1, labels[0])
            if attack == "square":
                gap = np.abs(record.queries[i].astype(int) - images[0].astype(int)).max()
                assert gap <= round(SQUARE_EPS * 255)
        records.append(record)
    assert any(r.succeeded for r in records)  # so the success checks above ran
    path = tmp_path / "records.npz"
    save_records(records, path)
    for loaded, record in zip(load_records(path), records, strict=True):
        assert np.array_equal(loaded.queries, record.queries)
        assert np.array_equal(loaded.classes, record.classes)
        assert loaded.first_success == record.first_success


@pytest.mark.slow
def test_http_oracle_gives_the_same_run(
    guard: Guard, labelled: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """The same Square run over HTTP against ``advguard serve`` and in process: the same queries,
    the same answers, the same outcome."""
    from tests.deploy.helpers import advguard_serve
    from tests.service.helpers import free_port

    images, labels = labelled
    port = free_port()
    # the guard alone, as GuardOracle answers: the stateful layer (on by default) may serve a
    # probe its anchor's answer from its first near-duplicate on (the consistent count)
    env = {"ADVGUARD_TORCH_THREADS": "1", "ADVGUARD_STATEFUL_ENABLED": "false"}
    with advguard_serve(port, tmp_path / "serve.log", env, "--log-level", "warning"):
        http = HttpOracle(f"http://127.0.0.1:{port}", client_id="attacker", max_queries=200)
        try:
            for a, b in zip(http.ask(images[:4]), GuardOracle(guard).ask(images[:4]), strict=True):
                assert (a.decision, a.class_index) == (b.decision, b.class_index)
                assert a.probability == pytest.approx(b.probability, abs=1e-5)  # batch float noise
            over_http = run_attack(http, "square", images[1], int(labels[1]), 40, 1)
        finally:
            http.close()
    in_process = run_attack(GuardOracle(guard), "square", images[1], int(labels[1]), 40, 1)
    assert np.array_equal(over_http.queries, in_process.queries)
    assert np.array_equal(over_http.classes, in_process.classes)
    assert over_http.first_success == in_process.first_success


@pytest.mark.slow
def test_http_check_compares_each_image_with_its_in_process_run(
    guard: Guard, labelled: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """``http_check`` against ``advguard serve`` (without the query screening, like the
    in-process guard-on runs): the recorded queries replayed over HTTP get the recorded answers,
    and each attack rerun over HTTP has its in-process outcome. A reference altered in one
    answer and one outcome is counted as differing in exactly those."""
    from tests.deploy.helpers import advguard_serve
    from tests.service.helpers import free_port

    images, labels = labelled
    split = ImageSplit(images, labels, [f"test/{i}" for i in range(len(labels))], guard.class_names)
    rows, cap, seed = np.array([1, 2]), 30, 1
    reference = [
        run_attack(GuardOracle(guard), "square", images[r], int(labels[r]), cap, seed + r, int(r))
        for r in rows
    ]
    decisions = reference[0].decisions.copy()
    decisions[0] = (decisions[0] + 1) % 3
    altered = [
        dataclasses.replace(reference[0], decisions=decisions),
        dataclasses.replace(
            reference[1], first_success=-1 if reference[1].first_success >= 0 else 0
        ),
    ]
    port = free_port()
    env = {"ADVGUARD_TORCH_THREADS": "1", "ADVGUARD_STATEFUL_ENABLED": "false"}
    with advguard_serve(port, tmp_path / "serve.log", env, "--log-level", "warning"):
        url = f"http://127.0.0.1:{port}"
        same = http_check(url, "square", split, rows, reference, cap, seed, rows)
        differing = http_check(url, "square", split, rows, altered, cap, seed, rows)
    replayed = sum(min(REPLAYED, len(r.queries)) for r in reference)
    assert same["images"] == 2 and same["replayed_queries"] == replayed
    assert same["same_outcome"] == same["same_queries"] == 2
    assert same["same_answers"] == replayed
    assert [i["http"] for i in same["per_image"]] == [r.queries_to_success for r in reference]
    assert differing["same_answers"] == replayed - 1
    assert differing["same_outcome"] == 1 and differing["same_queries"] == 2


@pytest.mark.slow
def test_the_command_records_summarises_and_checks_over_http(tmp_path: Path) -> None:
    """``python -m evaluation.query_attacks`` end to end on 2 images: the in-process runs are
    recorded and summarised, ``--summarise-only`` gives the same summary from the records
    without attacking, and ``--url`` reruns them against ``advguard serve`` (HTTP check)."""
    from evaluation.query_attacks import main as query_attacks_main
    from tests.deploy.helpers import advguard_serve
    from tests.service.helpers import free_port

    out, cache = tmp_path / "out", tmp_path / "cache"
    common = ["--images", "2", "--attacks", "square", "--settings", "guard_on"]
    common += ["--cap-square", "20", "--out", str(out), "--cache", str(cache)]
    assert query_attacks_main(common) == 0
    results = json.loads((out / "results.json").read_text())
    run = results["runs"]["square/guard_on"]
    assert list(results["runs"]) == ["square/guard_on"]
    assert results["images"] == 2 and results["caps"]["square"] == 20
    assert run["command"].startswith("python -m evaluation.query_attacks --images 2")
    assert run["conditions"]["cap"] == 20 and run["conditions"]["seed"] == 0
    assert "command" not in results  # each run records its own
    recorded = load_records(records_path(cache, "square", "guard_on"))
    assert len(recorded) == 2 and all(0 < len(r.queries) <= 20 for r in recorded)
    assert "square" in (out / "table.md").read_text().lower()

    path = records_path(cache, "square", "guard_on")
    path.rename(tmp_path / "moved.npz")  # --summarise-only must not attack again...
    with pytest.raises(FileNotFoundError):
        query_attacks_main([*common, "--summarise-only"])
    (tmp_path / "moved.npz").rename(path)  # ...and with the records back, sums them up
    assert query_attacks_main([*common, "--summarise-only"]) == 0
    assert json.loads((out / "results.json").read_text())["runs"]["square/guard_on"] == run
    # records made under other conditions are refused, and so is a table that would mix runs
    # made under different ones; neither touches results.json
    before = (out / "results.json").read_text()
    other_cap = list(common)
    other_cap[other_cap.index("--cap-square") + 1] = "10"
    assert query_attacks_main([*other_cap, "--summarise-only"]) == 2
    guard_off = [a if a != "guard_on" else "guard_off" for a in other_cap]
    assert query_attacks_main(guard_off) == 2  # square/guard_on was made with cap 20
    assert (out / "results.json").read_text() == before

    port = free_port()
    env = {"ADVGUARD_TORCH_THREADS": "1", "ADVGUARD_STATEFUL_ENABLED": "false"}
    with advguard_serve(port, tmp_path / "serve.log", env, "--log-level", "warning"):
        url = f"http://127.0.0.1:{port}"
        assert query_attacks_main([*common, "--url", url, "--http-images", "1"]) == 0
    check = json.loads((out / "results.json").read_text())["http_check"]["square/guard_on"]
    assert check["images"] == 1 and check["same_outcome"] == 1 and check["same_queries"] == 1
    assert check["same_answers"] == check["replayed_queries"] > 0

    # another --out records over the shared cache with cap 10: out's cap-20 run can no longer be
    # checked over HTTP against those records (refused before anything is sent)
    other_out = [*other_cap]
    other_out[other_out.index("--out") + 1] = str(tmp_path / "other")
    assert query_attacks_main(other_out) == 0
    assert query_attacks_main([*common, "--url", url, "--http-images", "1"]) == 2


# --------------------------------------------------------------------------- honest traffic


def test_honest_queries_are_what_the_service_sees(
    guard: Guard, labelled: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = labelled
    png = as_served(encode(to_pil(images[0]), None), guard.preset)
    assert np.array_equal(png, images[0])  # a 32x32 PNG passes unchanged
    big = as_served(encode(to_pil(images[0]).resize((64, 64)), 90), guard.preset)
    assert big.shape == (3, 32, 32) and big.dtype == np.uint8


def test_interleave_keeps_each_clients_order() -> None:
    image = np.zeros((3, 2, 2), np.uint8)
    clients = [[HonestQuery(f"c{c}", "plain", image + i) for i in range(5)] for c in range(4)]
    merged = list(interleave(clients, seed=0))
    assert len(merged) == 20
    for c in range(4):
        mine = [int(q.image[0, 0, 0]) for q in merged if q.client == f"c{c}"]
        assert mine == list(range(5))


def test_replay_detects_a_recorded_attack(
    guard: Guard, labelled: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = labelled
    record = run_attack(
        GuardOracle(guard, False),
        "hopskipjump",
        images[2],
        int(labels[2]),
        120,
        0,
        2,
        images[labels != labels[2]],
    )
    scheme = default_scheme(b"s")
    rule = DEFAULT_RULE
    lazy = LazyFingerprints(scheme, record.queries, guard)
    served = LazyAnswers(record, guard, guarded=False)
    single = replay_attack(scheme, rule, record, lazy, served, 1, 120)
    spread = replay_attack(scheme, rule, record, lazy, served, 50, 120)
    assert single.detection is not None and single.detection <= 30
    assert spread.detection is not None
    summary = summarise_outcomes([single, spread])
    assert summary["detected"] == 2 and summary["runs"] == 2
    # the answers the replay stores are the ones the attack was given, checked query by query
    assert served[0].decision == "unguarded" and served[0].class_index == record.classes[0]
    tampered = dataclasses.replace(record, classes=(record.classes + 1) % 10)
    with pytest.raises(ValueError, match="another bundle"):
        LazyAnswers(tampered, guard, guarded=False)[0]
    with pytest.raises(ValueError, match="another bundle"):  # guarded: the decision differs
        LazyAnswers(record, guard, guarded=True)[0]


def test_calibration_sets_each_count_one_above_the_honest_highest() -> None:
    counts = HonestCounts(
        kind={"a": "plain", "b": "burst", "c": "viral"},
        client_max={"a": 0, "b": 4, "c": 0},
        global_max={"a": 1, "b": 4, "c": 3},
        changed_max={"a": 0, "b": 2, "c": 0},
    )
    no_flags = {"plain": 0.0, "resend": 0.0, "burst": 0.0, "viral": 0.0}
    rule = calibrate(counts, budget=no_flags)
    assert (rule.client_matches, rule.global_matches, rule.changed_matches) == (5, 5, 3)
    assert calibrate(counts, changed=False).changed_matches is None
    assert all(f["flagged"] == 0 for f in false_flags(counts, rule).values())
    stricter = dataclasses.replace(rule, changed_matches=2)  # b changed an answer at 2
    assert false_flags(counts, stricter)["burst"]["flagged"] == 1
    # a budget of one burst client in one lets the changed-answer count drop to 1 (b is flagged,
    # a and c never changed an answer); the near-duplicate counts still flag nobody
    one_burst = {**no_flags, "burst": 1.0}
    assert calibrate(counts, budget=one_burst) == dataclasses.replace(rule, changed_matches=1)
    # the default budget rounds down: 0.5% of one client allows none
    assert calibrate(counts) == rule


def test_calibration_budget_counts_clients_per_kind() -> None:
    kinds: dict[str, TrafficKind] = {f"b{i}": "burst" for i in range(400)}
    kinds.update({f"p{i}": "plain" for i in range(400)})
    changed = {c: (1 if c in {"b0", "b1", "p0"} else 0) for c in kinds}
    zeros = dict.fromkeys(kinds, 0)
    counts = HonestCounts(kinds, zeros, zeros, changed)
    # two bursts of 400 in a 0.5% budget (2 allowed) but one plain client of 400 in 0.05% (none)
    assert calibrate(counts).changed_matches == 2
    counts = HonestCounts(kinds, zeros, zeros, {**changed, "p0": 0})
    assert calibrate(counts).changed_matches == 1
    assert calibrate(counts, budget={**CALIBRATION_BUDGET, "burst": 0.004}).changed_matches == 2


@pytest.mark.slow
def test_stateful_eval_end_to_end(
    guard: Guard, labelled: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """``python -m evaluation.stateful_eval`` on a tiny recorded Square attack (3 images, with
    and without the guard) and 3 honest clients of each kind: every stage runs, the report is
    written, and the chosen candidate's replays are the recorded runs."""
    images, labels = labelled
    pool = images[labels != labels[0]]
    cache = tmp_path / "cache"
    for setting, guarded in (("guard_off", False), ("guard_on", True)):
        oracle = GuardOracle(guard, guarded=guarded)
        records = [
            run_attack(oracle, "square", images[i], int(labels[i]), 40, 0, i, pool)
            for i in range(3)
        ]
        save_records(records, records_path(cache, "square", setting))
    scheme = "window_hash step=25 shared>=25"
    out = tmp_path / "out"
    argv = [
        "--bundle", str(DEMO_BUNDLE), "--source", str(CIFAR_TAR), "--cache", str(cache),
        "--data-cache", str(tmp_path / "data"), "--out", str(out), "--clients", "3",
        "--horizon", "40", "--schemes", scheme, "--threads", "1",
    ]  # fmt: skip
    assert stateful_eval_main(argv) == 0
    summary = json.loads((out / "stateful.json").read_text())
    assert summary["chosen"] == scheme and summary["honest_plan"]["clients"] == 3
    result = summary["schemes"][scheme]
    for setting in ("square/guard_off", "square/guard_on"):
        for spread in ("single", "sybil"):  # one client id, and the Sybil spread
            assert len(result["outcomes"][setting][spread]) == 3
    assert "outcomes" not in summary["chosen_counts_only"]
    assert summary["cost"]["fingerprint_ms"] > 0 and summary["cost"]["bytes_per_fingerprint"] > 0
    assert summary["command"].startswith("python -m evaluation.stateful_eval")
    assert scheme in (out / "stateful.md").read_text()
    # the honest traffic, read back from its cache: each viral sender's one copy of a viral
    # photo is marked, and nothing else is
    plan = TrafficPlan(clients=3)
    for split, seed in (("train", 0), ("test", 1)):
        traffic = honest_timeline(guard, CIFAR_TAR, split, cache, tmp_path / "data", plan, seed)
        marked = [i for i in range(len(traffic.clients)) if traffic.is_circulating(i)]
        assert sorted(traffic.clients[i] for i in marked) == [
            f"{split}-viral-{c}" for c in range(3)
        ]


def test_viral_false_flags_are_bounded_per_photo_not_per_sender() -> None:
    """Senders of the same few photos are not independent samples: with none flagged, the
    bound is over the photos (0 of 4: Wilson 0-49%), never the senders' 0.38%."""
    none = viral_note(1000, 0, 4)
    assert "per photo 0 of 4, 95% interval 0%-49%" in none and "0.38" not in none
    some = viral_note(1000, 3, 4)
    assert "3 senders were flagged" in some and "interval" not in some.split("holds. ")[1]


def test_counts_below_one_and_a_remote_url_are_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cap of 0 used to replace the recorded runs in --cache with empty ones, then crash."""
    from evaluation.query_attacks import main

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "square-guard_off.npz").write_bytes(b"recorded")
    base = ["--cache", str(cache), "--out", str(tmp_path / "out")]
    for extra, message in (
        (["--cap-square", "0"], "argument --cap-square: expected at least 1, got 0"),
        (["--images", "-1"], "argument --images: expected at least 1, got -1"),
        (["--url", "http://192.168.0.1:8000"], "is not a loopback address"),
        (["--out", str(cache / "square-guard_off.npz")], "exists and is not a directory"),
    ):
        with pytest.raises(SystemExit) as exited:
            main([*base, *extra])
        assert exited.value.code == 2
        assert message in capsys.readouterr().err
    assert (cache / "square-guard_off.npz").read_bytes() == b"recorded"
    assert not (tmp_path / "out").exists()
