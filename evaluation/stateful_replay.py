"""The stateful detector's experiment, its parts (``evaluation.stateful_eval`` runs them):
fingerprints of recorded queries (computed once, lazily), honest look-alike traffic on one
timeline through one account-oblivious store, the calibration of the detection rule's counts on
it and the false flags it gives, and recorded attack sequences replayed through a fresh store,
summarised as queries to detection and share detected before the first success. The closed-loop
check (``evaluation.policy_check``) and the consistency cost (``evaluation.consistency_cost``)
reuse them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.core.guard import Guard
from app.core.stateful.hashes import pixel_digests
from app.core.stateful.match_rule import Answer, DetectionRule, MatchEvidence, changes_answer
from app.core.stateful.schemes import (
    Scheme,
)
from app.core.stateful.store import InProcessFingerprintStore
from evaluation.data import load_split, source_stamp
from evaluation.honest_traffic import (
    TRAFFIC_KINDS,
    HonestQuery,
    TrafficKind,
    TrafficPlan,
    honest_clients,
    interleave,
)
from evaluation.query_oracles import DECISIONS, service_answers
from evaluation.query_runs import AttackRecord
from evaluation.sets import cache_key
from evaluation.simulate import wilson_interval

EVALUATION_SECRET = b"advguard-evaluation-secret"  # the service takes its own from settings


def fingerprint_all(
    scheme: Scheme, images: np.ndarray, guard: Guard, batch: int = 512
) -> np.ndarray:
    """Fingerprints of (n, 3, H, W) uint8 images; embeddings run the guard's forward pass."""
    rows = []
    for start in range(0, len(images), batch):
        part = images[start : start + batch]
        features = None
        if scheme.kind == "embedding":
            pixels = torch.from_numpy(part.astype(np.float32) / 255.0)
            features = guard.infer(pixels).features
        rows.append(scheme.fingerprints(part, features))
    return np.concatenate(rows) if rows else np.zeros((0, 1))


