"""The stateful detector on recorded query attacks and on honest look-alike traffic (issue 13).

Three fingerprints (``app.core.stateful``: window hashes, a perceptual hash, an embedding of the
guard's forward pass), each at a few match thresholds, are put through the same experiment:

1. *Calibrate* on honest traffic built from CIFAR-10 **training** photos
   (``evaluation.honest_traffic``: plain, resends, near-duplicate bursts, a viral photo), all
   clients on one timeline in one account-oblivious store, each query stored with the answer
   the service gives it (``service_answers``): the near-duplicate counts of the
   ``DetectionRule`` (client, global) are set one above the highest count any honest client
   reached, so they flag no calibration client; the changed-answer count is the lowest that
   keeps the calibration clients flagged within half the issue's false-flag targets
   (``CALIBRATION_BUDGET``; until the stop of 2026-11-29 it too was set to flag none).
2. *Replay* every recorded attack sequence (``evaluation.query_attacks``; test images) through a
   fresh store, as one client and spread round-robin over ``--sybil-ids`` client ids: queries
   until the first match (a query near-duplicating an earlier one of its sequence), queries to
   detection, share detected before the attack's first success.
3. *Judge* the calibrated rule on fresh honest traffic from **test** photos: the share of honest
   clients flagged per traffic kind, with Wilson 95% intervals.

The fingerprint is chosen by a rule fixed before measuring: among the kinds the service runs
(``SERVED_KINDS``: window hashes), the highest mean (over attack x setting, single client) share
detected before first success; ties by the lower mean median queries to detection. Replays
stop at detection or after ``--horizon`` queries; a sequence not detected within the horizon
counts as undetected (conservative).

The changed-answer count (``app.core.stateful.match_rule.changes_answer``) was added, with its
calibration above, before any attack was replayed through it, against the records of the default
bundle then (v2, selection round 3). Why: with the counts alone, about a quarter of Square runs
succeeded in queries 2-5, before any count could reach its threshold, and the query that
succeeds is by definition the one whose class changes. With it, "detected before first
success" also counts a run detected *at* its successful query (screened before it is answered;
``caught_before_success``), and the share strictly before is reported beside it. The chosen
fingerprint is also replayed under the counts alone (``chosen_counts_only``), as the ablation.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.cli import at_least
from app.core.guard import Guard
from app.core.stateful.hashes import pixel_digests
from app.core.stateful.match_rule import Answer
from app.core.stateful.schemes import (
    EmbeddingScheme,
    PerceptualHashScheme,
    Scheme,
    WindowHashScheme,
)
from app.core.stateful.store import InProcessFingerprintStore
from evaluation.data import add_data_cache_argument
from evaluation.honest_traffic import (
    TrafficPlan,
)
from evaluation.query_attacks import DEFAULT_BUNDLE, DEFAULT_CACHE, DEFAULT_RESULTS, DEFAULT_SOURCE
from evaluation.query_oracles import service_answers
from evaluation.query_runs import ATTACKS, SETTINGS, AttackRecord, load_records, records_path
from evaluation.stateful_replay import (
    CALIBRATION_BUDGET,
    EVALUATION_SECRET,
    LazyAnswers,
    LazyFingerprints,
    Timeline,
    calibrate,
    false_flags,
    fingerprint_all,
    honest_timeline,
    replay_attack,
    replay_honest,
    summarise_outcomes,
)
from evaluation.stateful_report import (
    report,
)

EMBEDDING_LAYER = "layer1.2"


@dataclass(frozen=True)
class Candidate:
    """A fingerprint at one match threshold; candidates of one ``family`` share fingerprints."""

    family: str
    scheme: Scheme


def candidate_schemes() -> dict[str, Candidate]:
    """The fingerprints compared, each at a few match thresholds (names say which)."""
    schemes: dict[str, Candidate] = {}
    for step, shared_bits in ((25, (20, 25, 30, 35)), (50, (30, 35, 40))):
        for shared in shared_bits:
            schemes[f"window_hash step={step} shared>={shared}"] = Candidate(
                f"window_hash step={step}",
                WindowHashScheme(EVALUATION_SECRET, step=step, threshold=float(shared)),
            )
    schemes["phash hamming<=8"] = Candidate("phash", PerceptualHashScheme(threshold=56.0))
    for cosine in (0.999, 0.9999):
        schemes[f"embedding {EMBEDDING_LAYER} cosine>={cosine}"] = Candidate(
            "embedding", EmbeddingScheme(EMBEDDING_LAYER, threshold=cosine)
        )
    return schemes


# --------------------------------------------------------------------------- cost


def measure_cost(scheme: Scheme, images: np.ndarray, guard: Guard) -> dict[str, float]:
    """Fingerprint time per query (one at a time, as the service would), store time per
    check-and-add with the ring full, and the store's Python heap per stored fingerprint."""
    import tracemalloc

    n = len(images)
    started = time.perf_counter()
    prints = np.concatenate([fingerprint_all(scheme, images[i : i + 1], guard) for i in range(n)])
    fingerprint_s = (time.perf_counter() - started) / n
    digests = pixel_digests(images)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    store = InProcessFingerprintStore(scheme, max_fingerprints=n, max_clients=n)
    started = time.perf_counter()
    for i in range(n):
        store.check_and_store(f"client-{i % 1000}", prints[i], digests[i], float(i))
    store_s = (time.perf_counter() - started) / n
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {
        "queries": n,
        "fingerprint_ms": 1000 * fingerprint_s,
        "check_and_add_ms": 1000 * store_s,
        "bytes_per_fingerprint": (after - before) / n,
    }


