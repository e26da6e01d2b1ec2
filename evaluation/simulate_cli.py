"""``advguard simulate``: the orchestration (I/O) around ``evaluation.simulate``."""

from __future__ import annotations

import argparse
import ipaddress
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from app.core.flagging import FlagPolicy, PolicyKind
from app.core.guard import Guard
from app.core.models import PRESETS
from app.service.main import flag_policy_for
from app.service.settings import Settings
from evaluation import simulate_report
from evaluation.data import ImageSplit, load_split
from evaluation.sets import EXPORTED_ATTACKS, export_path, load_attack_sets
from evaluation.simulate import (
    HONEST,
    PolicyOutcome,
    ScoredPool,
    all_policies,
    choose_default,
    honest_by_class,
    judge,
    live_agreement,
    load_pools,
    plan_population,
    plan_stress_population,
    pool_summary,
    run_live,
)

CHECKPOINTS = (20, 50, 100)


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def command_line(argv: list[str]) -> str:
    """The command to rerun, the admin token's value withheld."""
    words = ["advguard", "simulate"]
    hide_next = False
    for word in argv:
        words.append("<admin token>" if hide_next else word)
        hide_next = word == "--admin-token"
        if word.startswith("--admin-token="):
            words[-1] = "--admin-token=<admin token>"
    return " ".join(shlex.quote(w) if not w.startswith("<") else w for w in words)


def policy_for(bundle: Path, guard: Guard, kind: PolicyKind, per_class: bool) -> FlagPolicy:
    """The policy exactly as ``advguard serve`` builds it for this bundle (default settings but
    ``flag_per_class``)."""
    settings = Settings(bundle=bundle, flag_policy=kind, flag_per_class=per_class)
    return flag_policy_for(settings, guard)


@dataclass(frozen=True)
class ScoredTraffic:
    """Stage 1: every request a simulated client can send, scored once by the guard: the test
    split's images (honest) and each exported attack's adversarials."""

    split: ImageSplit
    pools: dict[str, ScoredPool]
    attack_names: list[str]

    @property
    def sizes(self) -> dict[str, int]:
        return {pool: len(p.scores) for pool, p in self.pools.items()}


def scored_traffic(args: argparse.Namespace, guard: Guard) -> ScoredTraffic:
    """The exported attack sets (``--sets``, or ``advguard evaluate``'s export) and the test
    split, scored."""
    sets = load_attack_sets(args.sets or export_path(args.cache_dir, guard.manifest.name))
    preset = PRESETS[guard.manifest.model.preprocessing.preset]
    split = load_split(args.source, "test", preset, args.cache_dir / "data")
    attack_names = [a for a in EXPORTED_ATTACKS if a in sets.attacks]
    print(f"scoring {len(split.labels)} test images and the sets of {attack_names}", flush=True)
    pools = load_pools(guard, split.pixels, {a: sets.attacks[a] for a in attack_names})
    return ScoredTraffic(split, pools, attack_names)


def replayed(
    args: argparse.Namespace, guard: Guard, traffic: ScoredTraffic
) -> dict[PolicyKind, PolicyOutcome]:
    """Stage 2: the same planned clients replayed under each flag policy, as the service builds
    it for this bundle."""
    policies = all_policies(lambda kind: policy_for(args.bundle, guard, kind, not args.raw_scores))
    plans = plan_population(
        traffic.sizes,
        traffic.attack_names,
        args.honest_clients,
        args.attack_clients,
        args.requests,
        args.mix_every,
        args.seed,
    ) + plan_stress_population(
        traffic.sizes,
        traffic.attack_names,
        traffic.split.labels,
        traffic.split.classes,
        args.warm_ups,
        args.attack_clients,
        args.class_clients,
        args.requests,
        args.seed + 2,
    )
    outcomes: dict[PolicyKind, PolicyOutcome] = {}
    for kind, policy in policies.items():
        t0 = time.perf_counter()
        outcomes[kind] = judge(plans, traffic.pools, policy, CHECKPOINTS)
        print(f"{kind}: replayed {len(plans)} clients in {time.perf_counter() - t0:.1f} s")
    return outcomes


def run_description(
    args: argparse.Namespace, name: str, traffic: ScoredTraffic, per_class: bool
) -> dict[str, Any]:
    """What was simulated: the population, the calibration settings (``per_class``: the policies
    read per-class p-values), the pools."""
    settings = Settings(bundle=args.bundle)
    return {
        "bundle": name,
        "command": command_line(args.argv[1:]),  # after ``simulate``
        "honest_clients": args.honest_clients,
        "attack_clients": args.attack_clients,
        "requests": args.requests,
        "mix_every": args.mix_every,
        "warm_ups": list(args.warm_ups),
        "flag_per_class": per_class,
        "class_clients": args.class_clients,
        "false_flag_rate": settings.flag_false_rate,
        "calibration_horizon": settings.flag_horizon,
        "max_false_flag_rate": args.max_false_flag_rate,
        "pools": pool_summary(traffic.pools, traffic.split.labels),
        "seed": args.seed,
    }


