"""Pool the rounds of several interleaved runs into one ratio with its interval.

One run of ``bench.stateful_cost`` or ``bench.service_vs_bare`` gives ten rounds, and on shared
cores a 95% interval ten points wide: whether a ratio clears a target a few points away is then
a coin flip from run to run. Runs of the *same code* can be pooled round by round (each round's
two slices ran within the same round, seconds apart, in an order flipped every round, so each
round's ratio is a fair sample whatever the machine's load that minute), and the pooled
interval is the figure to judge a target by.

    python -m bench.pool_rounds c5d40cc:bench/results/stateful_cost.json \\
        349dc27:bench/results/stateful_cost.json bench/results/stateful_cost.json --target 0.9

Each argument is a results file, or ``REV:PATH`` for one committed at a git revision.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import REPO, PairedRatio, interval_verdict, paired_ratio

# a service's rounds against its baseline's: (numerators, denominators)
Rounds = dict[str, tuple[list[float], list[float]]]

# the settings that make the load a run measured, and the machine's processor: runs that
# differ in one are not pooled
LOAD_SETTINGS = ("images", "concurrency", "slice", "clients", "device")


def rounds_of(results: dict[str, Any]) -> Rounds:
    """Per compared pair, its per-round throughputs: ``stateful_cost`` gives the screening on
    against off for each store; ``service_vs_bare`` each service against the guard off (b)."""
    found: Rounds = {}
    if "throughput" in results:  # bench.stateful_cost
        for backend, run in results["throughput"]["runs"].items():
            found[f"{backend}: on / off"] = (
                list(run["on"]["per_round_images_per_s"]),
                list(run["off"]["per_round_images_per_s"]),
            )
    for variant in results.get("variants", []):  # bench.service_vs_bare
        services = (variant.get("interleaved") or {}).get("services", {})
        if "b" not in services:
            continue
        baseline = list(services["b"]["per_round_images_per_s"])
        for role, service in services.items():
            if role != "b":
                key = f"{role} / b, {variant['torch_threads']} torch threads"
                found[key] = (list(service["per_round_images_per_s"]), baseline)
    if not found:
        raise ValueError("no interleaved rounds in these results")
    return found


def pooled(runs: Sequence[dict[str, Any]]) -> dict[str, PairedRatio]:
    """Each pair's rounds of every run together, as one ``paired_ratio``. A pair missing from a
    run is pooled over the runs that have it."""
    together: Rounds = {}
    for results in runs:
        for key, (top, bottom) in rounds_of(results).items():
            have = together.setdefault(key, ([], []))
            have[0].extend(top)
            have[1].extend(bottom)
    return {key: paired_ratio(top, bottom) for key, (top, bottom) in together.items()}


class ResultsError(ValueError):
    """A results argument that cannot be read as a benchmark's results: says which and why."""


def load_of(results: dict[str, Any]) -> dict[str, Any]:
    """The load a run measured and the processor it ran on, as its results record them (absent:
    None)."""
    settings = results.get("settings") or {}
    load = {key: settings.get(key) for key in LOAD_SETTINGS}
    return {**load, "cpu": (results.get("machine") or {}).get("cpu")}


def same_load(sources: Sequence[str], runs: Sequence[dict[str, Any]]) -> None:
    """Refuse to pool runs that measured different loads (more uploads, other clients, another
    concurrency...): their rounds are samples of different ratios, and an interval over them
    says nothing about either."""
    first = load_of(runs[0])
    for source, run in zip(sources[1:], runs[1:], strict=True):
        for key, value in load_of(run).items():
            if value != first[key]:
                raise ResultsError(
                    f"{source}: another load than {sources[0]} ({key} {value} against "
                    f"{first[key]}): runs of different loads are not pooled"
                )


def read_results(source: str) -> dict[str, Any]:
    """A results file, or ``REV:PATH`` read with ``git show`` from the repository."""
    path = Path(source)
    if not path.is_file() and ":" in source:
        shown = subprocess.run(["git", "show", source], cwd=REPO, capture_output=True, text=True)
        if shown.returncode != 0:
            raise ResultsError(f"{source}: {shown.stderr.strip() or 'git show failed'}")
        text = shown.stdout
    elif not path.is_file():
        raise ResultsError(f"{source}: no such file (or REV:PATH)")
    else:
        text = path.read_text()
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{source}: not a results file (not JSON: {exc})") from exc
    if not isinstance(loaded, dict):
        raise ResultsError(f"{source}: not a results file (a JSON {type(loaded).__name__})")
    return loaded


def readable_run(source: str) -> dict[str, Any]:
    """``read_results``, and refused unless it holds interleaved rounds to pool."""
    run = read_results(source)
    try:
        rounds_of(run)
    except (ValueError, KeyError, TypeError) as exc:
        raise ResultsError(f"{source}: no interleaved rounds to pool ({exc})") from exc
    return run


def report(
    sources: Sequence[str], found: dict[str, PairedRatio], target: float | None = None
) -> str:
    """The pooled ratios; with a ``target``, each one's verdict on its interval."""
    judged = target is not None
    lines = [
        f"Pooled over {len(sources)} runs: {', '.join(f'`{s}`' for s in sources)}.",
        "",
        "| pair | rounds | ratio (geometric mean of the rounds) | 95% interval |"
        + (f" target {target:.1%} |" if judged else ""),
        "|---|---|---|---|" + ("---|" if judged else ""),
    ]
    for key, ratio in found.items():
        verdict = "" if target is None else f" {interval_verdict(ratio.as_dict(), target)} |"
        lines.append(
            f"| {key} | {ratio.rounds} | {ratio.ratio:.1%} | {ratio.low:.1%}-{ratio.high:.1%} |"
            + verdict
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pool_rounds", description=__doc__)
    parser.add_argument("results", nargs="+", help="results files, or REV:PATH")
    parser.add_argument(
        "--target",
        type=float,
        help="a throughput ratio to judge each pair by (e.g. 0.9): met only when the whole "
        "pooled interval clears it, missed only when the whole interval falls short",
    )
    args = parser.parse_args(argv)
    if args.target is not None and not args.target > 0.0:  # NaN too
        parser.error("--target must be a positive ratio, e.g. 0.9")
    try:
        runs = [readable_run(source) for source in args.results]
        same_load(args.results, runs)
    except ResultsError as exc:
        print(f"pool_rounds: error: {exc}", file=sys.stderr)
        return 2
    print(report(args.results, pooled(runs), args.target))
    return 0


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m bench.pool_rounds"))
