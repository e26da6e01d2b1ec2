"""``advguard bench``: lists the benchmark scripts, forwards options, rejects unknown names.

Nothing here runs a benchmark: ``--help`` of a benchmark stops in its argument parser.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import bench.common
from app.cli import main
from bench.cli import discover

KNOWN = (
    "builder_speed",
    "client_rotation",
    "decode_speed",
    "demo_accuracy",
    "load_service",
    "overload",
    "search_scale",
    "soak",
)


def test_discovery_finds_every_script_with_an_argv_main_and_no_helper() -> None:
    found = discover()
    assert set(KNOWN) <= set(found)
    assert not {"common", "cli", "__init__"} & set(found)
    assert found["decode_speed"].startswith("Decode time of a 1080p JPEG")


def test_discovery_skips_scripts_whose_main_takes_no_arguments(tmp_path: Path) -> None:
    (tmp_path / "takes_argv.py").write_text('"""Forwardable."""\ndef main(argv=None): ...\n')
    (tmp_path / "no_argv.py").write_text('"""Old style."""\ndef main(): ...\n')
    (tmp_path / "no_main.py").write_text('"""A helper."""\nX = 1\n')
    (tmp_path / "broken.py").write_text("def main(argv:\n")
    assert discover(tmp_path) == {"takes_argv": "Forwardable."}


def test_bench_help_lists_the_benchmarks(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in KNOWN:
        assert name in out


def test_unknown_benchmark_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "no_such_benchmark", "--runs", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'no_such_benchmark'" in err
    assert "decode_speed" in err  # the valid names are in the message


def test_options_are_forwarded_to_the_benchmark(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench.common, "_invocation", None)
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "decode_speed", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: advguard bench decode_speed")
    assert "--runs" in out
    assert bench.common.command_line() == "advguard bench decode_speed --help"


def test_command_line_records_the_advguard_invocation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.common, "_invocation", None)
    bench.common.set_invocation(["advguard", "bench", "search_scale", "--n", "1000", "--k", "a b"])
    assert bench.common.command_line() == "advguard bench search_scale --n 1000 --k 'a b'"