# --------------------------------------------------------------------------- the run


def load_attack_records(cache: Path) -> dict[str, list[AttackRecord]]:
    found = {}
    for attack in ATTACKS:
        for setting in SETTINGS:
            path = records_path(cache, attack, setting)
            if path.is_file():
                found[f"{attack}/{setting}"] = load_records(path)
    return found


@dataclass
class FamilyPrints:
    """Fingerprints of one family, shared by its thresholds."""

    calibration: np.ndarray
    judging: np.ndarray
    attacks: dict[str, list[LazyFingerprints]]


def family_prints(
    scheme: Scheme,
    guard: Guard,
    calibration: Timeline,
    judging: Timeline,
    attacks: dict[str, list[AttackRecord]],
    horizon: int,
) -> FamilyPrints:
    return FamilyPrints(
        fingerprint_all(scheme, calibration.images, guard),
        fingerprint_all(scheme, judging.images, guard),
        {
            key: [LazyFingerprints(scheme, r.queries[:horizon], guard) for r in records]
            for key, records in attacks.items()
        },
    )


@dataclass(frozen=True)
class ServedAnswers:
    """The answers the service gives every replayed query (``service_answers``): they do not
    depend on the fingerprint, so every candidate shares them."""

    calibration: list[Answer]
    judging: list[Answer]
    attacks: dict[str, list[LazyAnswers]]


def served_answers(
    guard: Guard,
    calibration: Timeline,
    judging: Timeline,
    attacks: dict[str, list[AttackRecord]],
    batch: int = 512,
) -> ServedAnswers:
    def all_of(images: np.ndarray) -> list[Answer]:
        return [
            answer
            for start in range(0, len(images), batch)
            for answer in service_answers(guard, images[start : start + batch])
        ]

    return ServedAnswers(
        all_of(calibration.images),
        all_of(judging.images),
        {
            key: [LazyAnswers(r, guard, guarded=key.endswith("/guard_on")) for r in records]
            for key, records in attacks.items()
        },
    )


