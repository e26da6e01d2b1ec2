"""Tables and figures of ``advguard simulate`` (results in evaluation/results/simulation-*/)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.core.flagging import FlagPolicy, PolicyKind
from evaluation.simulate import HONEST, PolicyOutcome, TimeToFlag, wilson_interval


def _ttf(t: TimeToFlag) -> str:
    def fmt(v: float | None) -> str:
        return "never" if v is None else f"{v:.0f}"

    return f"{fmt(t.median)} / {fmt(t.p90)} / {100 * t.never_share:.1f}%"


def _thresholds(policy: FlagPolicy) -> str:
    """The policy's thresholds, its own statistic's first (ewma_shift: the EWMA's / the shift's)."""
    return " / ".join(f"{threshold:.4g}" for _, threshold in policy.thresholds())


def outcome_json(outcome: PolicyOutcome) -> dict[str, Any]:
    p = outcome.policy
    return {
        "policy": {
            "kind": p.kind,
            "threshold": p.threshold,
            "min_requests": p.min_requests,
            "ewma_alpha": p.window.ewma_alpha,
            "cusum_reference": p.window.cusum_reference,
            "anchor": p.window.anchor,
            "null_rejection_rate": p.null_rejection_rate,
            "shift_allowance": p.window.shift_allowance,
            "shift_threshold": p.shift_threshold,
        },
        "honest_flagged_within": {str(n): v for n, v in outcome.honest_flagged.items()},
        "honest_flagged_ci95": list(outcome.honest_interval),
        "honest_kinds": {
            kind: {"flagged": flagged, "clients": clients}
            for kind, (flagged, clients) in outcome.honest_kinds.items()
        },
        "attackers": {
            kind: {
                "clients": t.clients,
                "median": t.median,
                "p90": t.p90,
                "never_share": t.never_share,
            }
            for kind, t in outcome.attackers.items()
        },
    }


def markdown(
    outcomes: dict[PolicyKind, PolicyOutcome],
    kinds: Sequence[str],
    default: PolicyKind | None,
    meta: dict[str, Any],
    stress: Sequence[str] = (),
) -> str:
    horizon = meta["requests"]
    checkpoints = [n for n in next(iter(outcomes.values())).honest_flagged if n != horizon]
    lines = _setup_section(meta, horizon)
    lines += _honest_flagged_table(outcomes, default, checkpoints, horizon)
    lines += _time_to_flag_table(
        outcomes, "Requests until an attacker is flagged: median / p90 / share never flagged", kinds
    )
    lines += _stress_sections(outcomes, stress, horizon)
    lines += _by_class_section(meta.get("honest_by_class", {}))
    lines += _pool_scores_section(meta["pools"])
    lines += _default_and_command(meta, default, horizon)
    return "\n".join(lines)


def _setup_section(meta: dict[str, Any], horizon: int) -> list[str]:
    """The title and the traffic simulated: a reader must know the population, the horizon and
    what the thresholds were calibrated for before any share below means anything."""
    return [
        f"# Attack-source detection: {meta['bundle']}",
        "",
        f"{meta['honest_clients']} honest clients and {meta['attack_clients']} clients per "
        f"attacker kind, {horizon} requests each; mixed attackers send one adversarial every "
        f"{meta['mix_every']} requests. Thresholds calibrated on the bundle's held-out honest "
        f"scores for a design false-flag rate of {100 * meta['false_flag_rate']:g}% within "
        f"{meta['calibration_horizon']} requests (never on this traffic). "
        + (
            "The policies average each request's per-class p-value: its score among the "
            "bundle's held-out honest scores of the same predicted class."
            if meta.get("flag_per_class")
            else "The policies average the guard's raw scores."
        ),
    ]


def _honest_flagged_table(
    outcomes: dict[PolicyKind, PolicyOutcome],
    default: PolicyKind | None,
    checkpoints: Sequence[int],
    horizon: int,
) -> list[str]:
    """One row per policy: the share of honest clients flagged at each checkpoint, with the
    interval at the horizon, since the false-flag cost is what the default is first judged on."""
    lines = [
        "",
        "## Honest clients flagged (share, 95% Wilson interval within the horizon)",
        "",
        "| policy | threshold | "
        + " | ".join(f"within {n}" for n in checkpoints)
        + f" | within {horizon} | 95% CI |",
        "|---|---|" + "---|" * (len(checkpoints) + 2),
    ]
    for kind, o in outcomes.items():
        lo, hi = o.honest_interval
        cells = [f"{100 * o.honest_flagged[n]:.2f}%" for n in [*checkpoints, horizon]]
        mark = " (default)" if kind == default else ""
        lines.append(
            f"| {kind}{mark} | {_thresholds(o.policy)} | "
            + " | ".join(cells)
            + f" | {100 * lo:.2f}-{100 * hi:.2f}% |"
        )
    return lines


def _pool_scores_section(pools: dict[str, dict[str, Any]]) -> list[str]:
    """The guard's scores of each traffic pool: how separable the clients' requests are one by
    one, which bounds what any policy averaging them can do."""
    lines = [
        "",
        "## Scores of the traffic (the bundle's guard)",
        "",
        "| pool | images | mean score | rejected at the service threshold |",
        "|---|---|---|---|",
    ]
    for name, pool in pools.items():
        lines.append(
            f"| {name} | {pool['images']} | {pool['mean_score']:.3f} | "
            f"{100 * pool['rejected_share']:.1f}% |"
        )
    return lines


def _default_and_command(
    meta: dict[str, Any], default: PolicyKind | None, horizon: int
) -> list[str]:
    """The default chosen and the rule that chose it (fixed before measuring), and the command
    that reproduces the run."""
    return [
        "",
        f"Default policy by the rule fixed before measuring (`choose_default`: honest clients "
        f"flagged within {horizon} <= {100 * meta['max_false_flag_rate']:g}%, and so for the "
        "one-class honest clients taken together; then the lowest mean over the pure attacks of "
        "the slowest median requests-to-flag across the histories measured): "
        f"**{default}**.",
        "",
        f"Command: `{meta['command']}`; {meta['seconds']:.0f} s.",
        "",
    ]


def _time_to_flag_table(
    outcomes: dict[PolicyKind, PolicyOutcome], title: str, attackers: Sequence[str]
) -> list[str]:
    """One row per attacker kind, one column per policy: requests until flagged."""
    policies = list(outcomes)
    lines = ["", f"## {title}", "", "| attacker | " + " | ".join(policies) + " |"]
    lines.append("|---|" + "---|" * len(policies))
    for attacker in attackers:
        cells = [_ttf(outcomes[p].attackers[attacker]) for p in policies]
        lines.append(f"| {attacker} | " + " | ".join(cells) + " |")
    return lines


def _by_class_section(by_class: dict[str, dict[str, float]]) -> list[str]:
    """The honest test photos by true class: what a one-class client sends."""
    if not by_class:
        return []
    lines = [
        "",
        "## Honest test photos by true class: the model's accuracy and the mean flag value",
        "",
        "| class | accuracy | mean flag value | correctly classified | errors |",
        "|---|---|---|---|---|",
    ]
    for name, row in by_class.items():
        lines.append(
            f"| {name} | {100 * row['accuracy']:.1f}% | {row['mean_flag_value']:.3f} | "
            f"{row['correct']:.3f} | {row['errors']:.3f} |"
        )
    return lines


def _stress_sections(
    outcomes: dict[PolicyKind, PolicyOutcome], stress: Sequence[str], horizon: int
) -> list[str]:
    """The clients beside the base population: attackers with an honest history, and honest
    clients of one class (both read by the default's rule since 2026-11-30)."""
    policies = list(outcomes)
    lines: list[str] = []
    if stress:
        lines += _time_to_flag_table(
            outcomes,
            "Attackers with an honest history (`warm<W>`: W honest requests, then the attack): "
            "requests from the first adversarial until flagged, median / p90 / share never "
            "flagged (the default's rule reads each attack's slowest median over its histories)",
            stress,
        )
    honest_kinds = next(iter(outcomes.values())).honest_kinds
    if honest_kinds:
        lines += [
            "",
            f"## Honest clients whose photos are all of one class: share flagged within {horizon} "
            "requests (95% Wilson interval; the default's rule admits a policy only if it flags at "
            "most the honest budget of them taken together)",
            "",
            "| honest clients | " + " | ".join(policies) + " |",
            "|---|" + "---|" * len(policies),
        ]
        for kind in honest_kinds:
            cells = []
            for p in policies:
                flagged, clients = outcomes[p].honest_kinds[kind]
                low, high = wilson_interval(flagged, clients)
                cells.append(f"{100 * flagged / clients:.2f}% ({100 * low:.2f}-{100 * high:.2f}%)")
            lines.append(f"| {kind} (of {clients}) | " + " | ".join(cells) + " |")
    return lines


def write_figure(
    outcomes: dict[PolicyKind, PolicyOutcome], kinds: Sequence[str], horizon: int, path: Path
) -> None:
    """ECDF of requests-to-flag per attacker kind (one panel each), one line per policy, and the
    honest clients' cumulative false-flag share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [HONEST, *kinds]
    cols = 4
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    steps = np.arange(1, horizon + 1)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for kind, outcome in outcomes.items():
            flagged = outcome.times_by_kind.get(panel, [])
            times = np.array([np.inf if t is None else t for t in flagged], dtype=float)
            share = [(times <= n).mean() for n in steps]
            ax.plot(steps, share, label=kind)
        ax.set_title(panel if panel != HONEST else "honest (false flags)")
        ax.set_xlabel("requests")
        ax.set_ylabel("share flagged")
        ax.set_xlim(1, horizon)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
