"""``python -m evaluation.query_attacks``: query attacks through what a client of
``POST /classify`` sees (issue 13, part 1), recorded and summarised in one command.

The run picks test images the model classifies correctly and the guard accepts, runs each attack
on each of them (``evaluation.query_runs``: ART's attacks, recorded query by query) through the
in-process oracle with the guard off and on (``evaluation.query_oracles``), caches the records,
writes ``results.json`` and ``table.md``, and with ``--url`` repeats the first images over HTTP
against a running service to show that the in-process oracle stands in for it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.cli import at_least
from app.core.guard import Guard
from app.core.manifest import MANIFEST_NAME
from evaluation.data import ImageSplit, add_data_cache_argument, load_split
from evaluation.query_oracles import (
    DECISIONS,
    GuardOracle,
    HttpOracle,
    Oracle,
)
from evaluation.query_runs import (
    ATTACKS,
    L2_EPS,
    SETTINGS,
    SQUARE_EPS,
    AttackName,
    AttackRecord,
    load_records,
    records_path,
    run_attack,
    save_records,
    summarise,
    table,
)
from evaluation.simulate_cli import is_loopback

Log = Callable[[str], None]  # a progress line's sink

# Queries per image. Square on an undefended CIFAR-10 model needs ~70 on average (Andriushchenko
# et al. 2020); 1,000 leaves room for the guard. The decision-based attacks need hundreds to a
# few thousand (BlackboxBench 2023); 2,500 keeps a 100-image run of each under ~20 minutes on one
# CPU thread while covering HopSkipJump's typical CIFAR-10 budget.
DEFAULT_CAPS: dict[AttackName, int] = {"square": 1000, "hopskipjump": 2500, "boundary": 2500}
DEFAULT_CACHE = Path(".cache/query-attacks")
DEFAULT_RESULTS = Path("evaluation/results/query-attacks")
DEFAULT_SOURCE = Path("../shared/data/cifar10-jpeg.tar.gz")
DEFAULT_BUNDLE = Path("bundles/cifar10-resnet20")


def pick_images(
    guard: Guard, split: ImageSplit, count: int, seed: int, batch: int = 500
) -> np.ndarray:
    """``count`` test rows, at random, that the model classifies correctly *and* the guard accepts:
    the same images for both settings, each one with something to break."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(split.labels))
    chosen: list[int] = []
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        verdicts = guard.classify_pixels(split.tensor(rows))
        for row, verdict in zip(rows.tolist(), verdicts, strict=True):
            if verdict.accepted and verdict.predicted_class == int(split.labels[row]):
                chosen.append(row)
        if len(chosen) >= count:
            break
    return np.array(chosen[:count], dtype=np.int64)


def candidate_pool(split: ImageSplit, exclude: np.ndarray, label: int, size: int, seed: int) -> Any:
    """The attacker's own natural images of other classes (never the attacked ones)."""
    rng = np.random.default_rng(seed)
    allowed = np.setdiff1d(np.flatnonzero(split.labels != label), exclude)
    return split.pixels[rng.choice(allowed, size=min(size, len(allowed)), replace=False)]


def attack_images(
    oracle: Oracle,
    attack: AttackName,
    split: ImageSplit,
    rows: np.ndarray,
    cap: int,
    seed: int,
    log: Callable[[str], None] = lambda _: None,
) -> Iterator[AttackRecord]:
    for i, row in enumerate(rows.tolist()):
        label = int(split.labels[row])
        pool = candidate_pool(split, rows, label, 20, seed + row) if attack != "square" else None
        record = run_attack(oracle, attack, split.pixels[row], label, cap, seed + row, row, pool)
        log(
            f"{attack} image {i + 1}/{len(rows)} row {row}: {record.stopped} after "
            f"{len(record.queries)} queries ({record.seconds:.1f}s)"
        )
        yield record


