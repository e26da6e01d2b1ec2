"""``advguard``: one command, with subcommands for every job (build, classify, serve, ...).

Each package contributes its subcommands through a ``register(commands)`` function in its own
``cli`` module, listed in ``_SUBCOMMAND_MODULES``. Heavy imports happen inside each subcommand's
run function so that ``advguard --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_SUBCOMMAND_MODULES: tuple[str, ...] = (
    "index_builder.cli",
    "app.classify_cli",
    "app.service.cli",
    "evaluation.cli",
    "bench.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="advguard", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for module_name in _SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(words)
    args.argv = words  # what was asked, for the commands that record their command line
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
