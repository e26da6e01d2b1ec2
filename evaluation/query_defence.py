"""The issue-13 table: each query attack against no guard, the per-image guard, and the guard
plus the stateful detector, with what still succeeds under the ``refuse`` and ``silent`` policies.

Reads what ``evaluation.stateful_eval`` wrote (``stateful.json``: the chosen fingerprint's
per-run replays of the recorded attacks, one client id and spread over Sybil ids) and writes
``defence.md`` and ``time_to_detection.png`` beside it. Nothing is recomputed here, so the table
and the plot always describe the same replays as ``stateful.md``.

    python -m evaluation.query_defence            # after python -m evaluation.stateful_eval

``--closed-loop`` builds the same table from what ran live instead (``closed_loop_table``): the
recorded runs without the stateful detector (``query_attacks``' ``results.json``) and, for the
stateful rows, ``policy_check``'s closed-loop checks, with no replay and no ``stateful.json``;
its time-to-detection plot (``closed_loop_plot``) reads the same checks image by image:

    python -m evaluation.query_defence --closed-loop --attack-runs DIR --results DIR

Where ``evaluation.policy_check`` has rerun an attack in closed loop against a policy (its
``policy_check.json`` beside ``stateful.json``), the table shows that live count beside the
replay's share: the replay cannot follow an attack past an answer it was denied, and under
``silent`` the denied answer may be the true one (see ``live_cell``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.core.stateful.match_rule import DetectionRule
from evaluation.policy_check import first_image, result_key, rule_counts, rule_text
from evaluation.query_attacks import DEFAULT_RESULTS

ATTACK_ORDER = ("square", "hopskipjump", "boundary")
SETTING_LABELS = {"guard_off": "no guard", "guard_on": "guard (v2)"}


@dataclass(frozen=True)
class Row:
    """One line of the table; detection columns are None where no stateful detector ran."""

    attack: str
    defence: str
    success_rate: float
    median_queries_to_success: float | None
    median_queries_to_detection: float | None = None
    detected_before_success: float | None = None
    succeeded_despite_detection: float | None = None
    ids: int | None = None  # client ids of a stateful row of the guard setting (1: no spread)
    # of the runs that succeed (without the detector), the share detected before (or at) the
    # first success: the share of would-be successes stopped (the column before also counts
    # runs that never succeed and are detected)
    caught_of_successful: float | None = None


def spread_label(ids: int) -> str:
    """How many client ids an attacker spread its queries over, as the tables say it."""
    return "1 id" if ids == 1 else f"{ids} ids"


def rows(summary: dict[str, Any]) -> list[Row]:
    """Per attack: the two recorded settings alone, then each with the stateful detector for
    one client id and for the Sybil spread. ``flag`` answers as usual, so its success rate is
    the setting's. The replay counts a run as stopped from its detecting query on, under
    ``refuse`` and ``silent`` alike. That is only what the recording can say: a live attack
    denied an answer walks elsewhere, and some of its later probes may match nothing stored
    (``refuse``); under ``silent`` the anchor's answer is the true one whenever the anchor had
    the same answer. The closed-loop counts (``live_cell``) are the figures to read."""
    chosen = summary["schemes"][summary["chosen"]]
    ids = summary["sybil_ids"]
    out: list[Row] = []
    for attack in ATTACK_ORDER:
        for setting, label in SETTING_LABELS.items():
            key = f"{attack}/{setting}"
            if key not in chosen["attacks"]:
                continue
            single = chosen["attacks"][key]
            success = single["successful_runs"] / single["runs"]
            out.append(Row(attack, label, success, single["median_queries_to_success"]))
            for count, result in ((1, single), (ids, chosen["sybil"][key])):
                spread = spread_label(count)
                out.append(
                    Row(
                        attack,
                        f"{label} + stateful, {spread}",
                        success,
                        result["median_queries_to_success"],
                        result["median_queries_to_detection"],
                        result["detected_before_success"],
                        result["succeeded_despite_detection"],
                        count if setting == "guard_on" else None,
                        result["detected_before_success_of_successful"],
                    )
                )
    return out


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def live_cell(row: Row, policy: str, live: dict[str, Any], rule: list[int | None]) -> str:
    """The closed-loop count for ``row`` under ``policy``: attacks rerun against the service's
    own screening in process (``policy_check --in-process``, ``--sybil-ids`` for the spread)
    that ended on a truly adversarial answer, out of the images run; "–" where none ran. Runs
    the check cut short (``--stall-asks``: the attack's asks ran out before its query cap) could
    still have succeeded, so with any the count is a lower bound and says how many. A
    check run under another rule than the replay's (``rule``: client, global, changed,
    consistent; or with close copies, which the replay never had) says which: it measured that
    rule, not this one. A check that saw the screening's outcomes also gives the runs flagged
    before their first success and the median queries to detection, in closed loop."""
    if row.ids is None:
        return "–"
    key = result_key(row.attack, policy, in_process=True, ids=row.ids)
    if key not in live:
        return "–"
    check = live[key]
    cell = succeeded_live(check)
    if "screened" in check:
        median = check["median_queries_to_detection"]
        cell += (
            f"; flagged before success {check['detected_before_success']}/{check['screened']}"
            f", median {'–' if median is None else f'{median:g}'} queries"
        )
    ran_under = check.get("rule")
    radius = check.get("close_radius")
    if ran_under is not None and (
        same_length(ran_under, rule) != same_length(rule, ran_under) or radius
    ):
        copies = f", close copies within {radius}" if radius else ""
        cell += f" (rule {rule_text(ran_under)}{copies})"
    return cell


def succeeded_live(check: dict[str, Any]) -> str:
    """A closed-loop check's runs that ended on a truly adversarial answer, out of its images.
    Runs it cut short (``--stall-asks``: the attack's asks ran out before its query cap) could
    still have succeeded, so with any the count is a lower bound and says how many."""
    cell = f"{check['live_success']}/{check['images']}"
    if check.get("stalled"):
        cell += f" (at least; {check['stalled']} cut short)"
    return cell


def same_length(counts: list[int | None], other: list[int | None]) -> list[int | None]:
    """``counts`` padded with None (off) to ``other``'s length: a rule recorded before a later
    count existed ran with that count off."""
    return counts + [None] * (len(other) - len(counts))


def chosen_rule(summary: dict[str, Any]) -> list[int | None]:
    """The replayed rule as (client, global, changed, consistent) counts, as ``policy_check``
    records it."""
    return rule_counts(DetectionRule(**summary["schemes"][summary["chosen"]]["rule"]))


def table(summary: dict[str, Any], live: dict[str, Any] | None = None) -> str:
    """``live``: ``policy_check.json``'s checks, when the policies were rerun in closed loop."""
    live = live or {}
    rule = chosen_rule(summary)
    lines = [
        "| attack | defence | success rate (flag) | median queries to success | median queries "
        "to detection | detected before first success | of the successful runs | success under "
        "refuse or silent, replayed | succeeded under refuse, closed loop | succeeded under "
        "silent, closed loop |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows(summary):
        lines.append(
            f"| {row.attack} | {row.defence} | {_pct(row.success_rate)} | "
            f"{_num(row.median_queries_to_success)} | {_num(row.median_queries_to_detection)} | "
            f"{_pct(row.detected_before_success)} | {_pct(row.caught_of_successful)} | "
            f"{_pct(row.succeeded_despite_detection)} | "
            f"{live_cell(row, 'refuse', live, rule)} | {live_cell(row, 'silent', live, rule)} |"
        )
    return "\n".join(lines)


CLOSED_LOOP_FILE = "defence_closed_loop.md"


@dataclass(frozen=True)
class ClosedLoopCheck:
    """The closed-loop check (``policy_check --in-process``) chosen for one attack, policy and
    spread: its key (one check, or checks pooled image by image), its counts, and which of the
    picked images it attacked (their positions in ``query_attacks``' pick order)."""

    key: str
    result: dict[str, Any]
    picks: str


def _pick_ranges(keys: Sequence[str], checks: dict[str, Any]) -> str:
    """ "picks 200-299" for checks from 200 and 250 of 50 images each: the positions, in the
    picker's order, of the images the checks attacked."""
    spans = []
    for key in keys:
        first = first_image(key)
        spans.append((first, first + int(checks[key]["images"]) - 1))
    spans.sort()
    merged = [list(spans[0])]
    for start, end in spans[1:]:
        if start == merged[-1][1] + 1:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    return "picks " + ", ".join(f"{a}-{b}" for a, b in merged)


def closed_loop_check(
    recorded_checks: dict[str, Any], attack: str, policy: str, ids: int
) -> ClosedLoopCheck | None:
    """Of the checks of ``attack`` under ``policy`` in process over ``ids`` client ids, alone
    (``result_key``, any first image) or pooled (``--pool`` of such checks only), the one over
    the most images; a pool before a single check of as many. A fixed rule, so that the table
    never picks the check it likes."""
    checks, pooled = recorded_checks["checks"], recorded_checks.get("pooled", {})
    base = result_key(attack, policy, in_process=True, ids=ids)

    def ours(key: str) -> bool:
        return key == base or key.startswith(base + "_from")

    candidates = [
        (result["checks"], key, result)
        for key, result in pooled.items()
        if all(ours(part) for part in result["checks"])
    ] + [([key], key, result) for key, result in checks.items() if ours(key)]
    if not candidates:
        return None
    parts, key, result = max(candidates, key=lambda c: int(c[2]["images"]))
    return ClosedLoopCheck(key, result, _pick_ranges(parts, checks))


def _settings_row(attack: str, setting: str, runs: dict[str, Any], images: int) -> str | None:
    run = runs.get(f"{attack}/{setting}")
    if run is None:
        return None
    return (
        f"| {attack} | {SETTING_LABELS[setting]} | picks 0-{images - 1} | "
        f"{run['succeeded']}/{run['images']} | {_num(run['median_queries_to_success'])} "
        "| – | – | – | – |"
    )


def detection_check(
    recorded_checks: dict[str, Any], attack: str, ids: int
) -> ClosedLoopCheck | None:
    """The check a stateful row's detection figures come from: ``refuse``'s, or ``silent``'s
    where no ``refuse`` check ran (both policies answer alike until the first flag)."""
    return closed_loop_check(recorded_checks, attack, "refuse", ids) or closed_loop_check(
        recorded_checks, attack, "silent", ids
    )


def first_detections(recorded_checks: dict[str, Any], check: ClosedLoopCheck) -> list[int | None]:
    """Each screened image's first flagged query in ``check`` (None: never flagged), read image
    by image from the checks it pools (``policy_check``'s ``per_image``)."""
    parts = check.result.get("checks", [check.key])
    return [
        image.get("first_detection")
        for part in parts
        for image in recorded_checks["checks"][part]["per_image"]
        if image.get("screened")
    ]


def _stateful_row(attack: str, ids: int, recorded_checks: dict[str, Any]) -> str | None:
    refuse = closed_loop_check(recorded_checks, attack, "refuse", ids)
    silent = closed_loop_check(recorded_checks, attack, "silent", ids)
    seen = detection_check(recorded_checks, attack, ids)
    if seen is None:
        return None
    spread = spread_label(ids)
    picks = seen.picks
    if refuse is not None and silent is not None and refuse.picks != silent.picks:
        picks = f"{refuse.picks} (refuse), {silent.picks} (silent)"
    result = seen.result
    median = result.get("median_queries_to_detection")
    detected = (
        "–"
        if "screened" not in result
        else f"{result['detected_before_success']}/{result['screened']}"
    )
    return (
        f"| {attack} | guard (v2) + stateful, {spread} | {picks} | – | – | "
        f"{'–' if median is None else f'{median:g}'} | {detected} | "
        f"{'–' if refuse is None else succeeded_live(refuse.result)} | "
        f"{'–' if silent is None else succeeded_live(silent.result)} |"
    )


def closed_loop_table(
    attack_runs: dict[str, Any], recorded_checks: dict[str, Any], sybil_ids: int
) -> str:
    """The issue's table from what was run live, nothing replayed: each attack with no guard and
    with the guard alone (``query_attacks``' recorded runs), then with the stateful detector
    under ``refuse`` and ``silent`` in closed loop (``policy_check``), over one client id and
    over ``sybil_ids``. Detection columns come from the ``refuse`` check (both policies answer
    alike until the first flag), or from ``silent``'s where no ``refuse`` check ran."""
    lines = [
        "| attack | defence | images | succeeded | median queries to success | median queries "
        "to detection | detected before first success | succeeded under refuse | succeeded "
        "under silent |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for attack in ATTACK_ORDER:
        candidates = [
            _settings_row(attack, setting, attack_runs["runs"], int(attack_runs["images"]))
            for setting in SETTING_LABELS
        ] + [_stateful_row(attack, ids, recorded_checks) for ids in (1, sybil_ids)]
        lines += [row for row in candidates if row is not None]
    return "\n".join(lines)


CLOSED_LOOP_PLOT = "time_to_detection_closed_loop.png"


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (PNG files, no screen), imported when drawing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def closed_loop_plot(
    attack_runs: dict[str, Any], recorded_checks: dict[str, Any], sybil_ids: int, path: Path
) -> bool:
    """Time to detection as run, one panel per attack that has a stateful check: the share of
    runs flagged by each query (one id and ``sybil_ids``; the checks the table's rows read),
    beside the median queries to success of the recorded runs with no guard and with the guard
    alone (vertical lines; their runs' own query counts are not in ``results.json``). False,
    and nothing written, when no attack has a check."""
    panels = [
        (attack, {ids: detection_check(recorded_checks, attack, ids) for ids in (1, sybil_ids)})
        for attack in ATTACK_ORDER
    ]
    panels = [(attack, checks) for attack, checks in panels if any(checks.values())]
    if not panels:
        return False
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8), sharey=True)
    axes = np.atleast_1d(axes)
    for axis, (attack, checks) in zip(axes, panels, strict=True):
        flagged = [
            (ids, check.picks, first_detections(recorded_checks, check))
            for ids, check in checks.items()
            if check is not None
        ]
        known = [query for *_, at in flagged for query in at if query is not None]
        cap = int(attack_runs.get("caps", {}).get(attack, 0))
        queries = np.arange(1, max([cap, *known, 2]) + 1)
        for (ids, picks, at), style in zip(flagged, ("-", ":"), strict=False):
            spread = spread_label(ids)
            axis.step(
                queries,
                share_by_query(at, queries),
                style,
                where="post",
                color="tab:blue",
                label=f"flagged, {spread} ({picks})",
            )
        for (setting, label), colour in zip(
            SETTING_LABELS.items(), ("tab:red", "tab:orange"), strict=True
        ):
            run = attack_runs["runs"].get(f"{attack}/{setting}")
            if run is None or run.get("median_queries_to_success") is None:
                continue
            axis.axvline(
                run["median_queries_to_success"],
                color=colour,
                linestyle="--",
                label=f"median success, {label} ({run['succeeded']}/{run['images']})",
            )
        axis.set_xscale("log")
        axis.set_title(attack)
        axis.set_xlabel("queries sent")
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right", fontsize=7)
    axes[0].set_ylabel("share of runs flagged by then")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def closed_loop_report(
    attack_runs: dict[str, Any],
    recorded_checks: dict[str, Any],
    sybil_ids: int,
    attack_runs_dir: Path,
    plotted: bool = False,
) -> str:
    return "\n".join(
        [
            "# Query attacks against each layer of the defence, as run (issue 13)",
            "",
            f"The rows without the stateful detector are `python -m evaluation.query_attacks`' "
            f"recorded runs (`{attack_runs_dir}/results.json`: the first "
            f"{attack_runs['images']} images the bundle classifies correctly and accepts, in the "
            f'picker\'s order, "picks 0-{int(attack_runs["images"]) - 1}"); the stateful rows '
            "are the closed-loop checks of "
            "`python -m evaluation.policy_check --in-process` (`policy_check.json` here), the "
            "attacks rerun against the service's own screening on later picks, one check or "
            "several pooled image by image: for each attack, policy and spread the one over the "
            "most images. *Succeeded*: runs that got an answer of another class within the "
            "budget (left blank on the stateful rows: with `flag` they answer as the guard alone "
            "does). *Detected before first success*: runs flagged at or before their first "
            "successful query, or at all when they never succeed (with `refuse`, where it "
            "ran). Under `refuse` a detected query is answered 403, under `silent` with its "
            "anchor's earlier answer; a count marked *at least* had runs cut short by the "
            "check's stall limit. Nothing is replayed here: every figure was answered live.",
            "",
            closed_loop_table(attack_runs, recorded_checks, sybil_ids),
            "",
            *(
                [
                    "Time to detection: the share of the stateful rows' runs flagged by each "
                    "query, beside the median query of success without the stateful detector.",
                    "",
                    f"![time to detection, as run]({CLOSED_LOOP_PLOT})",
                    "",
                ]
                if plotted
                else []
            ),
            "Commands: each row's own, in the files above; then `python -m "
            f"evaluation.query_defence --closed-loop --attack-runs {attack_runs_dir} --results "
            "<this directory>`.",
            "",
        ]
    )


def earliest_detection(summary: dict[str, Any]) -> int:
    """The first query the chosen rule can detect: one with the fewest distinct earlier
    near-duplicates any of its counts needs (client, global, changed answer), the attack's own
    first image included, is at least query ``fewest + 1``."""
    rule = summary["schemes"][summary["chosen"]]["rule"]
    counts = [rule["client_matches"], rule["global_matches"], rule.get("changed_matches")]
    return int(min(c for c in counts if c is not None)) + 1


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def floor_rows(summary: dict[str, Any]) -> list[tuple[str, str, float, float]]:
    """Per attack and setting: (attack, defence, the share of runs that succeed under refuse
    whatever the fingerprint, the share that did): a run whose first success comes before the
    earliest query the rule can detect succeeds under any fingerprint with that rule, so the
    honest traffic the rule is calibrated on (how many near-duplicates an honest client may
    send) bounds what ``refuse`` and ``silent`` can stop."""
    chosen = summary["schemes"][summary["chosen"]]
    first = earliest_detection(summary)
    out = []
    for attack in ATTACK_ORDER:
        for setting, label in SETTING_LABELS.items():
            key = f"{attack}/{setting}"
            if key not in chosen["outcomes"]:
                continue
            runs = chosen["outcomes"][key]["single"]
            floor = float(np.mean([r[2] is not None and r[2] < first for r in runs]))
            out.append(
                (attack, label, floor, chosen["attacks"][key]["succeeded_despite_detection"])
            )
    return out


def floor_table(summary: dict[str, Any]) -> str:
    lines = [
        "| attack | defence | succeed under refuse, any fingerprint (at best) "
        "| with the chosen one |",
        "|---|---|---|---|",
    ]
    for attack, label, floor, actual in floor_rows(summary):
        lines.append(f"| {attack} | {label} | {_pct(floor)} | {_pct(actual)} |")
    return "\n".join(lines)


def share_by_query(at: Sequence[int | None], queries: np.ndarray) -> np.ndarray:
    """For each query number in ``queries``, the share of runs whose event (a detection, a
    success) came at or before it; None: never."""
    when = np.array([np.inf if a is None else a for a in at], dtype=float)
    share: np.ndarray = (when[None, :] <= queries[:, None]).mean(axis=1)
    return share


def detection_curves(
    outcomes: Sequence[Sequence[int | None]], horizon: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Queries 1..horizon, and for each the share of runs detected and the share that had
    succeeded, by then (cumulative over runs; never = beyond the horizon)."""
    queries = np.arange(1, horizon + 1)
    detected = share_by_query([o[1] for o in outcomes], queries)
    succeeded = share_by_query([o[2] for o in outcomes], queries)
    return queries, detected, succeeded


def plot(summary: dict[str, Any], path: Path, setting: str = "guard_on") -> None:
    """Time to detection against time to success, one panel per attack (log queries)."""
    plt = _pyplot()
    chosen = summary["schemes"][summary["chosen"]]
    horizon = int(summary["horizon"])
    figure, axes = plt.subplots(1, len(ATTACK_ORDER), figsize=(13, 3.6), sharey=True)
    for axis, attack in zip(axes, ATTACK_ORDER, strict=True):
        runs = chosen["outcomes"][f"{attack}/{setting}"]
        for spread, style in (("single", "-"), ("sybil", ":")):
            queries, detected, _ = detection_curves(runs[spread], horizon)
            label = (
                "detected, 1 id" if spread == "single" else f"detected, {summary['sybil_ids']} ids"
            )
            axis.step(queries, detected, style, where="post", label=label, color="tab:blue")
        queries, _, succeeded = detection_curves(runs["single"], horizon)
        axis.step(queries, succeeded, "-", where="post", label="attack succeeded", color="tab:red")
        axis.set_xscale("log")
        axis.set_title(f"{attack}, {SETTING_LABELS[setting]}")
        axis.set_xlabel(f"queries sent (replays end at {horizon})")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("share of runs (cumulative)")
    axes[-1].legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(summary: dict[str, Any], live: dict[str, Any] | None = None) -> str:
    chosen = summary["chosen"]
    return "\n".join(
        [
            "# Query attacks against each layer of the defence (issue 13)",
            "",
            f"Stateful detector: `{chosen}`, its rule calibrated on honest traffic from "
            "training photos (`stateful.md`). Runs: 100 correctly classified CIFAR-10 test "
            "images per attack (`table.md`: budgets, query caps, ART's settings). *Success* "
            "counts a run that got an answer with another class within the budget; *detected "
            "before first success* counts a run detected at a query before its first successful "
            "one or at that query itself (screened before it is answered), and a "
            "never-successful run when it is detected at all; *of the successful runs* counts "
            "only the runs that succeed without the detector (the would-be successes stopped). "
            "*Median queries to detection* is over the detected runs. Replays stop at detection "
            f"or after {summary['horizon']} queries.",
            "",
            f"The Sybil rows send each run's queries round-robin over {summary['sybil_ids']} "
            "client ids, one second apart, into a store that holds only that run's queries and "
            "forgets nothing: everyone's scope then sees every query, so these rows equal the "
            "one-id rows by construction. They show that a *fast* spread gains nothing; they do "
            "not measure a *paced* one. Everyone's scope remembers a query for "
            "`ADVGUARD_STATEFUL_TTL_S` (1 h) or until the last "
            "`ADVGUARD_STATEFUL_MAX_FINGERPRINTS` (50,000) queries push it out, whichever "
            "comes first (under 400 queries/s of other traffic, about 2 minutes); an attacker "
            "who spreads its queries over enough ids that none sends the client rule's count, "
            "and paces them further apart than that memory, is never detected.",
            "",
            "Policies: `flag` answers as usual (success as without the detector); `refuse` "
            "answers 403 and `silent` the anchor query's earlier answer from the detecting query "
            "on. The *replayed* column counts a run as stopped at its detection, under both, "
            "which is all the recording can say: a live attack denied an answer walks elsewhere, "
            "and some of its later probes may match too few stored queries to be detected "
            "(`refuse`); under `silent` the anchor's answer is the true one whenever the anchor "
            "was answered the same (a decision-based attack started from another class's photo "
            "gets its own adversarial label back, truthfully). The *closed loop* columns rerun "
            "the attacks against the service's own screening (`python -m "
            "evaluation.policy_check --in-process`, `--sybil-ids` for the spread): runs that "
            "ended on a truly adversarial answer, out of the images run; – where none ran; "
            "where the check saw the screening's outcomes, also the runs flagged at or before "
            "their first success (or at all, never succeeding) and the median query of the "
            "first flag, in that closed loop.",
            "",
            table(summary, live),
            "",
            "![time to detection](time_to_detection.png)",
            "",
            "**What no fingerprint can stop at this rule.** The rule detects a query with at "
            f"least {earliest_detection(summary) - 1} distinct earlier near-duplicates, so no "
            f"query before the {_ordinal(earliest_detection(summary))} of a run (its first image "
            "included) can be detected, whatever the fingerprint; a run whose first success "
            "comes earlier "
            "succeeds under `refuse` and `silent` alike. The threshold comes from honest "
            "traffic (a photo and its edits and re-encodings: calibrated on training photos "
            "to flag at most half the issue's false-flag targets), so this floor is the price "
            "of flagging so few such users:",
            "",
            floor_table(summary),
            "",
            "Commands: `" + summary["command"] + "`, then `python -m evaluation.query_defence`.",
            "",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.query_defence",
        description="the issue-13 table and time-to-detection plot from stateful.json",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS,
        help="directory of stateful.json, where defence.md and the plot go (default: %(default)s)",
    )
    parser.add_argument(
        "--closed-loop",
        action="store_true",
        help=f"instead: {CLOSED_LOOP_FILE} and {CLOSED_LOOP_PLOT} from what ran live, "
        "policy_check.json in --results "
        "and query_attacks' results.json in --attack-runs (no stateful.json needed)",
    )
    parser.add_argument(
        "--attack-runs",
        type=Path,
        help="with --closed-loop: query_attacks' results directory (default: --results)",
    )
    parser.add_argument(
        "--sybil-ids",
        type=int,
        default=50,
        help="with --closed-loop: the spread's client ids (default: %(default)s)",
    )
    return parser


def write_closed_loop(args: argparse.Namespace) -> int:
    """``--closed-loop``: the table from the live runs alone, written beside the checks."""
    runs_dir = args.attack_runs or args.results
    attack_runs = json.loads((runs_dir / "results.json").read_text())
    recorded_checks = json.loads((args.results / "policy_check.json").read_text())
    plotted = closed_loop_plot(
        attack_runs, recorded_checks, args.sybil_ids, args.results / CLOSED_LOOP_PLOT
    )
    text = closed_loop_report(attack_runs, recorded_checks, args.sybil_ids, runs_dir, plotted)
    (args.results / CLOSED_LOOP_FILE).write_text(text)
    print(closed_loop_table(attack_runs, recorded_checks, args.sybil_ids))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.closed_loop:
        return write_closed_loop(args)
    summary = json.loads((args.results / "stateful.json").read_text())
    checks = args.results / "policy_check.json"
    live = json.loads(checks.read_text())["checks"] if checks.is_file() else {}
    (args.results / "defence.md").write_text(report(summary, live))
    plot(summary, args.results / "time_to_detection.png")
    print(table(summary, live))
    return 0


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m evaluation.query_defence"))
