"""``bench.pool_rounds``: several interleaved runs' rounds pooled into one ratio."""

import json
import subprocess
from pathlib import Path

import pytest

from bench.common import REPO, paired_ratio
from bench.pool_rounds import ResultsError, main, pooled, read_results, rounds_of


def _stateful_cost(on: list[float], off: list[float]) -> dict:
    run = {"on": {"per_round_images_per_s": on}, "off": {"per_round_images_per_s": off}}
    return {"throughput": {"runs": {"memory": run}}}


def _service_vs_bare(a: list[float], b: list[float]) -> dict:
    services = {"a": {"per_round_images_per_s": a}, "b": {"per_round_images_per_s": b}}
    return {"variants": [{"torch_threads": 2, "interleaved": {"services": services}}]}


def test_runs_pool_round_by_round() -> None:
    first = _stateful_cost([90.0, 80.0], [100.0, 100.0])
    second = _stateful_cost([300.0, 290.0, 280.0], [310.0, 300.0, 320.0])
    found = pooled([first, second])
    expected = paired_ratio([90.0, 80.0, 300.0, 290.0, 280.0], [100.0, 100.0, 310.0, 300.0, 320.0])
    assert found == {"memory: on / off": expected}


def test_service_vs_bare_runs_compare_each_service_with_the_guard_off() -> None:
    found = rounds_of(_service_vs_bare([80.0, 70.0], [100.0, 100.0]))
    assert found == {"a / b, 2 torch threads": ([80.0, 70.0], [100.0, 100.0])}
    with pytest.raises(ValueError, match="no interleaved rounds"):
        rounds_of({"variants": [{"torch_threads": 2, "interleaved": None}]})


def test_the_command_reads_files_and_committed_revisions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_stateful_cost([90.0, 81.0], [100.0, 90.0])))
    assert main([str(path), str(path)]) == 0
    out = capsys.readouterr().out
    assert "| memory: on / off | 4 | 90.0% | 90.0%-90.0% |" in out
    assert main([str(path), "--target", "0.95"]) == 0
    assert "| memory: on / off | 2 | 90.0% | 90.0%-90.0% | missed |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(path), "--target", "-1"])
    # REV:PATH reads the file as committed at that revision
    committed = "HEAD:bench/results/service_vs_bare.json"
    shown = subprocess.run(
        ["git", "show", committed], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    assert read_results(committed) == json.loads(shown)
    assert "a / b, 2 torch threads" in rounds_of(read_results(committed))
    with pytest.raises(ResultsError, match=r"missing\.json: no such file"):
        read_results(str(tmp_path / "missing.json"))


def test_unreadable_results_are_refused_in_one_line_naming_the_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "run.json"
    good.write_text(json.dumps(_stateful_cost([90.0], [100.0])))
    cases = {
        "not-json.json": ("x", "not a results file (not JSON"),
        "a-list.json": ("[1]", "not a results file (a JSON list)"),
        "no-rounds.json": ("{}", "no interleaved rounds to pool"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        assert main([str(good), str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"pool_rounds: error: {tmp_path / name}: {message}"), err
        assert err.count("\n") == 1
    assert main(["0000000:bench/results/stateful_cost.json"]) == 2
    assert "0000000:bench/results/stateful_cost.json: fatal:" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere.json")]) == 2
    assert "nowhere.json: no such file (or REV:PATH)" in capsys.readouterr().err


def test_runs_of_different_loads_are_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Until 2026-11-30 a run resent its first uploads every slice (--images 1,000 or 5,000);
    runs since send 10,000 distinct ones: pooled together they would mix two loads."""
    paths = []
    for name, images in (("old", 5000), ("new", 10000), ("new2", 10000)):
        run = _stateful_cost([90.0], [100.0])
        run["settings"] = {"images": images, "concurrency": 32, "slice": 5.0, "clients": 1000}
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(run))
    assert main([str(paths[1]), str(paths[2])]) == 0
    capsys.readouterr()
    assert main([str(paths[1]), str(paths[2]), str(paths[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pool_rounds: error: {paths[0]}: another load than {paths[1]}")
    assert "(images 5000 against 10000)" in err and err.count("\n") == 1
    # the same load on another processor: a ratio of another machine, not pooled either
    other_cpu = json.loads(paths[2].read_text())
    other_cpu["machine"] = {"cpu": "AMD EPYC"}
    paths[2].write_text(json.dumps(other_cpu))
    assert main([str(paths[1]), str(paths[2])]) == 2
    assert "(cpu AMD EPYC against None)" in capsys.readouterr().err