def evaluate_scheme(
    name: str,
    scheme: Scheme,
    prints: FamilyPrints,
    answers: ServedAnswers,
    calibration: Timeline,
    judging: Timeline,
    attacks: dict[str, list[AttackRecord]],
    horizon: int,
    sybil_ids: int,
    log: Callable[[str], None],
    changed: bool = True,
) -> dict[str, Any]:
    """Calibrate ``scheme``'s rule (``changed``: with the changed-answer count), judge it on
    fresh honest traffic and replay every attack through it."""
    started = time.perf_counter()
    counts = replay_honest(scheme, calibration, prints.calibration, answers.calibration)
    rule = calibrate(counts, changed)
    log(f"{name}: calibrated {rule}")
    judged = replay_honest(scheme, judging, prints.judging, answers.judging)
    result: dict[str, Any] = {
        "rule": {
            "client_matches": rule.client_matches,
            "global_matches": rule.global_matches,
            "changed_matches": rule.changed_matches,
        },
        "calibration_false_flags": false_flags(counts, rule),
        "false_flags": false_flags(judged, rule),
        "attacks": {},
        "sybil": {},
        "outcomes": {},  # per run: [first match, detection, success] (queries; null: none)
    }
    for key, records in attacks.items():
        single, spread = [], []
        for record, lazy, served in zip(
            records, prints.attacks[key], answers.attacks[key], strict=True
        ):
            single.append(replay_attack(scheme, rule, record, lazy, served, 1, horizon))
            spread.append(replay_attack(scheme, rule, record, lazy, served, sybil_ids, horizon))
        result["attacks"][key] = summarise_outcomes(single)
        result["sybil"][key] = summarise_outcomes(spread)
        result["outcomes"][key] = {
            "single": [[o.first_match, o.detection, o.success] for o in single],
            "sybil": [[o.first_match, o.detection, o.success] for o in spread],
        }
        log(f"{name} {key}: {json.dumps(result['attacks'][key])}")
    result["seconds"] = time.perf_counter() - started
    return result


# the fingerprint the service's stores run (app/service/stateful.py, fingerprints.py: window
# hashes and their bucket index); the others are measured for comparison only
SERVED_KINDS = frozenset({"window_hash"})


def choose(results: dict[str, dict[str, Any]], kinds: dict[str, str]) -> str:
    """The rule fixed in advance: among the candidates of a kind the service runs
    (``SERVED_KINDS``; ``kinds``: each candidate's), the highest mean share detected before
    first success (single client), then the lowest mean median queries to detection. The
    restriction to served kinds was added with the changed-answer count, before its replays,
    so that the published table always describes what the service runs."""

    def key(name: str) -> tuple[float, float]:
        attacks = results[name]["attacks"].values()
        share = float(np.mean([a["detected_before_success"] for a in attacks]))
        medians = [a["median_queries_to_detection"] for a in attacks]
        median = float(np.mean([m if m is not None else 1e9 for m in medians]))
        return (-share, median)

    return min((name for name in results if kinds[name] in SERVED_KINDS), key=key)