def _replayed_answers(url: str, attack: AttackName, want: AttackRecord) -> tuple[int, int]:
    """(replayed, answered alike): the reference's first ``REPLAYED`` queries sent over HTTP
    by a client of their own, compared with the decisions and classes recorded in process."""
    oracle = HttpOracle(url, client_id=f"query-attack-replay-{attack}-{want.row}")
    try:
        answers = oracle.ask(want.queries[:REPLAYED])
    finally:
        oracle.close()
    alike = sum(
        (DECISIONS.index(a.decision), -1 if a.class_index is None else a.class_index)
        == (int(want.decisions[i]), int(want.classes[i]))
        for i, a in enumerate(answers)
    )
    return len(answers), alike


def _attack_over_http(
    url: str,
    attack: AttackName,
    split: ImageSplit,
    row: int,
    cap: int,
    seed: int,
    attacked: np.ndarray,
) -> AttackRecord:
    """The attack on one image, run against the service over HTTP, one client id per image."""
    label = int(split.labels[row])
    # the attacker's own images exclude every attacked one, as in the in-process run
    pool = candidate_pool(split, attacked, label, 20, seed + row) if attack != "square" else None
    oracle = HttpOracle(url, client_id=f"query-attack-{attack}-{row}", max_queries=cap + 10)
    try:
        return run_attack(oracle, attack, split.pixels[row], label, cap, seed + row, row, pool)
    finally:
        oracle.close()


def http_check(
    url: str,
    attack: AttackName,
    split: ImageSplit,
    rows: np.ndarray,
    reference: Sequence[AttackRecord],
    cap: int,
    seed: int,
    attacked: np.ndarray,
) -> dict[str, Any]:
    """The same attacks over HTTP, one client id per image, against in-process ``reference``
    records of the same rows: does the service give every image the same outcome? And the
    reference's own queries (up to ``REPLAYED``) replayed over HTTP: the same answers? (A
    decision-based attack walks the decision boundary, where the float noise of batching one
    image or a hundred may flip an answer and send the run elsewhere; the replay tells that
    from a difference in what the oracles answer.)"""
    by_row = {r.row: r for r in reference}
    same_outcome = same_queries = replayed = same_answers = 0
    images = []
    for row in rows.tolist():
        want = by_row[row]
        sent, alike = _replayed_answers(url, attack, want)
        replayed += sent
        same_answers += alike
        record = _attack_over_http(url, attack, split, row, cap, seed, attacked)
        same_outcome += record.queries_to_success == want.queries_to_success
        same_queries += len(record.queries) == len(want.queries) and np.array_equal(
            record.queries, want.queries
        )
        images.append(
            {"row": row, "http": record.queries_to_success, "in_process": want.queries_to_success}
        )
    return {
        "images": len(rows),
        "same_outcome": same_outcome,
        "same_queries": same_queries,
        "replayed_queries": replayed,
        "same_answers": same_answers,
        "per_image": images,
    }


REPLAYED = 500  # recorded queries per image replayed over HTTP


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.query_attacks",
        description="ART query attacks through the answers of POST /classify, recorded",
    )
    parser.add_argument(
        "--bundle",
        type=Path,
        default=DEFAULT_BUNDLE,
        help="bundle that picks the images and answers the in-process runs (default: %(default)s)",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=DEFAULT_SOURCE,
        help="CIFAR-10 ImageFolder directory or tar with a test/ split (default: %(default)s)",
    )
    add_data_cache_argument(parser)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="recorded queries")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_RESULTS,
        help="results directory: results.json and table.md (default: %(default)s)",
    )
    parser.add_argument(
        "--images",
        type=at_least(1),
        default=100,
        help="test images attacked, each classified correctly and accepted (default: %(default)s)",
    )
    parser.add_argument(
        "--attacks",
        nargs="+",
        choices=ATTACKS,
        default=list(ATTACKS),
        help="attacks run (default: all)",
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=SETTINGS,
        default=list(SETTINGS),
        help="the guard off, on, or both (default: both)",
    )
    for attack in ATTACKS:
        parser.add_argument(
            f"--cap-{attack}",
            type=at_least(1),
            default=DEFAULT_CAPS[attack],
            help=f"{attack}'s queries per image, at most (default: %(default)s)",
        )
    parser.add_argument(
        "--seed", type=int, default=0, help="the images' and attacks' draws (default: %(default)s)"
    )
    parser.add_argument("--threads", type=at_least(1), default=1, help="torch CPU threads")
    parser.add_argument(
        "--url",
        help="also attack a running service (loopback only) on the first --http-images images "
        "and compare each outcome with the in-process records (--settings: the service's)",
    )
    parser.add_argument(
        "--http-images",
        type=at_least(1),
        default=5,
        help="with --url: first images attacked over HTTP (default: %(default)s)",
    )
    parser.add_argument(
        "--summarise-only", action="store_true", help="reuse the recorded runs (no attacks)"
    )
    return parser


