"""The query-attack command (evaluation.query_attacks): its HTTP check against the in-process
records, and the command end to end (records, summary, check over HTTP)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from app.core.guard import Guard
from evaluation.data import ImageSplit
from evaluation.query_attacks import REPLAYED, http_check
from evaluation.query_oracles import GuardOracle
from evaluation.query_runs import (
    load_records,
    records_path,
    run_attack,
)


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
