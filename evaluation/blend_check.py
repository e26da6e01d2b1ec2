"""The blend test (``app.core.stateful.blends``) measured before it enters the service: how
early it sees each query attack, and how many honest clients it would flag.

Stages: the attacked images (``query_attacks``' picks) -> each attack run through the guard
alone (``GuardOracle``: before its first detection a screened run sends the same queries) ->
per run, the first query the test flags and the first success -> the honest traffic of both
splits (``honest_timeline``, as ``consistency_cost`` and ``stateful_eval`` build it) -> per
kind, the clients any of whose queries the test flags -> the report.

The test looks at one client's queries only: a Sybil spread is the window hashes' business.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.cli import at_least
from app.core.guard import Guard
from app.core.stateful.blends import BlendRule, RecentSketches, sketches
from app.core.stateful.hashes import pixel_digests
from evaluation.data import ImageSplit, load_split
from evaluation.honest_traffic import TRAFFIC_KINDS
from evaluation.query_attacks import candidate_pool, pick_images
from evaluation.query_oracles import GuardOracle
from evaluation.query_runs import ATTACKS, AttackName, run_attack
from evaluation.simulate import wilson_interval
from evaluation.stateful_eval import add_honest_traffic_arguments, honest_timelines
from evaluation.stateful_replay import Timeline

DEFAULT_OUT = Path("evaluation/results/query-attacks-round13/blends")


def first_blend(queries: np.ndarray, rule: BlendRule) -> int | None:
    """The 1-based index of the first of one client's queries ((n, C, H, W) uint8, in order)
    that the blend test flags; None: none."""
    recent = RecentSketches(rule)
    its_sketches = sketches(torch.from_numpy(queries))
    for i, digest in enumerate(pixel_digests(queries)):
        if recent.check_and_add(its_sketches[i], digest) is not None:
            return i + 1
    return None


@dataclass(frozen=True)
class RunBlend:
    """One attack run through the guard alone: when the test first flags it, when it first
    succeeds (both 1-based; None: never within the cap) and how it stopped."""

    row: int
    queries: int
    first_blend: int | None
    first_success: int | None
    stopped: str

    @property
    def before_success(self) -> bool:
        return self.first_blend is not None and (
            self.first_success is None or self.first_blend < self.first_success
        )


def attack_runs(
    guard: Guard,
    attack: AttackName,
    split: ImageSplit,
    attacked: np.ndarray,
    rows: Sequence[int],
    cap: int,
    seed: int,
    rule: BlendRule,
) -> list[RunBlend]:
    """Each row attacked as ``query_attacks`` attacks it (the same natural starts and seeds),
    the guard alone answering."""
    runs = []
    for row in rows:
        label = int(split.labels[row])
        pool = (
            candidate_pool(split, attacked, label, 20, seed + row) if attack != "square" else None
        )
        oracle = GuardOracle(guard)
        record = run_attack(oracle, attack, split.pixels[row], label, cap, seed + row, row, pool)
        runs.append(
            RunBlend(
                row,
                len(record.queries),
                first_blend(record.queries, rule),
                record.queries_to_success,
                record.stopped,
            )
        )
    return runs


def honest_flags(traffic: Timeline, rule: BlendRule) -> dict[str, dict[str, Any]]:
    """Per traffic kind: clients, and the clients any of whose queries the test flags, with
    the 95% Wilson interval of the share."""
    per_client: dict[str, list[int]] = defaultdict(list)
    for i, client in enumerate(traffic.clients):
        per_client[client].append(i)
    kind_of = {client: traffic.kinds[rows[0]] for client, rows in per_client.items()}
    flagged = {
        client for client, rows in per_client.items() if first_blend(traffic.images[rows], rule)
    }
    summary: dict[str, dict[str, Any]] = {}
    for kind in TRAFFIC_KINDS:
        clients = [client for client, its in kind_of.items() if its == kind]
        hits = sum(client in flagged for client in clients)
        low, high = wilson_interval(hits, len(clients))
        summary[kind] = {"clients": len(clients), "flagged": hits, "interval": [low, high]}
    return summary


def summarise_runs(runs: Sequence[RunBlend]) -> dict[str, Any]:
    detected = [run.first_blend for run in runs if run.first_blend is not None]
    return {
        "runs": len(runs),
        "flagged": len(detected),
        "flagged_before_success": sum(run.before_success for run in runs),
        "succeeded_within_cap": sum(run.first_success is not None for run in runs),
        "median_queries_to_flag": float(np.median(detected)) if detected else None,
        "flagged_by_10th": sum(d <= 10 for d in detected),
        "per_run": [asdict(run) for run in runs],
    }


def report(summary: dict[str, Any]) -> str:
    rule = summary["rule"]
    lines = [
        "# The blend test, measured outside the service",
        "",
        f"Rule: residual <= {rule['max_residual']} grey levels, separation >= "
        f"{rule['min_separation']}, novelty >= {rule['min_novelty']}, window "
        f"{rule['window']} distinct queries per client. Images: picks "
        f"{summary['first_image']}-{summary['first_image'] + summary['images'] - 1}, each "
        f"attack capped at {summary['cap']} queries, the guard alone answering.",
        "",
        "| attack | runs | flagged | before success | median queries to flag | by the 10th "
        "| succeeded within the cap |",
        "|---|---|---|---|---|---|---|",
    ]
    for attack, its in summary["attacks"].items():
        lines.append(
            f"| {attack} | {its['runs']} | {its['flagged']} | {its['flagged_before_success']} "
            f"| {its['median_queries_to_flag']} | {its['flagged_by_10th']} "
            f"| {its['succeeded_within_cap']} |"
        )
    lines += [
        "",
        "| honest traffic | kind | clients | flagged | 95% interval |",
        "|---|---|---|---|---|",
    ]
    for split, kinds in summary["honest"].items():
        for kind, its in kinds.items():
            low, high = its["interval"]
            lines.append(
                f"| {split} | {kind} | {its['clients']} | {its['flagged']} "
                f"| {100 * low:.2f}-{100 * high:.2f}% |"
            )
    lines += ["", "```", summary["command"], "```", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.blend_check",
        description="the blend test on query attacks (guard alone) and on honest traffic",
    )
    add_honest_traffic_arguments(parser)
    parser.set_defaults(out=DEFAULT_OUT)
    parser.add_argument(
        "--attacks",
        nargs="+",
        choices=ATTACKS,
        default=list(ATTACKS),
        help="attacks run through the guard alone (default: all three)",
    )
    parser.add_argument("--images", type=at_least(1), default=100, help="attacked images")
    parser.add_argument(
        "--first-image", type=at_least(0), default=0, help="the first of the picks attacked"
    )
    parser.add_argument(
        "--cap", type=at_least(1), default=200, help="queries per run (default: %(default)s)"
    )
    parser.add_argument("--attack-seed", type=int, default=0, help="as query_attacks' --seed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rule = BlendRule()
    guard = Guard.load(args.bundle, device="cpu")
    split = load_split(args.source, "test", guard.preset, args.data_cache)
    attacked = pick_images(guard, split, args.first_image + args.images, args.attack_seed)
    rows = attacked[args.first_image :].tolist()
    summary: dict[str, Any] = {
        "rule": asdict(rule),
        "first_image": args.first_image,
        "images": args.images,
        "cap": args.cap,
        "attacks": {},
        "honest": {},
    }
    for attack in args.attacks:
        runs = attack_runs(guard, attack, split, attacked, rows, args.cap, args.attack_seed, rule)
        summary["attacks"][attack] = summarise_runs(runs)
        print(
            f"[{time.perf_counter() - started:6.1f}s] {attack}: flagged "
            f"{summary['attacks'][attack]['flagged']}/{len(runs)}",
            flush=True,
        )
    for name, traffic in honest_timelines(guard, args).items():
        summary["honest"][name] = honest_flags(traffic, rule)
        print(
            f"[{time.perf_counter() - started:6.1f}s] {name}: {summary['honest'][name]}", flush=True
        )
    summary["command"] = " ".join(["python -m evaluation.blend_check", *map(shlex.quote, argv)])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "blend_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "blend_check.md").write_text(report(summary))
    return 0


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m evaluation.blend_check"))