def add_honest_traffic_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say which honest traffic is built (``honest_timeline``: the bundle
    that answers it, the source, the caches, clients per kind, the seed) and where results go:
    every command that replays it takes the same, so that they replay the same traffic."""
    parser.add_argument(
        "--bundle",
        type=Path,
        default=DEFAULT_BUNDLE,
        help="bundle that answers the traffic (default: %(default)s)",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=DEFAULT_SOURCE,
        help="CIFAR-10 ImageFolder directory or tar with train/ and test/ splits "
        "(default: %(default)s)",
    )
    add_data_cache_argument(parser)
    parser.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help="the query attacks' cache, where the honest traffic is kept too "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_RESULTS, help="results directory (default: %(default)s)"
    )
    parser.add_argument("--clients", type=at_least(1), default=1000, help="honest clients per kind")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the honest traffic's draws (judging: seed + 1) (default: %(default)s)",
    )
    parser.add_argument(
        "--threads", type=at_least(1), default=1, help="torch CPU threads (default: %(default)s)"
    )


def honest_timelines(guard: Guard, args: argparse.Namespace) -> dict[str, Timeline]:
    """The honest traffic ``add_honest_traffic_arguments``' options name, both splits:
    ``calibration`` (the train photos, ``--seed``) and ``judging`` (the test photos,
    ``--seed`` + 1), built once and cached by ``honest_timeline``."""
    plan = TrafficPlan(clients=args.clients)
    return {
        name: honest_timeline(guard, args.source, split, args.cache, args.data_cache, plan, seed)
        for name, split, seed in (
            ("calibration", "train", args.seed),
            ("judging", "test", args.seed + 1),
        )
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.stateful_eval",
        description="fingerprints and the stateful rule on recorded attacks and honest traffic",
    )
    add_honest_traffic_arguments(parser)
    parser.add_argument(
        "--horizon", type=at_least(1), default=500, help="queries replayed per attack"
    )
    parser.add_argument(
        "--sybil-ids",
        type=at_least(1),
        default=50,
        help="client ids an attack is spread over, round-robin (default: %(default)s)",
    )
    parser.add_argument("--schemes", nargs="*", help="only these candidates (names)")
    return parser


@dataclass(frozen=True)
class ReplayInputs:
    """Stage 1: what every candidate is replayed on: honest traffic from training photos
    (calibration) and from test photos (judging), the recorded attacks, and the answers the
    service gives all of them."""

    guard: Guard
    plan: TrafficPlan
    calibration: Timeline
    judging: Timeline
    attacks: dict[str, list[AttackRecord]]
    answers: ServedAnswers


def replay_inputs(args: argparse.Namespace, log: Callable[[str], None]) -> ReplayInputs:
    guard = Guard.load(args.bundle, device="cpu")
    plan = TrafficPlan(clients=args.clients)
    timelines = honest_timelines(guard, args)
    calibration, judging = timelines["calibration"], timelines["judging"]
    log(f"honest traffic: {len(calibration.clients)} + {len(judging.clients)} queries")
    attacks = load_attack_records(args.cache)
    answers = served_answers(guard, calibration, judging, attacks)
    log("answers of the honest traffic")
    return ReplayInputs(guard, plan, calibration, judging, attacks, answers)


class _FamilyPrintsCache:
    """One family's fingerprints in memory at a time (they are large), made when first asked."""

    def __init__(self, inputs: ReplayInputs, horizon: int) -> None:
        self.inputs = inputs
        self.horizon = horizon
        self._family: str | None = None
        self._prints: FamilyPrints | None = None

    def of(self, candidate: Candidate) -> FamilyPrints:
        if self._prints is None or self._family != candidate.family:
            self._prints = None  # drop the previous family before making the next
            i = self.inputs
            self._prints = family_prints(
                candidate.scheme, i.guard, i.calibration, i.judging, i.attacks, self.horizon
            )
            self._family = candidate.family
        return self._prints


def replay_candidate(
    name: str,
    candidate: Candidate,
    prints: _FamilyPrintsCache,
    args: argparse.Namespace,
    log: Callable[[str], None],
    changed: bool = True,
) -> dict[str, Any]:
    """``evaluate_scheme`` of one candidate on the stage-1 inputs."""
    i = prints.inputs
    return evaluate_scheme(
        name,
        candidate.scheme,
        prints.of(candidate),
        i.answers,
        i.calibration,
        i.judging,
        i.attacks,
        args.horizon,
        args.sybil_ids,
        log,
        changed=changed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Stages: replay inputs -> every candidate replayed -> the choice (``choose``) -> the
    chosen one without the changed-answer count (the ablation) -> its cost -> the report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    inputs = replay_inputs(args, log)
    schemes = candidate_schemes()
    if args.schemes:
        schemes = {name: schemes[name] for name in args.schemes}
    prints = _FamilyPrintsCache(inputs, args.horizon)
    results = {
        name: replay_candidate(name, candidate, prints, args, log)
        for name, candidate in schemes.items()
    }
    chosen = choose(results, {name: c.scheme.kind for name, c in schemes.items()})
    for name, result in results.items():  # per-run replays only for the chosen one (size)
        if name != chosen:
            result.pop("outcomes")
    counts_only = replay_candidate(chosen, schemes[chosen], prints, args, log, changed=False)
    counts_only.pop("outcomes")
    cost = measure_cost(schemes[chosen].scheme, inputs.judging.images[:20_000], inputs.guard)
    log(f"cost of {chosen}: {cost}")
    summary = {
        "bundle": str(args.bundle),
        "honest_plan": inputs.plan.__dict__,
        "horizon": args.horizon,
        "sybil_ids": args.sybil_ids,
        "chosen": chosen,
        "chosen_counts_only": counts_only,
        "calibration_budget": CALIBRATION_BUDGET,
        "cost": cost,
        "schemes": results,
        "command": " ".join(["python -m evaluation.stateful_eval", *map(shlex.quote, argv)]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stateful.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "stateful.md").write_text(report(summary))
    log(f"chosen: {summary['chosen']}")
    return 0


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m evaluation.stateful_eval"))
