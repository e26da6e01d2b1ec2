"""The stateful evaluation's committed markdown (``stateful.md``): the rule and its
calibration, the fingerprints compared, the chosen one attack by attack, its honest false flags,
the changed-answer count's ablation and the cost, each from ``stateful.json``'s summary.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evaluation.honest_traffic import (
    TRAFFIC_KINDS,
)
from evaluation.simulate import wilson_interval


def _budget(budget: dict[str, float]) -> str:
    """``{"plain": 0.0005, ...}`` -> ``0.05% of plain clients, ...``."""
    return ", ".join(f"{share:.2%} of {kind} clients" for kind, share in budget.items())


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _attack_cells(key: str) -> str:
    """``square/guard_on`` -> the table's first two cells, ``square | guard on``."""
    attack, setting = key.split("/")
    return f"{attack} | {setting.replace('_', ' ')}"


def _rule(rule: dict[str, int | None]) -> str:
    changed = rule.get("changed_matches")
    return f"{rule['client_matches']}, {rule['global_matches']}, {_num(changed)}"


def ablation(summary: dict[str, Any]) -> list[str]:
    """The chosen fingerprint with and without the changed-answer count, attack by attack."""
    chosen = summary["schemes"][summary["chosen"]]
    alone = summary["chosen_counts_only"]
    lines = [
        "## The changed-answer count, on and off (the chosen fingerprint)",
        "",
        f"Rules: with it {_rule(chosen['rule'])}; counts alone {_rule(alone['rule'])} "
        "(client, global, changed).",
        "",
        "| attack | setting | detected before first success: counts alone / with it | "
        "median queries to detection | succeed under refuse |",
        "|---|---|---|---|---|",
    ]
    for key, a in chosen["attacks"].items():
        b = alone["attacks"][key]
        lines.append(
            f"| {_attack_cells(key)} | {_pct(b['detected_before_success'])} / "
            f"{_pct(a['detected_before_success'])} | {_num(b['median_queries_to_detection'])} / "
            f"{_num(a['median_queries_to_detection'])} | "
            f"{_pct(b['succeeded_despite_detection'])} / "
            f"{_pct(a['succeeded_despite_detection'])} |"
        )
    flags = " / ".join(
        f"{alone['false_flags'][k]['flagged']} and {chosen['false_flags'][k]['flagged']}"
        for k in TRAFFIC_KINDS
    )
    lines += ["", f"Honest test clients flagged (plain / resend / burst / viral): {flags}."]
    return lines


def report(summary: dict[str, Any]) -> str:
    """The committed markdown: fingerprint comparison, then the chosen one in detail."""
    chosen = summary["schemes"][summary["chosen"]]
    lines = [
        *_report_rule(summary),
        *_report_schemes(summary),
        *_report_chosen(summary, chosen),
        *_report_honest(chosen, int(summary["honest_plan"]["viral_images"])),
        "",
        *ablation(summary),
        *_report_cost(summary),
    ]
    return "\n".join(lines)


def _report_rule(summary: dict[str, Any]) -> list[str]:
    """The detection rule and how its counts were calibrated."""
    return [
        "# Stateful detection of query attacks (issue 13)",
        "",
        "Detection rule: a query is flagged when it has at least `client_matches` distinct "
        "near-duplicates (similarity at or above the fingerprint's threshold; exact copies do not "
        "count) among its client's recent queries, or `global_matches` among all clients', or "
        "when its answer would carry a class other than the one the model gave its anchor (its "
        "earliest stored near-duplicate) and it has at least `changed_matches` distinct "
        "near-duplicates in either scope. The three counts are calibrated on honest traffic from "
        "CIFAR-10 *training* photos: the two near-duplicate counts one above the highest honest "
        "count (they flag no calibration client), the changed-answer count the lowest that keeps "
        "the calibration clients flagged within half the issue's targets (at most "
        f"{_budget(summary['calibration_budget'])}); false flags are judged on fresh traffic "
        "from *test* photos. "
        f"Attack replays stop at detection or after {summary['horizon']} queries (then: "
        "undetected). *Detected before first success*: at a query before the first successful "
        "one, or at that query itself, which is screened before it is answered (under `refuse` "
        "and `silent` its answer is withheld); the share *strictly* before is given beside it.",
        "",
    ]


