"""What the consistent count costs honest users: the share of their answers replaced.

Under ``refuse`` and ``silent`` the service serves a query its anchor's answer when the query is
not detected but would show a class its anchor's answer did not (the anchor: a near-exact
copy stored earlier; ``DetectionRule.keeps_anchor``). Nobody is flagged by it, so it has no
false-flag rate; what an honest user pays is an answer that is not the service's own for the
image sent.
This measures that on the stateful evaluation's honest traffic (the same plan and seeds as
``evaluation.stateful_eval``: training photos, and the test photos it judges on), sent through
the service's own ``StatefulDetector`` under ``refuse`` with the default rule, one store
holding every query (nothing expires: the worst case).

    python -m evaluation.consistency_cost          # -> consistency.{json,md} in the results

Per traffic kind: queries, the answers replaced (shown another decision or class than the
service's own), the queries refused (detected), the clients with at least one replaced answer
and the clients flagged (at least one query detected: the false-flag rate under the current
bundle and rule), with Wilson 95% intervals over clients (a client's queries are not
independent of each other).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.cli import at_least
from app.core.guard import Guard
from app.core.stateful.blends import BlendRule, InProcessBlendMemory
from app.core.stateful.close_copies import CLOSE_RADIUS
from app.core.stateful.defaults import default_scheme
from app.core.stateful.match_rule import DETECTION_REASONS, Answer, DetectionReason, DetectionRule
from app.core.stateful.store import InProcessFingerprintStore
from app.service.stateful import Pending, StatefulDetector
from evaluation.honest_traffic import TRAFFIC_KINDS
from evaluation.policy_check import (
    BLENDS,
    CHANGED_REJECTED,
    checked_rule,
    rule_record,
    rule_text,
)
from evaluation.query_oracles import client_view, service_pixels
from evaluation.simulate import wilson_interval
from evaluation.stateful_eval import (
    add_honest_traffic_arguments,
    honest_timelines,
    served_answers,
)
from evaluation.stateful_replay import EVALUATION_SECRET, Timeline
from evaluation.stateful_report import command_block

BATCH = 64  # queries screened at once, in arrival order (the service's screening batch)


@dataclass(frozen=True)
class Served:
    """Per query of a timeline: the model's answer, what the service served (None: refused) and
    which part of the rule detected it (None: not detected)."""

    own: list[Answer]
    served: list[Answer | None]
    reasons: list[DetectionReason | None]


def serve_through_detector(
    guard: Guard,
    traffic: Timeline,
    answers: Sequence[Answer],
    rule: DetectionRule,
    close_radius: int | None = CLOSE_RADIUS,
    max_fingerprints: int | None = None,
    blends: bool = False,
) -> Served:
    """Every query of ``traffic`` through a fresh ``StatefulDetector`` under ``refuse``, in
    arrival order: the screening path the service runs, on the pixels it would see; close
    copies within ``close_radius`` (None: none), as ``ADVGUARD_STATEFUL_CLOSE_RADIUS``.
    Everyone's queries are kept in a ring of ``max_fingerprints`` (None: every query, the worst
    case), as ``ADVGUARD_STATEFUL_MAX_FINGERPRINTS``; nothing expires by time."""
    scheme = default_scheme(EVALUATION_SECRET, close_radius)
    size = len(traffic.clients) + 1
    store = InProcessFingerprintStore(
        scheme,
        max_fingerprints=size if max_fingerprints is None else max_fingerprints,
        ttl_s=np.inf,
        max_clients=size,
        client_ttl_s=np.inf,
    )
    # with the blend test: every client's recent queries kept, nothing expiring (the worst case)
    memory = InProcessBlendMemory(BlendRule(), max_clients=size, ttl_s=np.inf) if blends else None
    detector = StatefulDetector(scheme, rule, store, "refuse", blends=memory)
    served: list[Answer | None] = []
    reasons: list[DetectionReason | None] = []
    try:
        for start in range(0, len(traffic.clients), BATCH):
            stop = start + BATCH
            pixels: torch.Tensor = service_pixels(guard, traffic.images[start:stop])
            batch = [
                Pending(client, query, answer)
                for client, query, answer in zip(
                    traffic.clients[start:stop], pixels, answers[start:stop], strict=True
                )
            ]
            screened = detector.screen(batch)
            served += screened.served
            reasons += screened.reasons
    finally:
        detector.close()
    return Served(list(answers), served, reasons)


def replaced(own: Answer, served: Answer | None) -> bool:
    """The client was shown another answer than the service's own for its image: another
    decision, or another class where one is shown (``client_view``)."""
    return served is not None and client_view(served) != client_view(own)


def summarise(traffic: Timeline, outcome: Served) -> dict[str, Any]:
    """Per kind: queries, answers replaced, queries refused, clients with a replaced answer and
    clients flagged (a refused query: detected), with Wilson 95% intervals over clients."""
    out: dict[str, Any] = {}
    for kind in TRAFFIC_KINDS:
        rows = [i for i, k in enumerate(traffic.kinds) if k == kind]
        clients = {traffic.clients[i] for i in rows}
        changed = [i for i in rows if replaced(outcome.own[i], outcome.served[i])]
        refused = [i for i in rows if outcome.served[i] is None]
        hit = {traffic.clients[i] for i in changed}
        flagged = {traffic.clients[i] for i in refused}
        first_refused: dict[str, int] = {}  # per flagged client, its first detected query
        for i in refused:  # arrival order
            first_refused.setdefault(traffic.clients[i], i)
        by_reason = {
            reason: sum(1 for i in first_refused.values() if outcome.reasons[i] == reason)
            for reason in DETECTION_REASONS
        }
        out[kind] = {
            "queries": len(rows),
            "replaced": len(changed),
            "replaced_share": len(changed) / len(rows) if rows else None,
            "refused": len(refused),
            "clients": len(clients),
            "clients_replaced": len(hit),
            "clients_replaced_wilson95": list(wilson_interval(len(hit), len(clients))),
            "clients_flagged": len(flagged),
            "clients_flagged_wilson95": list(wilson_interval(len(flagged), len(clients))),
            "clients_flagged_by_first_reason": by_reason,
            # flagged first at a copy of a viral photo (the rest: at one of their own photos)
            "clients_flagged_at_circulating": sum(
                1 for i in first_refused.values() if traffic.is_circulating(i)
            ),
        }
    return out


# The ship rule, fixed before the first measurement (session 39): the consistent count is on by
# default only if at most this share of each kind's judging queries have their answer replaced.
SHIP_LIMIT = 0.01


def ships(judging: dict[str, Any]) -> bool:
    return all(judging[kind]["replaced_share"] <= SHIP_LIMIT for kind in TRAFFIC_KINDS)


def close_copies_text(radius: int) -> str:
    if radius == 0:
        return "no close copies"
    return (
        f"close copies (block means within {radius} grey levels, a saturated difference) "
        "counted by the consistent count"
    )


def store_text(max_fingerprints: int | None) -> str:
    if max_fingerprints is None:
        return "one store holding every query (nothing expires: the worst case)"
    return f"everyone's queries in a ring of the last {max_fingerprints:,} (none expires by time)"


def report(summary: dict[str, Any]) -> str:
    lines = [
        "# The consistent count's cost to honest users (evaluation.consistency_cost)",
        "",
        "Honest traffic of `evaluation.stateful_eval` (same plan and seeds) sent through the "
        "service's `StatefulDetector` under `refuse`, rule "
        f"{rule_text(summary['rule'])} (client, global, changed, consistent)"
        f"{', the changed answer counting rejections' if summary.get(CHANGED_REJECTED) else ''}"
        f"{', the blend test' if summary.get(BLENDS) else ''}, "
        f"{close_copies_text(summary['close_radius'])}, {store_text(summary['max_fingerprints'])}"
        ". *Replaced*: the client was shown its anchor's answer where the service's "
        "own differs in what a client sees (decision, or class where one is shown); *refused*: "
        "detected. Intervals: Wilson 95% over clients. *Flagged by*: the part of the rule that "
        "detected each flagged client's first refused query (its own client's count, everyone's "
        "count, a changed answer, the blend test).",
        "",
        "| photos | traffic | queries | answers replaced | share | refused | clients with a "
        "replaced answer | 95% interval | clients flagged | 95% interval | flagged by (client / "
        "everyone / changed / blend) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for split, label in (("judging", "test (judged)"), ("calibration", "training")):
        for kind in TRAFFIC_KINDS:
            r = summary[split][kind]
            low, high = r["clients_replaced_wilson95"]
            flag_low, flag_high = r["clients_flagged_wilson95"]
            by = r["clients_flagged_by_first_reason"]
            lines.append(
                f"| {label} | {kind} | {r['queries']} | {r['replaced']} | "
                f"{100 * r['replaced_share']:.2f}% | {r['refused']} | "
                f"{r['clients_replaced']} of {r['clients']} | {100 * low:.2f}-{100 * high:.2f}% | "
                f"{r['clients_flagged']} of {r['clients']} | "
                f"{100 * flag_low:.2f}-{100 * flag_high:.2f}% | "
                f"{' / '.join(str(by.get(reason, 0)) for reason in DETECTION_REASONS)} |"
            )
    verdict = "met: on by default" if summary["ships"] else "missed: off by default"
    at_viral = [
        f"{summary[split]['viral']['clients_flagged_at_circulating']} of the "
        f"{summary[split]['viral']['clients_flagged']} flagged in the {label} traffic"
        for split, label in (("judging", "test"), ("calibration", "training"))
    ]
    lines += [
        "",
        "Viral senders flagged at their copy of the viral photo (the others at one of their own "
        f"photos): {'; '.join(at_viral)}.",
        "",
        f"Ship rule (fixed before this was run): at most {100 * SHIP_LIMIT:.1f}% of each kind's "
        f"judged queries replaced: **{verdict}**.",
        *command_block(summary["command"]),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.consistency_cost",
        description="honest answers replaced by the stateful detector's consistent count",
    )
    add_honest_traffic_arguments(parser)
    parser.add_argument(
        "--close-radius",
        type=at_least(0),
        default=CLOSE_RADIUS,
        help="close copies' radius in grey levels, as ADVGUARD_STATEFUL_CLOSE_RADIUS (0: none)",
    )
    parser.add_argument(
        "--changed-rejected",
        action="store_true",
        help="the changed answer also counts a query the guard rejects, by its model class "
        "(ADVGUARD_STATEFUL_CHANGED_REJECTED; an experiment, off by default)",
    )
    parser.add_argument(
        "--blends",
        action="store_true",
        help="the blend test on, every client's recent queries kept (ADVGUARD_STATEFUL_BLENDS)",
    )
    parser.add_argument(
        "--max-fingerprints",
        type=at_least(1),
        default=None,
        help="everyone's queries kept, as ADVGUARD_STATEFUL_MAX_FINGERPRINTS (default: every "
        "query of the traffic, the worst case)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Stages: honest traffic (both splits, as stateful_eval builds it) -> the model's answers
    -> the detector's answers -> the summary and the report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    guard = Guard.load(args.bundle, device="cpu")
    timelines = honest_timelines(guard, args)
    answers = served_answers(guard, timelines["calibration"], timelines["judging"], {})
    own = {"calibration": answers.calibration, "judging": answers.judging}
    rule = checked_rule(args.changed_rejected)
    summary: dict[str, Any] = rule_record(rule, args.blends) | {
        "close_radius": args.close_radius,
        "max_fingerprints": args.max_fingerprints,
        "bundle": str(args.bundle),
    }
    radius = args.close_radius or None
    for split, traffic in timelines.items():
        outcome = serve_through_detector(
            guard, traffic, own[split], rule, radius, args.max_fingerprints, args.blends
        )
        summary[split] = summarise(traffic, outcome)
        print(f"[{time.perf_counter() - started:6.1f}s] {split}: {json.dumps(summary[split])}")
    summary["ships"] = ships(summary["judging"])
    summary["ship_limit"] = SHIP_LIMIT
    summary["command"] = " ".join(
        ["python -m evaluation.consistency_cost", *map(shlex.quote, argv)]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "consistency.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "consistency.md").write_text(report(summary))
    return 0


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m evaluation.consistency_cost"))
