"""The interpreter's switch interval: service throughput, stateful detection off and on, per value.

Why: the service's event loop and its batch worker are two threads of one interpreter. Every
torch or numpy call the worker makes gives the interpreter lock back; taking it again, while
the event loop runs Python (at saturation it always does), waits until the loop is made to
give it up: after the switch interval, 5 ms by default. The stateful screening's ~40 small
numpy calls per query on the worker pay that wait (ad hoc, two cores, beside a thread that
runs Python without pause: 0.17 ms a query alone, 25 ms at 5 ms, 1.6 ms at 0.2 ms).

Every service (stateful off and on, at each ``--intervals`` value in ms; ``default`` is
Python's) runs at once and is loaded in turn, one slice each per round (``interleaved``), so
that a shared machine's drifting load hits them alike. The figures: each one's throughput
against the default interval's with stateful detection off (the service as it was), and on /
off at each interval (issue 13's ratio), with 95% intervals over rounds.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from app.cli import at_least
from bench.common import ratio_by_round, ratio_cell, write_results
from bench.load_service import test_jpegs
from bench.service_load import Interleaving, interleaved, requests_of
from bench.stateful_cost import SERVICE_ENV

DEFAULT = "default"


def service_envs(intervals: list[str]) -> dict[str, dict[str, str]]:
    """``<interval>/<off|on>`` -> the service's environment."""
    envs = {}
    for interval in intervals:
        for state in ("off", "on"):
            env = {**SERVICE_ENV, "ADVGUARD_STATEFUL_ENABLED": str(state == "on").lower()}
            if interval != DEFAULT:
                env["ADVGUARD_SWITCH_INTERVAL_MS"] = interval
            envs[f"{interval}/{state}"] = env
    return envs


def ratios(runs: dict[str, Any], intervals: list[str]) -> dict[str, Any]:
    """Throughput over the default interval's stateful-off service, and on / off per interval."""

    def rounds(name: str) -> list[float]:
        values: list[float] = runs[name]["per_round_images_per_s"]
        return values

    base = f"{DEFAULT}/off" if f"{DEFAULT}/off" in runs else f"{intervals[0]}/off"
    return {
        "over_base": {name: ratio_by_round(rounds(name), rounds(base)) for name in runs},
        "on_over_off": {
            interval: ratio_by_round(rounds(f"{interval}/on"), rounds(f"{interval}/off"))
            for interval in intervals
        },
        "base": base,
    }


def table(results: dict[str, Any]) -> str:
    runs, found = results["runs"], results["ratios"]
    lines = [
        f"All {len(runs)} services loaded in turn ({results['settings']['rounds']} rounds of "
        f"{results['settings']['slice']:.0f} s each, concurrency "
        f"{results['settings']['concurrency']}, {results['settings']['clients']:,} client ids "
        f"in turn); load average {results['loadavg_before'][0]:.1f} before, "
        f"{results['loadavg_after'][0]:.1f} after.",
        "",
        "| switch interval | stateful | img/s | over "
        f"{found['base']} by round (95% interval) | CPU ms per request | on / off by round |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        interval, state = name.split("/")
        on_off = ratio_cell(found["on_over_off"][interval]) if state == "on" else ""
        lines.append(
            f"| {interval} | {state} | {run['throughput_images_per_s']:.0f} | "
            f"{ratio_cell(found['over_base'][name])} | {run['cpu_ms_per_request']:.2f} | "
            f"{on_off} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--intervals", nargs="+", default=[DEFAULT, "1", "0.2"], help="ms, or 'default'"
    )
    parser.add_argument("--images", type=at_least(1), default=5000, help="distinct uploads")
    parser.add_argument(
        "--concurrency",
        type=at_least(1),
        default=32,
        help="clients in flight (default: %(default)s)",
    )
    parser.add_argument("--rounds", type=at_least(1), default=8, help="load slices per service")
    parser.add_argument("--slice", type=float, default=5.0, help="seconds per load slice")
    parser.add_argument(
        "--clients", type=at_least(1), default=1000, help="X-Client-ID values in turn"
    )
    parser.add_argument(
        "--device", default="cpu", help="the services' device: cuda / cpu (default: %(default)s)"
    )
    parser.add_argument(
        "--out", default="switch_interval", help="results file name under bench/results"
    )
    args = parser.parse_args(argv)
    for interval in args.intervals:
        if interval != DEFAULT and not float(interval) > 0:
            parser.error(f"--intervals: {interval!r} is neither 'default' nor a positive ms value")

    load_before = os.getloadavg()
    requests = requests_of(test_jpegs(args.images), args.clients)
    plan = Interleaving(args.rounds, args.slice, args.concurrency, args.device)
    runs = interleaved(service_envs(args.intervals), requests, plan, "switch")
    for run in runs.values():
        del run["levels"]  # every slice's details: the rounds and means above are the figures
    results: dict[str, Any] = {
        "loadavg_before": load_before,
        "runs": runs,
        "ratios": ratios(runs, args.intervals),
        "loadavg_after": os.getloadavg(),
        "settings": vars(args),
    }
    path = write_results(args.out, results, table(results))
    print(path.read_text())
    return 0


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m bench.switch_interval"))