def _command(argv: Sequence[str]) -> str:
    return " ".join(["python -m evaluation.query_attacks", *map(shlex.quote, argv)])


class StaleRecordsError(Exception):
    """Recorded queries that do not belong to the conditions asked for."""


def run_conditions(
    args: argparse.Namespace, rows: np.ndarray, attack: AttackName
) -> dict[str, Any]:
    """What one run's figures depend on: the bundle's contents (its manifest lists every file's
    sha256), the images, the attack's query cap, the seed and ART's version. A run kept in a
    results.json that another invocation updates must match that invocation's conditions."""
    return {
        "bundle_manifest_sha256": hashlib.sha256(
            (Path(args.bundle) / MANIFEST_NAME).read_bytes()
        ).hexdigest()[:16],
        "rows_sha256": hashlib.sha256(rows.tobytes()).hexdigest()[:16],
        "cap": caps_of(args)[attack],
        "seed": args.seed,
        "art_version": _art_version(),
    }


def stale_runs(results: dict[str, Any], args: argparse.Namespace, rows: np.ndarray) -> list[str]:
    """The runs already in ``results`` that this invocation keeps but does not redo, and that
    were recorded under other conditions (or before runs recorded theirs): a table mixing them
    would describe runs that were never made together."""
    redone = {f"{a}/{s}" for a in args.attacks for s in args.settings}
    stale = []
    for key, summary in results["runs"].items():
        if key in redone and not args.url:
            continue
        attack = key.split("/")[0]
        if summary.get("conditions") != run_conditions(args, rows, attack):
            stale.append(key)
    return stale


def record_runs(
    args: argparse.Namespace,
    guard: Guard,
    split: ImageSplit,
    rows: np.ndarray,
    results: dict[str, Any],
    log: Log,
    command: str,
) -> None:
    """Each attack in each setting on the chosen rows, in process: run and recorded, with the
    conditions and command beside the records, then summarised into ``results["runs"]``.
    ``--summarise-only`` reuses the records and ``--url`` compares with them (leaving the runs as
    they are); both refuse records made under other conditions (another ``--out`` may have
    recorded over them: the cache is shared)."""
    for attack in args.attacks:
        conditions = run_conditions(args, rows, attack)
        for setting in args.settings:
            path = records_path(args.cache, attack, setting)
            made_by = path.with_suffix(".json")
            if not (args.summarise_only or args.url):
                oracle = GuardOracle(guard, guarded=setting == "guard_on")
                records = list(
                    attack_images(oracle, attack, split, rows, conditions["cap"], args.seed)
                )
                save_records(records, path)
                made_by.write_text(json.dumps({"conditions": conditions, "command": command}))
            recorded = json.loads(made_by.read_text()) if made_by.is_file() else {}
            if recorded.get("conditions") != conditions:
                raise StaleRecordsError(
                    f"{path} was recorded under other conditions than these (bundle, images, "
                    f"cap, seed or ART version), or before records kept theirs: run "
                    f"{attack} {setting} again in process (without --summarise-only or --url)"
                )
            if args.url:  # the HTTP check compares with these records; the runs stay as they are
                continue
            summary = summarise(load_records(path))
            results["runs"][f"{attack}/{setting}"] = summary | recorded
            log(f"{attack} {setting}: {json.dumps(summary)}")


def http_checks(
    args: argparse.Namespace,
    argv: Sequence[str],
    split: ImageSplit,
    rows: np.ndarray,
    results: dict[str, Any],
    log: Log,
) -> None:
    """``--url``: each attack and setting rerun over HTTP on the first ``--http-images`` rows
    against its in-process records (``http_check``), into ``results["http_check"]``."""
    checks = results.setdefault("http_check", {})
    for attack in args.attacks:
        for setting in args.settings:
            reference = load_records(records_path(args.cache, attack, setting))
            key = f"{attack}/{setting}"
            checks[key] = http_check(
                args.url,
                attack,
                split,
                rows[: args.http_images],
                reference,
                caps_of(args)[attack],
                args.seed,
                rows,
            ) | {"command": _command(argv)}
            log(f"http {attack} {setting}: {checks[key]['same_outcome']}")