class LazyFingerprints:
    """An attack sequence's fingerprints, computed a chunk at a time as a replay reaches them
    (replays mostly stop after a few queries) and kept for the family's other thresholds."""

    def __init__(self, scheme: Scheme, images: np.ndarray, guard: Guard, chunk: int = 64) -> None:
        self.scheme = scheme
        self.images = images
        self.guard = guard
        self.chunk = chunk
        self._parts: list[np.ndarray] = []
        self._done = 0

    def __getitem__(self, i: int) -> np.ndarray:
        while self._done <= i:
            part = self.images[self._done : self._done + self.chunk]
            self._parts.append(fingerprint_all(self.scheme, part, self.guard))
            self._done += len(part)
        row: np.ndarray = self._parts[i // self.chunk][i % self.chunk]
        return row


class LazyAnswers:
    """A recorded attack sequence's answers as the service keeps them (``service_answers``),
    computed a chunk at a time as a replay reaches them. Each is checked against what the
    recording saw (decision, and class where the client was shown one): a replay judged on
    other answers than the attack got would not describe that attack."""

    def __init__(self, record: AttackRecord, guard: Guard, guarded: bool, chunk: int = 64) -> None:
        self.record = record
        self.guard = guard
        self.guarded = guarded
        self.chunk = chunk
        self._answers: list[Answer] = []

    def __getitem__(self, i: int) -> Answer:
        while len(self._answers) <= i:
            start = len(self._answers)
            part = self.record.queries[start : start + self.chunk]
            for j, answer in enumerate(service_answers(self.guard, part, self.guarded)):
                seen = DECISIONS[int(self.record.decisions[start + j])]
                shown = int(self.record.classes[start + j])
                if seen != answer.decision or (shown >= 0 and shown != answer.class_index):
                    raise ValueError(
                        f"{self.record.attack} row {self.record.row} query {start + j}: recorded "
                        f"{seen} {shown}, the guard now answers {answer.decision} "
                        f"{answer.class_index} (the records are another bundle's: rerun "
                        "evaluation.query_attacks)"
                    )
                self._answers.append(answer)
        return self._answers[i]


@dataclass(frozen=True)
class Timeline:
    """Honest queries in arrival order: who sent each, of which kind, the pixels, and which are
    copies of a viral photo (None: none are)."""

    clients: list[str]
    kinds: list[TrafficKind]
    images: np.ndarray  # (n, 3, H, W) uint8
    digests: list[bytes]
    circulating: list[bool] | None = None

    def is_circulating(self, i: int) -> bool:
        return self.circulating is not None and self.circulating[i]


def timeline(queries: Sequence[HonestQuery]) -> Timeline:
    images = np.stack([q.image for q in queries])
    return Timeline(
        [q.client for q in queries],
        [q.kind for q in queries],
        images,
        pixel_digests(images),
        [q.circulating for q in queries],
    )


def honest_key(guard: Guard, source: Path, split: str, plan: TrafficPlan, seed: int) -> str:
    preset = guard.preset
    return cache_key(
        {
            "source": source_stamp(source),
            "split": split,
            "preset": [preset.name, preset.resize, preset.crop],
            "plan": dataclasses.asdict(plan),
            "seed": seed,
            "format": 2,  # 2: which queries are a viral photo's copies is stored
        }
    )


def honest_timeline(
    guard: Guard,
    source: Path,
    split: str,
    cache: Path,
    data_cache: Path,
    plan: TrafficPlan,
    seed: int,
) -> Timeline:
    """One split's honest traffic, built once and cached (JPEG round trips take a minute),
    keyed by everything it is built from but the generator's code: the source, the split, the
    bundle's preprocessing, the whole plan and the seed."""
    path = cache / f"honest-{split}-{honest_key(guard, source, split, plan, seed)}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            images = data["images"]
            return Timeline(
                [str(c) for c in data["clients"]],
                [str(k) for k in data["kinds"]],  # type: ignore[misc]
                images,
                pixel_digests(images),
                [bool(c) for c in data["circulating"]],
            )
    pixels = load_split(source, split, guard.preset, data_cache).pixels
    clients = honest_clients(pixels, plan, guard.preset, seed, split)
    everyone = [client for kind in TRAFFIC_KINDS for client in clients[kind]]
    result = timeline(list(interleave(everyone, seed)))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        clients=np.array(result.clients),
        kinds=np.array(result.kinds),
        images=result.images,
        circulating=np.array(result.circulating, dtype=bool),
    )
    return result


@dataclass(frozen=True)
class HonestCounts:
    """Per honest client: its kind and the highest counts any of its queries reached."""

    kind: dict[str, TrafficKind]
    client_max: dict[str, int]
    global_max: dict[str, int]
    # the most distinct near-duplicates (either scope) a query of the client had when its answer
    # changed its anchor's class (``changes_answer``); 0: never
    changed_max: dict[str, int]


def replay_honest(
    scheme: Scheme, traffic: Timeline, fingerprints: np.ndarray, answers: Sequence[Answer]
) -> HonestCounts:
    """Every honest query through one store holding all of them (nothing expires: the worst
    case), one second apart, each stored with the answer the service gives it."""
    size = len(traffic.clients) + 1
    store = InProcessFingerprintStore(
        scheme, max_fingerprints=size, ttl_s=np.inf, max_clients=size, client_ttl_s=np.inf
    )
    kind: dict[str, TrafficKind] = {}
    client_max: dict[str, int] = {}
    global_max: dict[str, int] = {}
    changed_max: dict[str, int] = {}
    for i, client in enumerate(traffic.clients):
        evidence = store.check_and_store(
            client, fingerprints[i], traffic.digests[i], float(i), answers[i]
        )[0]
        kind[client] = traffic.kinds[i]
        client_max[client] = max(client_max.get(client, 0), evidence.client.distinct)
        global_max[client] = max(global_max.get(client, 0), evidence.everyone.distinct)
        changed = 0
        if changes_answer(evidence, answers[i]):
            changed = max(evidence.client.distinct, evidence.everyone.distinct)
        changed_max[client] = max(changed_max.get(client, 0), changed)
    return HonestCounts(kind, client_max, global_max, changed_max)


