"""``advguard bench <name> [args]``: run one benchmark script, forwarding its own options.

A benchmark is any module ``bench/<name>.py`` with a top-level ``main(argv)``; they are found by
reading the files (not importing them), so a new script shows up without being listed here and
``advguard --help`` does not pay for the benchmarks' torch/httpx imports.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
# Helpers of the benchmarks, not benchmarks themselves.
_NOT_BENCHMARKS = frozenset({"__init__", "__main__", "cli", "common"})


def _summary(tree: ast.Module) -> str:
    """First line of the module docstring, the benchmark's description in the listing."""
    docstring = ast.get_docstring(tree) or ""
    return docstring.strip().splitlines()[0] if docstring.strip() else ""


def _has_argv_main(tree: ast.Module) -> bool:
    """Whether ``main`` takes an argument list: only then can options be forwarded to it."""
    return any(
        isinstance(node, ast.FunctionDef)
        and node.name == "main"
        and len(node.args.posonlyargs) + len(node.args.args) >= 1
        for node in tree.body
    )


def discover(bench_dir: Path = BENCH_DIR) -> dict[str, str]:
    """Benchmark module name -> one-line description, sorted by name."""
    found: dict[str, str] = {}
    for path in sorted(bench_dir.glob("*.py")):
        if path.stem in _NOT_BENCHMARKS:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue  # a half-written script must not break every advguard command
        if _has_argv_main(tree):
            found[path.stem] = _summary(tree)
    return found


@contextmanager
def _program_name(name: str) -> Iterator[None]:
    """Let the benchmark's argparse usage read ``advguard bench <name>`` (it uses argv[0])."""
    saved = list(sys.argv)
    sys.argv[:1] = [name]
    try:
        yield
    finally:
        sys.argv[:] = saved


def _run(args: argparse.Namespace) -> int:
    from bench.common import set_invocation

    prefix = ["advguard", "bench", args.benchmark]
    set_invocation([*prefix, *args.args])
    module = importlib.import_module(f"bench.{args.benchmark}")
    with _program_name(" ".join(prefix)):
        result: int | None = module.main(list(args.args))
    return 0 if result is None else int(result)


def register(commands: Any) -> None:
    benchmarks = discover()
    listing = "\n".join(f"  {name:<16} {summary}" for name, summary in benchmarks.items())
    bench = commands.add_parser(
        "bench",
        help="run a benchmark (results in bench/results/)",
        description="Run one benchmark; every argument after its name goes to the benchmark "
        "(`advguard bench <name> --help` lists its options).",
        epilog=f"benchmarks:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument(
        "benchmark", choices=list(benchmarks), metavar="name", help="benchmark to run (below)"
    )
    bench.add_argument("args", nargs=argparse.REMAINDER, help="options of the benchmark")
    bench.set_defaults(run=_run)
