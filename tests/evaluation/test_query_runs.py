"""One recorded query attack (evaluation.query_runs), on the demo bundle and real CIFAR-10 photos:
the attacker's encodings, the recorder's memory, cap and stop, the record cache, tiny end-to-end
ART runs in process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.core.guard import Guard
from evaluation.query_oracles import Answer, GuardOracle
from evaluation.query_runs import (
    SQUARE_EPS,
    AttackStopped,
    Budget,
    QueryRecorder,
    decision_vectors,
    load_records,
    run_attack,
    save_records,
    score_vectors,
    square_adversarial,
    square_margin,
)


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