def caps_of(args: argparse.Namespace) -> dict[AttackName, int]:
    """The query cap per image of each attack (``--cap-ATTACK``)."""
    return {a: getattr(args, f"cap_{a}") for a in ATTACKS}


def run_description(args: argparse.Namespace, rows: np.ndarray) -> dict[str, Any]:
    """What the runs were: bundle, images, caps, seed, ART version, budgets."""
    return {
        "bundle": str(args.bundle),
        "images": len(rows),
        "caps": caps_of(args),
        "seed": args.seed,
        "art_version": _art_version(),
        "budgets": {"square_linf": SQUARE_EPS, "decision_l2": L2_EPS},
        "rows_sha256": hashlib.sha256(rows.tobytes()).hexdigest()[:16],
        "notes": NOTES,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Bundle and images -> the in-process runs (recorded) -> their summaries -> with ``--url``,
    the HTTP check -> results.json and table.md (runs of other attacks or settings kept)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.url and not is_loopback(args.url):
        parser.error(f"--url {args.url} is not a loopback address")
    if args.out.exists() and not args.out.is_dir():  # found only after the attacks, before
        parser.error(f"--out {args.out} exists and is not a directory")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    guard = Guard.load(args.bundle, device="cpu")
    split = load_split(args.source, "test", guard.preset, args.data_cache)
    rows = pick_images(guard, split, args.images, args.seed)
    results_file = args.out / "results.json"
    results: dict[str, Any] = (
        json.loads(results_file.read_text()) if results_file.is_file() else {"runs": {}}
    )
    stale = stale_runs(results, args, rows)
    if stale:
        print(
            f"{parser.prog}: error: {results_file} holds runs recorded under other conditions "
            f"(bundle, images, cap, seed or ART version) or before runs recorded theirs: "
            f"{', '.join(stale)}; redo them in process too (--attacks/--settings, without "
            f"--url) or use another --out",
            file=sys.stderr,
        )
        return 2
    try:
        record_runs(args, guard, split, rows, results, log, _command(argv))
    except StaleRecordsError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    results.update(run_description(args, rows))
    results.pop("command", None)  # each run records its own (before 2026-11-30: the latest's)
    if args.url:
        http_checks(args, argv, split, rows, results, log)
    order = [f"{a}/{s}" for a in ATTACKS for s in SETTINGS]
    results["runs"] = {k: results["runs"][k] for k in order if k in results["runs"]}
    args.out.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "table.md").write_text(table(results))
    return 0


def _art_version() -> str:
    import art

    return str(art.__version__)


NOTES = [
    "Square (ART SquareAttack, p_init 0.05, the paper's Linf schedule) reads the returned "
    "class's probability p as p on that class and (1 - p)/(K - 1) elsewhere; a rejection reads "
    "as a uniform vector (margin 0), never as adversarial.",
    "HopSkipJump and Boundary (ART, L2, untargeted) read a rejection as the true label; they "
    "start from the attacker's nearest natural image of another class that the oracle answers "
    "with another label (each try is a counted query). ART's initial search uses an unseeded "
    "RandomState, so reruns differ slightly.",
    "Every run stops at its first success (the attacker has what it wants) or at the cap.",
    "Caps: Square 1,000 queries (it needs ~70 on average on undefended CIFAR-10 models); "
    "HopSkipJump and Boundary 2,500 (hundreds to a few thousand on CIFAR-10), which keeps each "
    "attack x setting under ~25 minutes on one shared CPU thread; their success rates are "
    "within that cap, and the closest adversarial answer shows how far the others got.",
    "The recorded queries (8-bit, in order, with the answers) are in .cache/query-attacks/ "
    "(git-ignored; `load_records`); the stateful detector replays them (stateful.md).",
]


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m evaluation.query_attacks"))
