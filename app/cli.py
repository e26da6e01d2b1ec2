"""``advguard``: one command, with subcommands for every job (build, classify, serve, ...).

Each package contributes its subcommands through a ``register(commands)`` function in its own
``cli`` module, listed in ``_SUBCOMMAND_MODULES``. Heavy imports happen inside each subcommand's
run function so that ``advguard --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

_SUBCOMMAND_MODULES: tuple[str, ...] = (
    "index_builder.cli",
    "app.classify_cli",
    "app.service.cli",
    "evaluation.cli",
    "bench.cli",
)


DESCRIPTION = """\
advguard guards an image classifier against adversarial examples: build a bundle of the
classifier's training features (build), then classify through the guard, one file at a time
(classify) or as an HTTP service (serve); measure the guard (evaluate, simulate, bench).
'advguard COMMAND --help' lists a command's options.
"""

EPILOG = """\
example: advguard build --source data.tar.gz --split train --arch resnet20 --weights w.th \
--out bundles/mine && advguard serve --bundle bundles/mine (without a bundle, 'advguard
serve' serves the bundled CIFAR-10 demo)
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``advguard`` parser; its help is the user's, this module's docstring the developer's."""
    parser = argparse.ArgumentParser(prog="advguard", description=DESCRIPTION, epilog=EPILOG)
    commands = parser.add_subparsers(dest="command", required=True)
    for module_name in _SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(commands)
    return parser


# What a user's input can make any command raise: a bad bundle, model, source or option (the
# core's AdvguardError), or a path that is missing or of the wrong kind. Said in one line, exit 2,
# as argparse does for a bad argument; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer of at least ``minimum`` (a count, a size, a number of rounds),
    refused by argparse in one line otherwise; 0 only where it means something (torch's own
    thread count, one client)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected at least {minimum}, got {value}")
        return value

    return parse


def said_in_one_line(run: Callable[[], int], prog: str) -> int:
    """``run()``, or, for a user's error (``USER_ERRORS`` and the core's ``AdvguardError``), one
    line ``<prog>: error: ...`` on stderr and exit 2. Every entry point goes through it: the
    ``advguard`` subcommands and each ``python -m`` tool."""
    from app.core.errors import AdvguardError

    said: tuple[type[Exception], ...] = (AdvguardError, *USER_ERRORS)
    try:
        return run()
    except said as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(words)
    args.argv = words  # what was asked, for the commands that record their command line
    result: int = said_in_one_line(lambda: args.run(args), f"advguard {args.command}")
    return result


if __name__ == "__main__":
    raise SystemExit(main())
