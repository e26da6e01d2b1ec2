"""What a client of POST /classify sees (evaluation.query_oracles): the answer parsed from a
response, the in-process oracle against the guard, and the same Square run over HTTP and in
process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.core.guard import Guard
from evaluation.query_oracles import Answer, GuardOracle, HttpOracle, parse_answer
from evaluation.query_runs import (
    run_attack,
)
from evaluation.simulate_cli import is_loopback


def test_parse_answer() -> None:
    body = {"decision": "accepted", "prediction": {"class_index": 3, "probability": 0.7}}
    assert parse_answer(200, body) == Answer("accepted", 3, 0.7)
    assert parse_answer(200, {"decision": "rejected", "prediction": None}) == Answer("rejected")
    assert parse_answer(403, {"error": "client_flagged"}) == Answer("refused")
    assert is_loopback("http://127.0.0.1:8000") and not is_loopback("http://10.0.0.1:8000")
    with pytest.raises(ValueError):
        HttpOracle("http://192.0.2.1:8000")


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
