"""``advguard``: a user's mistake is said in one line with exit 2, in every subcommand."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from app.cli import build_parser, main
from app.core.errors import ConfigError
from app.core.features import pick_device


def test_a_device_this_machine_lacks_or_torch_does_not_know_is_refused() -> None:
    beyond = f"cuda:{torch.cuda.device_count()}"  # one past the last CUDA device, on any machine
    with pytest.raises(ConfigError, match=f"device '{beyond}': this machine has"):
        pick_device(beyond)
    with pytest.raises(ConfigError, match="'bogus' is not a torch device"):
        pick_device("bogus")
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["evaluate", "--bundle", "{tmp}/nowhere", "--out", "{tmp}/out"], "is not a bundle"),
        (["simulate", "--bundle", "{tmp}/nowhere", "--out", "{tmp}/out"], "is not a bundle"),
        (["classify", "--device", "bogus", "{tmp}/x.jpg"], "'bogus' is not a torch device"),
        (
            ["evaluate", "--arch", "resnet20", "--weights", "{tmp}/none.th", "--out", "{tmp}/o"],
            "none.th",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    """These ended in tracebacks (evaluate's and simulate's bundle and file errors, classify's
    device): now ``advguard <command>: error: ...``, as argparse says a bad argument."""
    code = main([word.format(tmp=tmp_path) for word in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"advguard {argv[0]}: error: ") and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1


def test_classify_refuses_a_batch_size_below_one(capsys: pytest.CaptureFixture[str]) -> None:
    """--batch-size 0 raised from range(); -1 printed nothing and exited 0."""
    for size in ("0", "-1"):
        with pytest.raises(SystemExit) as exited:
            main(["classify", "--batch-size", size, "x.jpg"])
        assert exited.value.code == 2
        assert f"--batch-size: expected at least 1, got {size}" in capsys.readouterr().err


def test_said_in_one_line_keeps_the_traceback_of_anything_but_a_users_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from app.cli import said_in_one_line

    def missing() -> int:
        raise FileNotFoundError("no such file: x.npz")

    def bug() -> int:
        raise RuntimeError("a bug")

    assert said_in_one_line(missing, "python -m tool") == 2
    assert capsys.readouterr().err == "python -m tool: error: no such file: x.npz\n"
    with pytest.raises(RuntimeError, match="a bug"):
        said_in_one_line(bug, "python -m tool")
    assert said_in_one_line(lambda: 0, "python -m tool") == 0


def test_python_m_tools_say_a_users_error_in_one_line(tmp_path: Path) -> None:
    """The ``python -m`` tools go through the same handler as ``advguard``'s subcommands."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "evaluation.demo_examples", "--bundle", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"python -m evaluation.demo_examples: error: {tmp_path / 'none'} is not a bundle: "
        "no manifest.json\n"
    )


def test_at_least_refuses_what_is_no_integer_or_below_its_minimum() -> None:
    import argparse

    from app.cli import at_least

    assert at_least(0)("0") == 0 and at_least(1)("12") == 12
    for text, minimum, message in (("0", 1, "expected at least 1, got 0"), ("x", 0, "integer")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            at_least(minimum)(text)


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "stateful_cost", "--images", "0"],  # used to read all 10,000 test images
        ["bench", "decode_speed", "--runs", "0"],  # used to fail in numpy after the runs
        ["simulate", "--mix-every", "0"],
        ["bench", "search_scale", "--batches", "1", "0"],
    ],
)
def test_counts_below_their_minimum_are_refused_by_argparse(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "expected at least 1, got 0" in capsys.readouterr().err


def test_the_top_help_is_written_for_users(capsys: pytest.CaptureFixture[str]) -> None:
    """``advguard --help`` showed the module's docstring: reST markup and the names of private
    tuples. It now says what the tool does, names every command and where its options are."""
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    for command in ("build", "classify", "serve", "evaluate", "simulate", "bench"):
        assert command in shown
    assert "advguard COMMAND --help" in shown and "serve --bundle" in shown
    assert "``" not in shown and "_SUBCOMMAND_MODULES" not in shown


def test_build_help_groups_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    """``advguard build``'s 30 options, in five named groups."""
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    shown = capsys.readouterr().out
    for group in ("images, model and output:", "detector:", "features and index:"):
        assert group in shown
    assert "calibration:" in shown and "\nrun:" in shown


def test_every_option_of_every_command_says_what_it_does() -> None:
    """An option without help shows only its name in ``--help``: none is left."""

    def silent(parser: argparse.ArgumentParser, prefix: str) -> list[str]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    found += silent(child, f"{prefix} {name}")
            elif action.help is None:
                found.append(f"{prefix} {'/'.join(action.option_strings) or action.dest}")
        return found

    assert silent(build_parser(), "advguard") == []


def test_every_option_of_every_bench_and_evaluation_tool_says_what_it_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same for the ``python -m bench.<name>`` / ``evaluation.<name>`` tools (and so
    ``advguard bench <name>``): each tool's ``main`` builds its parser and parses, and the parse is
    where its parser is caught, before anything runs."""
    import importlib
    import inspect
    import pkgutil
    from typing import NoReturn

    import bench
    import evaluation

    class ParserCaughtError(Exception):
        """Raised instead of parsing: the tool stops right after building its parser."""

    parsers: list[tuple[str, argparse.ArgumentParser]] = []
    tool = ""

    def catch(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> NoReturn:
        parsers.append((tool, self))
        raise ParserCaughtError

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    for package in (bench, evaluation):
        for module in pkgutil.iter_modules(package.__path__):
            tool = f"{package.__name__}.{module.name}"
            main = getattr(importlib.import_module(tool), "main", None)
            if not callable(main):
                continue
            with pytest.raises(ParserCaughtError):
                if inspect.signature(main).parameters:
                    main([])
                else:
                    main()
    silent = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, parser in parsers
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and action.help is None
    ]
    assert silent == []
    assert len(parsers) >= 15, [name for name, _ in parsers]
