"""The stateful detector's policies checked live: the query attacks rerun over HTTP against a
running ``advguard serve`` (with Redis, ``ADVGUARD_STATEFUL_POLICY=refuse`` or ``silent``), and
each image's outcome compared with what the replay predicted (``evaluation.query_defence``'s
refuse/silent columns come from replays of the recorded attacks, which cannot show what the
library would have sent after an answer it did not get).

Each image starts from an empty fingerprint store, as each replay does: the service's Redis
database is flushed before every run (so run it against a throwaway Redis only). Start the
service with the evaluation's secret so that its window hashes are the replay's:

    redis-server --port 6390 --save '' &
    ADVGUARD_REDIS_URL=redis://127.0.0.1:6390/0 ADVGUARD_STATEFUL_POLICY=refuse \\
      ADVGUARD_STATEFUL_SECRET=advguard-evaluation-secret advguard serve --port 8765 &
    python -m evaluation.policy_check --url http://127.0.0.1:8765 \\
      --redis-url redis://127.0.0.1:6390/0 --policy refuse --images 10
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis

from app.core.guard import Guard
from evaluation.data import ImageSplit, load_split
from evaluation.query_attacks import (
    ATTACKS,
    DECISIONS,
    DEFAULT_BUNDLE,
    DEFAULT_CAPS,
    DEFAULT_RESULTS,
    DEFAULT_SOURCE,
    AttackName,
    AttackRecord,
    GuardOracle,
    HttpOracle,
    candidate_pool,
    pick_images,
    run_attack,
)
from evaluation.stateful_eval import SequenceOutcome, succeeds_despite


@dataclass(frozen=True)
class ImageCheck:
    row: int
    predicted_success: bool  # by the replay: the first success came before the detection
    live_success: bool  # the attacker got an adversarial example: ``truly_adversarial``
    live_queries: int
    answers_withheld: int  # answers that differ from the guard's own (403, or the anchor's)
    believed_success: bool  # the attack stopped on a served answer that said "adversarial"


def replay_predictions(stateful: dict[str, Any], attack: str) -> list[bool]:
    """Per recorded run of ``attack`` against the guard (one client id), in image order:
    whether it survives ``refuse``/``silent`` according to the replay."""
    runs = stateful["schemes"][stateful["chosen"]]["outcomes"][f"{attack}/guard_on"]["single"]
    return [succeeds_despite(SequenceOutcome(*run)) for run in runs]


def withheld(record: AttackRecord, guard: Guard) -> int:
    """How many served answers differ from what the guard itself answers to the same upload:
    the policy's doing (a 403 under ``refuse``, the anchor's answer under ``silent``)."""
    if len(record.queries) == 0:
        return 0
    own = GuardOracle(guard).ask(record.queries)
    return sum(
        (DECISIONS.index(a.decision), -1 if a.class_index is None else a.class_index)
        != (int(d), int(c))
        for a, d, c in zip(own, record.decisions, record.classes, strict=True)
    )


def truly_adversarial(record: AttackRecord, guard: Guard) -> bool:
    """Whether the query the attack stopped on as its success is adversarial by the guard's own
    answer (accepted, another class than the true one). Under ``silent`` a served answer may be
    the anchor's, so an attack can stop on a query that the guard gets right: it believes it
    succeeded and holds nothing. Under ``refuse`` served answers are the guard's or a 403, so
    what the attack believes is true."""
    if not record.succeeded:
        return False
    query = record.queries[record.first_success : record.first_success + 1]
    answer = GuardOracle(guard).ask(query)[0]
    return answer.decision == "accepted" and answer.class_index != record.label


def summarise(checks: Sequence[ImageCheck]) -> dict[str, Any]:
    return {
        "images": len(checks),
        "believed_success": sum(c.believed_success for c in checks),
        "live_success": sum(c.live_success for c in checks),
        "predicted_success": sum(c.predicted_success for c in checks),
        "same_outcome": sum(c.live_success == c.predicted_success for c in checks),
        "per_image": [asdict(c) for c in checks],
    }


def check_attack(
    url: str,
    store: redis.Redis,
    attack: AttackName,
    guard: Guard,
    split: ImageSplit,
    rows: np.ndarray,
    predictions: Sequence[bool],
    images: int,
    seed: int,
) -> list[ImageCheck]:
    """The first ``images`` of the recorded rows, attacked over HTTP one at a time."""
    checks = []
    for i, row in enumerate(rows[:images].tolist()):
        store.flushdb()  # a fresh fingerprint store, as the replay's
        label = int(split.labels[row])
        pool = candidate_pool(split, rows, label, 20, seed + row) if attack != "square" else None
        oracle = HttpOracle(url, client_id=f"policy-check-{attack}-{row}")
        try:
            cap = DEFAULT_CAPS[attack]
            record = run_attack(
                oracle, attack, split.pixels[row], label, cap, seed + row, row, pool
            )
        finally:
            oracle.close()
        checks.append(
            ImageCheck(
                row,
                predictions[i],
                truly_adversarial(record, guard),
                len(record.queries),
                withheld(record, guard),
                record.succeeded,
            )
        )
    return checks


def table(results: dict[str, Any]) -> str:
    lines = [
        "| attack | policy | images | stopped on a served success | succeeded live (truly "
        "adversarial) | predicted by the replay | same outcome | answers withheld (median per "
        "image) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results["checks"].items():
        attack, policy = key.split("/")
        withheld_median = float(np.median([c["answers_withheld"] for c in r["per_image"]]))
        believed = r.get("believed_success", r["live_success"])  # refuse: the same
        lines.append(
            f"| {attack} | {policy} | {r['images']} | {believed} | {r['live_success']} | "
            f"{r['predicted_success']} | {r['same_outcome']}/{r['images']} | "
            f"{withheld_median:.0f} |"
        )
    return "\n".join(lines)


def write(results: dict[str, Any], directory: Path) -> None:
    (directory / "policy_check.json").write_text(json.dumps(results, indent=2) + "\n")
    (directory / "policy_check.md").write_text(
        "# The stateful policies live (evaluation.policy_check)\n\n" + table(results) + "\n"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.policy_check",
        description="the stateful policies live over HTTP against the replay's prediction",
    )
    parser.add_argument("--url", required=True, help="a running advguard serve (loopback)")
    parser.add_argument("--redis-url", required=True, help="its throwaway Redis (flushed)")
    parser.add_argument("--policy", required=True, choices=("refuse", "silent"))
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--data-cache", type=Path, default=Path(".cache/evaluation/data"))
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    guard = Guard.load(args.bundle, device="cpu")
    split = load_split(args.source, "test", guard.preset, args.data_cache)
    rows = pick_images(guard, split, 100, args.seed)  # query_attacks' images, in its order
    stateful = json.loads((args.results / "stateful.json").read_text())
    store = redis.Redis.from_url(args.redis_url)
    out_file = args.results / "policy_check.json"
    results: dict[str, Any] = (
        json.loads(out_file.read_text()) if out_file.is_file() else {"checks": {}}
    )
    for attack in args.attacks:
        started = time.perf_counter()
        checks = check_attack(
            args.url,
            store,
            attack,
            guard,
            split,
            rows,
            replay_predictions(stateful, attack),
            args.images,
            args.seed,
        )
        summary = summarise(checks) | {"seconds": round(time.perf_counter() - started, 1)}
        summary["command"] = " ".join(
            ["python -m evaluation.policy_check", *map(shlex.quote, argv)]
        )
        results["checks"][f"{attack}/{args.policy}"] = summary
        write(results, args.results)  # after each attack: a long run keeps what it finished
        brief = {k: v for k, v in summary.items() if k != "per_image"}
        print(f"{attack} {args.policy}: {json.dumps(brief)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