# Half of the false-flag targets (at most 0.1% of plain clients and 1% on near-duplicate
# traffic; no sender of a viral photo), so that a rule within them on the calibration traffic
# keeps the targets on traffic it was not calibrated on. Fixed before any attack was replayed
# through a rule calibrated to it.
CALIBRATION_BUDGET: dict[TrafficKind, float] = {
    "plain": 0.0005,
    "resend": 0.005,
    "burst": 0.005,
    "viral": 0.0,
}


def within_budget(
    counts: HonestCounts, rule: DetectionRule, budget: dict[TrafficKind, float]
) -> bool:
    """Whether ``rule`` flags at most ``budget`` of each kind's calibration clients (rounded
    down: with 1,000 clients a budget of 0.05% allows none, 0.5% allows five)."""
    flags = false_flags(counts, rule)
    return all(
        flags[kind]["flagged"] <= int(budget[kind] * flags[kind]["clients"] + 1e-9)  # 4.999.. is 5
        for kind in TRAFFIC_KINDS
    )


def calibrate(
    counts: HonestCounts,
    changed: bool = True,
    budget: dict[TrafficKind, float] = CALIBRATION_BUDGET,
) -> DetectionRule:
    """The near-duplicate counts one above the highest any honest calibration client reached
    (they flag none); the changed-answer count the lowest whose calibration flags stay within
    ``budget`` per kind. The changed-answer count is the one lowered because it judges the
    query about to be answered: a score-based attack's successful query is by definition one
    whose class changes, often within its first few queries, while an honest edit of a photo
    rarely changes its class. ``changed``: with that count
    (``DetectionRule.changed_matches``), else the near-duplicate counts alone."""
    counts_alone = DetectionRule(
        client_matches=max(counts.client_max.values(), default=0) + 1,
        global_matches=max(counts.global_max.values(), default=0) + 1,
    )
    if not changed:
        return counts_alone
    none_flagged = max(counts.changed_max.values(), default=0) + 1
    for threshold in range(1, none_flagged):
        rule = dataclasses.replace(counts_alone, changed_matches=threshold)
        if within_budget(counts, rule, budget):
            return rule
    return dataclasses.replace(counts_alone, changed_matches=none_flagged)


def flagged(counts: HonestCounts, rule: DetectionRule, client: str) -> bool:
    """Whether ``rule`` flags ``client`` at any of its queries in the replay ``counts`` holds."""
    return (
        counts.client_max[client] >= rule.client_matches
        or counts.global_max[client] >= rule.global_matches
        or (rule.changed_matches is not None and counts.changed_max[client] >= rule.changed_matches)
    )


def false_flags(counts: HonestCounts, rule: DetectionRule) -> dict[str, Any]:
    """Share of honest clients flagged, per kind, with Wilson 95% intervals."""
    out: dict[str, Any] = {}
    for kind in TRAFFIC_KINDS:
        clients = [c for c, k in counts.kind.items() if k == kind]
        n_flagged = sum(flagged(counts, rule, c) for c in clients)
        low, high = wilson_interval(n_flagged, len(clients))
        out[kind] = {
            "clients": len(clients),
            "flagged": n_flagged,
            "rate": n_flagged / len(clients) if clients else None,
            "wilson95": [low, high],
            "max_client_matches": max((counts.client_max[c] for c in clients), default=0),
            "max_global_matches": max((counts.global_max[c] for c in clients), default=0),
        }
    return out


@dataclass(frozen=True)
class SequenceOutcome:
    first_match: int | None  # queries until one matched an earlier query of the sequence
    detection: int | None  # queries until the rule detected it
    success: int | None  # queries to the attack's first success