def _report_schemes(summary: dict[str, Any]) -> list[str]:
    """Each fingerprint compared: detection and honest flags."""
    lines = [
        "## Fingerprints compared",
        "",
        "| fingerprint | rule (client, global, changed) | detected before first success (mean over "
        "attacks) | median queries to detection (mean) | honest flagged: plain / resend / "
        "burst / viral |",
        "|---|---|---|---|---|",
    ]
    for name, result in summary["schemes"].items():
        attacks = result["attacks"].values()
        share = float(np.mean([a["detected_before_success"] for a in attacks]))
        medians = [a["median_queries_to_detection"] for a in attacks]
        known = [m for m in medians if m is not None]
        flags = " / ".join(
            f"{result['false_flags'][k]['flagged']}/{result['false_flags'][k]['clients']}"
            for k in TRAFFIC_KINDS
        )
        chosen = " **(chosen)**" if name == summary["chosen"] else ""
        lines.append(
            f"| {name}{chosen} | {_rule(result['rule'])} | {share:.1%} | "
            f"{_num(float(np.mean(known)) if known else None)} | {flags} |"
        )
    return lines


def _report_chosen(summary: dict[str, Any], chosen: dict[str, Any]) -> list[str]:
    """The chosen fingerprint, attack by attack (also spread over Sybil ids)."""
    lines = [
        "",
        f"## Chosen: {summary['chosen']}",
        "",
        "| attack | setting | runs | successful | median queries to success | first match "
        "(median) | detected | detected before first success | strictly before | of the "
        "successful | median queries to detection (of the detected runs) | p90 (of the "
        "detected) | "
        f"{summary['sybil_ids']} ids: before success | "
        f"{summary['sybil_ids']} ids: median queries to detection |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, a in chosen["attacks"].items():
        s = chosen["sybil"][key]
        lines.append(
            f"| {_attack_cells(key)} | {a['runs']} | {a['successful_runs']} | "
            f"{_num(a['median_queries_to_success'])} | {_num(a['median_queries_to_first_match'])} "
            f"| {a['detected']} | {_pct(a['detected_before_success'])} | "
            f"{_pct(a['detected_strictly_before_success'])} | "
            f"{_pct(a['detected_before_success_of_successful'])} | "
            f"{_num(a['median_queries_to_detection'])} | {_num(a['p90_queries_to_detection'])} | "
            f"{_pct(s['detected_before_success'])} | {_num(s['median_queries_to_detection'])} |"
        )
    return lines


def _report_honest(chosen: dict[str, Any], viral_photos: int) -> list[str]:
    """Honest clients flagged per traffic kind, with Wilson intervals over clients, except for
    the viral kind: its senders share ``viral_photos`` photos, and whether a sender is flagged
    depends mostly on which photo (and version) it sent, so its clients are not independent
    samples and the interval is given over the photos instead."""
    lines = [
        "",
        "Honest clients flagged (test photos; Wilson 95% interval):",
        "",
        "| traffic | clients | flagged | rate | 95% interval | highest client / global count |",
        "|---|---|---|---|---|---|",
    ]
    for kind, f in chosen["false_flags"].items():
        low, high = f["wilson95"]
        interval = f"{low:.2%}-{high:.2%}"
        if kind == "viral":
            interval = f"see below ({viral_photos} photos)"
        lines.append(
            f"| {kind} | {f['clients']} | {f['flagged']} | {_pct(f['rate'])} | "
            f"{interval} | {f['max_client_matches']} / {f['max_global_matches']} |"
        )
    viral = chosen["false_flags"]["viral"]
    lines += ["", viral_note(viral["clients"], viral["flagged"], viral_photos)]
    return lines


def viral_note(senders: int, flagged: int, photos: int) -> str:
    """What the viral traffic can say: per photo, not per sender."""
    text = (
        f"The {senders} viral senders share {photos} photos, so their flags are not independent "
        "and no interval over senders holds. "
    )
    if flagged:
        return text + f"{flagged} senders were flagged; how many photos they sent is not recorded."
    low, high = wilson_interval(0, photos)
    return text + (
        f"No sender of any of the {photos} photos was flagged: per photo 0 of {photos}, "
        f"95% interval {low:.0%}-{high:.0%} of viral photos that would flag a sender."
    )


def _report_cost(summary: dict[str, Any]) -> list[str]:
    """The in-process cost, and the command that produced the report."""
    cost = summary["cost"]
    return [
        "",
        f"Cost (in process, one CPU thread, {cost['queries']} queries): fingerprint "
        f"{cost['fingerprint_ms']:.3f} ms per query, check-and-add {cost['check_and_add_ms']:.3f} "
        f"ms with the store full, {cost['bytes_per_fingerprint']:.0f} B of Python heap per stored "
        "fingerprint (the shared ring and the clients' buffers).",
        *command_block(summary["command"]),
    ]


def command_block(command: str) -> list[str]:
    """A report's closing lines: the command that produced it, as a code block."""
    return ["", "Command:", "", "```", command, "```", ""]