def write_simulation(
    out: Path,
    outcomes: dict[PolicyKind, PolicyOutcome],
    attack_names: list[str],
    default: PolicyKind | None,
    meta: dict[str, Any],
    requests: int,
) -> str:
    """results.json, table.md and time_to_flag.png; returns the table."""
    kinds = [*attack_names, *(f"mixed-{a}" for a in attack_names)]
    results = {
        **meta,
        "default_policy": default,
        "outcomes": {k: simulate_report.outcome_json(o) for k, o in outcomes.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    stress = [f"warm{w}-{a}" for w in meta["warm_ups"] for a in attack_names]
    table = simulate_report.markdown(outcomes, kinds, default, meta, stress)
    if "live" in meta:
        table += _live_markdown(meta["live"])
    (out / "table.md").write_text(table)
    simulate_report.write_figure(outcomes, kinds, requests, out / "time_to_flag.png")
    return table


def simulate(args: argparse.Namespace) -> int:
    """Loopback check -> scored traffic -> each policy replayed -> the default chosen by its
    rule -> with ``--url``, the live run -> results."""
    started = time.perf_counter()
    for url in (args.url, args.admin_url):
        if url and not is_loopback(url):
            print(f"advguard simulate: error: {url} is not a loopback address", file=sys.stderr)
            return 2
    if any(warm >= args.requests for warm in args.warm_ups):
        print(
            f"advguard simulate: error: --warm-ups must be below --requests ({args.requests}): "
            "a warmed attacker needs requests left to attack",
            file=sys.stderr,
        )
        return 2
    guard = Guard.load(args.bundle, device="cpu")
    name = guard.manifest.name
    out: Path = args.out or Path("evaluation/results") / f"simulation-{name}"
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)  # an unusable --out fails now, not after the replay
    try:
        traffic = scored_traffic(args, guard)
    except BaseException:  # refused (e.g. --sets missing): leave no empty --out behind
        if made and not any(out.iterdir()):
            out.rmdir()
        raise
    outcomes = replayed(args, guard, traffic)
    default = choose_default(
        outcomes, traffic.attack_names, args.max_false_flag_rate, args.warm_ups
    )
    per_class = all(outcome.policy.scale is not None for outcome in outcomes.values())
    meta = run_description(args, name, traffic, per_class)
    meta["honest_by_class"] = honest_by_class(
        traffic.pools[HONEST],
        traffic.split.labels,
        traffic.split.classes,
        next(iter(outcomes.values())).policy,  # every policy reads the same flag values
    )
    if args.url:
        meta["live"] = _live(args, guard, traffic.pools, traffic.sizes, traffic.attack_names)
    meta["seconds"] = time.perf_counter() - started
    table = write_simulation(out, outcomes, traffic.attack_names, default, meta, args.requests)
    print(table)
    print(f"wrote {out}/table.md, results.json and time_to_flag.png")
    return 0


def _live(
    args: argparse.Namespace,
    guard: Guard,
    pools: dict[str, Any],
    sizes: dict[str, int],
    attacks: list[str],
) -> dict[str, Any]:
    import httpx

    admin_url = args.admin_url or str(httpx.URL(args.url).copy_with(port=9000))
    with (
        httpx.Client(base_url=args.url, timeout=60.0) as http,
        httpx.Client(base_url=admin_url, timeout=60.0) as admin,
    ):
        served = http.get("/v1/bundle").json()
        kind: PolicyKind = served["flag_policy"]
        per_class = bool(served["flag_per_class"])
        plans = plan_population(
            sizes,
            attacks,
            args.live_honest_clients,
            args.live_attack_clients,
            args.live_requests,
            args.mix_every,
            args.seed + 1,
            prefix=f"live{int(time.time())}",
        )
        t0 = time.perf_counter()
        clients = run_live(
            http,
            admin,
            plans,
            pools,
            args.admin_token,
            args.concurrency,
            deadline_s=args.live_seconds,
        )
        seconds = time.perf_counter() - t0
    policy = policy_for(args.bundle, guard, kind, per_class)
    agreement = live_agreement(clients, policy, pools)
    requests = sum(len(c.requests) for c in clients)
    agreement.update(
        {
            "url": args.url,
            "policy": kind,
            "clients": len(clients),
            "requests": requests,
            "seconds": round(seconds, 1),
            "requests_per_second": round(requests / seconds, 1),
            "flagged_honest": sum(
                r["service_flagged"] for r in agreement["clients"] if r["kind"] == HONEST
            ),
            "flagged_attackers": sum(
                r["service_flagged"] for r in agreement["clients"] if r["kind"] != HONEST
            ),
            "per_client": agreement.pop("clients"),
        }
    )
    return agreement


def _live_markdown(live: dict[str, Any]) -> str:
    attackers = [r for r in live["per_client"] if r["kind"] != HONEST]
    honest = [r for r in live["per_client"] if r["kind"] == HONEST]
    same_request = sum(
        r["replay_flagged_at"] == r["service_flagged_near_request"] for r in live["per_client"]
    )
    return (
        f"\n## End to end over HTTP ({live['url']}, policy {live['policy']})\n\n"
        f"{live['clients']} clients ({len(honest)} honest, {len(attackers)} attackers), "
        f"{live['requests']} requests in {live['seconds']} s "
        f"({live['requests_per_second']} req/s). "
        f"All answered 200: {live['all_answered_200']}. The service's per-client request counts "
        f"equal those sent: {live['counts_match']}. The service flags exactly the clients the "
        f"replay of its served scores flags: {live['flags_match']} (same request for "
        f"{same_request}/{len(live['per_client'])} clients; largest served-vs-offline score gap "
        f"{live['max_score_gap']:.2g}). Flagged: {live['flagged_honest']} of {len(honest)} honest "
        f"clients, {live['flagged_attackers']} of {len(attackers)} attackers.\n"
    )