def replay_attack(
    scheme: Scheme,
    rule: DetectionRule,
    record: AttackRecord,
    fingerprints: LazyFingerprints,
    answers: LazyAnswers,
    ids: int,
    horizon: int,
) -> SequenceOutcome:
    """One recorded sequence through a fresh store, its queries sent round-robin by ``ids``
    client ids (1: a single client), one second apart, each stored with the answer the service
    gives it; stops at detection."""
    store = InProcessFingerprintStore(
        scheme, max_fingerprints=horizon + 1, ttl_s=np.inf, client_ttl_s=np.inf
    )
    digests = pixel_digests(record.queries[:horizon])
    first_match: int | None = None
    for i in range(min(horizon, len(record.queries))):
        client = f"attacker-{i % ids}"
        evidence: MatchEvidence = store.check_and_store(
            client, fingerprints[i], digests[i], float(i), answers[i]
        )[0]
        if first_match is None and evidence.everyone.distinct >= 1:
            first_match = i + 1
        if rule.detects(evidence, answers[i]):
            return SequenceOutcome(first_match, i + 1, record.queries_to_success)
    return SequenceOutcome(first_match, None, record.queries_to_success)


def succeeds_despite(outcome: SequenceOutcome) -> bool:
    """Whether the attack still succeeds when every query from its detection on is refused
    (``refuse``): its first success came strictly before the detecting query, or it was never
    detected. The replay cannot show what the library would have sent after an answer it did
    not get, so this is what the recording predicts, not a bound: a live attack denied an answer
    walks elsewhere, and some of its later probes may match too few stored queries to be
    detected (HopSkipJump under ``refuse``: 2 of 50 succeeded in closed loop, none predicted).
    Under ``silent`` the anchor's answer is the true one whenever the anchor was answered the
    same, so a decision-based attack started from another class's photo keeps hearing
    "adversarial", truthfully, on that side of the boundary. ``evaluation.policy_check``
    measures both policies in closed loop."""
    if outcome.success is None:
        return False
    return outcome.detection is None or outcome.success < outcome.detection


def _median(values: Sequence[int]) -> float | None:
    return float(np.median(values)) if values else None


def caught_before_success(outcome: SequenceOutcome, strictly: bool = False) -> bool:
    """Whether the run was detected before its first successful answer was served: at a query
    before the successful one, or at that query itself (``strictly``: not then), since a query
    is screened before it is answered and ``refuse`` / ``silent`` withhold the answer of the
    query they detect. A never-successful run counts as caught when it is detected at all."""
    if outcome.detection is None:
        return False
    if outcome.success is None:
        return True
    return outcome.detection < outcome.success or (
        not strictly and outcome.detection == outcome.success
    )


def summarise_outcomes(outcomes: Sequence[SequenceOutcome]) -> dict[str, Any]:
    """Shares caught before the first success (``caught_before_success``), over every run and
    over the successful ones, and strictly before the successful query."""
    before = [caught_before_success(o) for o in outcomes]
    strictly = [caught_before_success(o, strictly=True) for o in outcomes]
    successful = [o for o in outcomes if o.success is not None]
    before_successful = [caught_before_success(o) for o in successful]
    detections = [o.detection for o in outcomes if o.detection is not None]
    matches = [o.first_match for o in outcomes if o.first_match is not None]
    return {
        "runs": len(outcomes),
        "succeeded_despite_detection": float(np.mean([succeeds_despite(o) for o in outcomes]))
        if outcomes
        else None,
        "detected": len(detections),
        "detected_before_success": float(np.mean(before)) if outcomes else None,
        "detected_strictly_before_success": float(np.mean(strictly)) if outcomes else None,
        "detected_before_success_of_successful": (
            float(np.mean(before_successful)) if successful else None
        ),
        "successful_runs": len(successful),
        "median_queries_to_detection": _median(detections),
        "p90_queries_to_detection": (float(np.percentile(detections, 90)) if detections else None),
        "median_queries_to_first_match": _median(matches),
        "median_queries_to_success": _median([o.success for o in successful if o.success]),
    }
