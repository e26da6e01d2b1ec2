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

``--in-process`` runs the same closed loop without HTTP: each query goes through the service's
own ``StatefulDetector`` (its rule, its policy, an in-process store with the evaluation's
secret, fresh per image) and comes back as ``POST /classify`` would show it (``ScreenedOracle``).
The Redis store gives the same evidence query by query (tests/service/test_fingerprints.py), so
the HTTP runs on the first images check that it stands in; it is fast enough for every image,
and ``--sybil-ids`` spreads each attack's queries round-robin over that many client ids.

In process the check also sees what the screening made of each query (``Screened.outcomes``);
over HTTP under ``refuse`` it sees the detections too, as the client does (a flagged query is
answered 403 ``query_refused``; under ``silent`` nothing shows, by design). So it reports the
issue's detection figures in closed loop: a run is *detected before its
first success* when the detector flags one of its queries (outcome ``detected``) at or before
the served answer the attack stopped on as its success (in budget, accepted with a wrong
class), or flags it at all when no such answer comes; queries to detection count up to and
including the first flagged one. An answer withheld without a flag (``consistent``: the
anchor's answer) is not a detection.

``--compare HTTP_KEY IN_PROCESS_KEY`` runs nothing: it sets two recorded checks of the same
images side by side, image by image (success, queries sent, answers withheld, how the run ended,
the first detection), and records how many agree: the evidence that the in-process loop stands
in for the service over HTTP with Redis.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import redis
import torch

from app.cli import at_least
from app.core.guard import Guard
from app.core.manifest import MANIFEST_NAME
from app.core.stateful.blends import BlendRule, InProcessBlendMemory
from app.core.stateful.defaults import DEFAULT_RULE, default_scheme
from app.core.stateful.match_rule import DETECTION_REASONS, DetectionReason, DetectionRule
from app.core.stateful.store import InProcessFingerprintStore
from app.service.metrics import Outcome
from app.service.settings import StatefulPolicy
from app.service.stateful import Pending, StatefulDetector
from evaluation.data import ImageSplit, add_data_cache_argument, load_split
from evaluation.query_attacks import (
    DEFAULT_BUNDLE,
    DEFAULT_CAPS,
    DEFAULT_RESULTS,
    DEFAULT_SOURCE,
    candidate_pool,
    pick_images,
)
from evaluation.query_oracles import (
    DECISIONS,
    Answer,
    GuardOracle,
    HttpOracle,
    Oracle,
    answers_of_pixels,
    client_view,
    service_pixels,
)
from evaluation.query_runs import ATTACKS, AttackName, AttackRecord, run_attack
from evaluation.simulate_cli import is_loopback
from evaluation.stateful_replay import EVALUATION_SECRET, SequenceOutcome, succeeds_despite


class ScreenedOracle:
    """``POST /classify`` in process, stateful detection included: each query's answer from the
    guard (``answers_of_pixels``), then screened by the service's ``StatefulDetector`` (a fresh
    in-process store) as the service screens it, and shown as the client sees it (a 403 under
    ``refuse``: ``refused``). Queries are sent by ``client_ids`` in turn (one: a single client;
    several: a Sybil attacker)."""

    def __init__(
        self,
        guard: Guard,
        policy: StatefulPolicy,
        client_ids: Sequence[str],
        rule: DetectionRule = DEFAULT_RULE,
        blends: bool = False,
    ) -> None:
        if not client_ids:
            raise ValueError("at least one client id")
        scheme = default_scheme(EVALUATION_SECRET)
        store = InProcessFingerprintStore(scheme)
        memory = InProcessBlendMemory(BlendRule()) if blends else None
        self.detector = StatefulDetector(scheme, rule, store, policy, blends=memory)
        self.guard = guard
        self.client_ids = list(client_ids)
        self.sent = 0
        self.outcomes: list[Outcome] = []  # what the screening made of each query, in order
        self.reasons: list[DetectionReason | None] = []  # the part of the rule that flagged it
        # the guard's own answer to each query as a client reads it, before the screening: the
        # very answers screened, so a check need not ask the guard again (``own_answers``)
        self.own: list[Answer] = []

    @property
    def rejected(self) -> list[bool]:
        """Per query, whether the guard's own decision was a rejection."""
        return [answer.decision == "rejected" for answer in self.own]

    @property
    def num_classes(self) -> int:
        return len(self.guard.class_names)

    def ask(self, images: np.ndarray) -> list[Answer]:
        if len(images) == 0:
            return []
        pixels = service_pixels(self.guard, images)
        answers = answers_of_pixels(self.guard, pixels)
        batch = []
        for query, answer in zip(pixels, answers, strict=True):
            client = self.client_ids[self.sent % len(self.client_ids)]
            batch.append(Pending(client, query, answer))
            self.sent += 1
        # a batch is screened in arrival order, as one query at a time would be
        screened = self.detector.screen(batch)
        self.outcomes += screened.outcomes
        self.reasons += screened.reasons
        self.own += [client_view(answer) for answer in answers]
        return [Answer("refused") if a is None else client_view(a) for a in screened.served]

    def close(self) -> None:
        self.detector.close()


class ClosableOracle(Oracle, Protocol):
    def close(self) -> None: ...


@dataclass(frozen=True)
class ImageCheck:
    row: int
    # by the replay: the first success came before the detection (None: an image the recorded
    # runs do not cover, ``--first-image``)
    predicted_success: bool | None
    live_success: bool  # the attacker got an adversarial example: ``truly_adversarial``
    live_queries: int
    answers_withheld: int  # answers that differ from the guard's own (403, or the anchor's)
    believed_success: bool  # the attack stopped on a served answer that said "adversarial"
    stopped: str = "finished"  # the run's end: success, cap, finished or stalled
    screened: bool = False  # its detections were seen (in process; over HTTP under refuse)
    first_detection: int | None = None  # query number (from 1) of the first flagged query
    first_served_success: int | None = None  # ... of the in-budget success the run stopped on
    # in process: the part of the rule that flagged the first flagged query, and how many of
    # the queries before it the guard itself rejected (such a query never takes the changed
    # answer's path: it shows no class); None where the check cannot see them (over HTTP, or
    # recorded before 2026-12-06)
    first_detection_by: DetectionReason | None = None
    rejected_before_detection: int | None = None

    @property
    def detected_before_success(self) -> bool:
        """Flagged at or before the first served success (screened before it is answered), or
        flagged at all when no served answer was a success."""
        return self.first_detection is not None and (
            self.first_served_success is None or self.first_detection <= self.first_served_success
        )


def replay_predictions(stateful: dict[str, Any], attack: str, sybil: bool = False) -> list[bool]:
    """Per recorded run of ``attack`` against the guard (one client id, or the replay's Sybil
    spread), in image order: whether it survives ``refuse``/``silent`` according to the replay."""
    outcomes = stateful["schemes"][stateful["chosen"]]["outcomes"][f"{attack}/guard_on"]
    return [
        succeeds_despite(SequenceOutcome(*run)) for run in outcomes["sybil" if sybil else "single"]
    ]


def own_answers(oracle: ClosableOracle, record: AttackRecord, guard: Guard) -> list[Answer]:
    """The guard's own answer to each query of a run, as a client reads it: in process the
    answers the screening was given (``ScreenedOracle.own``); over HTTP, where only the served
    answers show, the guard asked again in process. Until 2026-12-06 every check asked again:
    a second forward pass over every query, as long as the attack's own under ``silent``,
    whose runs spend their whole budget."""
    if isinstance(oracle, ScreenedOracle):
        if len(oracle.own) != len(record.queries):
            raise RuntimeError(
                f"{len(oracle.own)} queries answered, {len(record.queries)} recorded"
            )
        return oracle.own
    return GuardOracle(guard).ask(record.queries)


def withheld(record: AttackRecord, own: Sequence[Answer]) -> int:
    """How many served answers differ from the guard's own to the same upload (``own_answers``):
    the policy's doing (a 403 under ``refuse``, the anchor's answer under ``silent``)."""
    return sum(
        (DECISIONS.index(a.decision), -1 if a.class_index is None else a.class_index)
        != (int(d), int(c))
        for a, d, c in zip(own, record.decisions, record.classes, strict=True)
    )


def first_detection(flagged: Sequence[bool]) -> int | None:
    """The query number (from 1) of the first query the detector flagged."""
    for number, flag in enumerate(flagged, start=1):
        if flag:
            return number
    return None


def first_detection_detail(
    oracle: ClosableOracle, first: int | None
) -> tuple[DetectionReason | None, int | None]:
    """In process, for a run flagged at query ``first``: the part of the rule that flagged it
    and the guard's own rejections among the queries before it; (None, None) otherwise."""
    if first is None or not isinstance(oracle, ScreenedOracle):
        return None, None
    return oracle.reasons[first - 1], sum(oracle.rejected[: first - 1])


def detections(oracle: ClosableOracle, policy: StatefulPolicy) -> list[bool] | None:
    """Per query sent, whether the screening flagged it, where the check can see it (None where
    it cannot): in process every outcome; over HTTP under ``refuse`` the 403 ``query_refused``
    a flagged query gets (under ``silent`` a flagged query's answer looks like any other)."""
    if isinstance(oracle, ScreenedOracle):
        return [outcome == "detected" for outcome in oracle.outcomes]
    if isinstance(oracle, HttpOracle) and policy == "refuse":
        return [code == "query_refused" for code in oracle.refusals]
    return None


def truly_adversarial(record: AttackRecord, own: Sequence[Answer]) -> bool:
    """Whether the query the attack stopped on as its success is adversarial by the guard's own
    answer (accepted, another class than the true one). Under ``silent`` a served answer may be
    the anchor's, so an attack can stop on a query that the guard gets right: it believes it
    succeeded and holds nothing. Under ``refuse`` served answers are the guard's or a 403, so
    what the attack believes is true."""
    if not record.succeeded:
        return False
    answer = own[record.first_success]
    return answer.decision == "accepted" and answer.class_index != record.label


def summarise(checks: Sequence[ImageCheck]) -> dict[str, Any]:
    """Counts over the images; the replay's two (None) when it covers none of them."""
    replayed = [c for c in checks if c.predicted_success is not None]
    return {
        "images": len(checks),
        "believed_success": sum(c.believed_success for c in checks),
        "live_success": sum(c.live_success for c in checks),
        "predicted_success": sum(bool(c.predicted_success) for c in replayed) if replayed else None,
        "same_outcome": (
            sum(c.live_success == c.predicted_success for c in replayed) if replayed else None
        ),
        "stalled": sum(c.stopped == "stalled" for c in checks),
        **detection_figures(checks),
        "per_image": [asdict(c) for c in checks],
    }


def detection_figures(checks: Sequence[ImageCheck]) -> dict[str, Any]:
    """Over the checks that saw the screening (in process): runs detected, detected before
    their first success, and the median query number of the first detection (None: none)."""
    screened = [c for c in checks if c.screened]
    if not screened:
        return {}
    at = [c.first_detection for c in screened if c.first_detection is not None]
    return {
        "screened": len(screened),
        "detected": len(at),
        "detected_before_success": sum(c.detected_before_success for c in screened),
        "median_queries_to_detection": float(np.median(at)) if at else None,
        **first_detection_figures(screened),
    }


def first_detection_figures(checks: Sequence[ImageCheck]) -> dict[str, Any]:
    """How the detected runs were first flagged, where the check recorded it (in process, since
    2026-12-06): runs by the part of the rule that flagged them, and the mean number of the
    guard's own rejections before the first flag: recorded to test why HopSkipJump's first flags
    came later under round 13's default than under round 11's (a rejected probe shows no class,
    so it cannot take the changed answer's path)."""
    known = [c for c in checks if c.first_detection_by is not None]
    if not known:
        return {}
    rejected = [c.rejected_before_detection or 0 for c in known]
    return {
        "first_detections_by": {
            reason: sum(c.first_detection_by == reason for c in known)
            for reason in DETECTION_REASONS
        },
        "mean_rejected_before_detection": round(float(np.mean(rejected)), 2),
    }


OracleFor = Callable[[AttackName, int], ClosableOracle]  # (attack, row) -> a fresh oracle


def http_oracles(url: str, store: redis.Redis, guard: Guard) -> OracleFor:
    """A running service, its Redis flushed before each image (a fresh fingerprint store, as
    the replay's), one client id per image. Both loopback only: the Redis is wiped. The service
    must serve ``guard``'s bundle (the one that picks the images and judges the successes)."""
    where = store.connection_pool.connection_kwargs
    local = "path" in where or is_loopback(f"redis://{where.get('host', '')}")  # a unix socket
    if not is_loopback(url) or not local:
        raise ValueError(f"refusing {url} with Redis at {where.get('host')!r}: loopback only")
    probe = HttpOracle(url)
    try:
        check_served_bundle(probe.served_bundle, guard)
    finally:
        probe.close()

    def start(attack: AttackName, row: int) -> ClosableOracle:
        store.flushdb()
        return HttpOracle(url, client_id=f"policy-check-{attack}-{row}")

    return start


def check_served_bundle(served: dict[str, Any], guard: Guard) -> None:
    """Refuse a service whose bundle (``GET /v1/bundle``) is not ``guard``'s by name, detector
    statistics, combination or classes: its answers would not be the check's."""
    manifest = guard.manifest
    expected = {
        "name": manifest.name,
        "statistics": guard.detector.names,
        "combination": manifest.detector.combination,
        "class_names": list(guard.class_names),
    }
    differing = [field for field, value in expected.items() if served.get(field) != value]
    if differing:
        raise ValueError(
            f"the service serves another bundle than {manifest.name!r} (differs in "
            f"{', '.join(differing)}): start it with the check's --bundle"
        )


def in_process_oracles(
    guard: Guard,
    policy: StatefulPolicy,
    ids: int,
    rule: DetectionRule = DEFAULT_RULE,
    blends: bool = False,
) -> OracleFor:
    """``ScreenedOracle``s under ``rule`` (with the blend test when ``blends``), a fresh store
    per image, ``ids`` client ids per attacker."""

    def start(attack: AttackName, row: int) -> ClosableOracle:
        names = [f"policy-check-{attack}-{row}-{i}" for i in range(ids)]
        return ScreenedOracle(guard, policy, names, rule, blends)

    return start


def check_attack(
    oracle_for: OracleFor,
    policy: StatefulPolicy,
    attack: AttackName,
    guard: Guard,
    split: ImageSplit,
    rows: np.ndarray,
    predictions: Sequence[bool],
    images: int,
    seed: int,
    stall_asks: int | None = None,
    first: int = 0,
) -> list[ImageCheck]:
    """``images`` of the attacked rows from the ``first``, attacked one at a time, each through
    a fresh oracle (``oracle_for``, its service screening under ``policy``); ``stall_asks``:
    see ``QueryRecorder``. ``predictions``: the replay's, for the recorded rows (the first
    ones)."""
    checks = []
    for i, row in enumerate(rows[first : first + images].tolist(), start=first):
        label = int(split.labels[row])
        pool = candidate_pool(split, rows, label, 20, seed + row) if attack != "square" else None
        oracle = oracle_for(attack, row)
        try:
            cap = DEFAULT_CAPS[attack]
            record = run_attack(
                oracle, attack, split.pixels[row], label, cap, seed + row, row, pool, stall_asks
            )
        finally:
            oracle.close()
        flagged = detections(oracle, policy)
        if flagged is not None and len(flagged) != len(record.queries):
            raise RuntimeError(f"{len(flagged)} queries screened, {len(record.queries)} recorded")
        first_flag = None if flagged is None else first_detection(flagged)
        flagged_by, rejected_before = first_detection_detail(oracle, first_flag)
        own = own_answers(oracle, record, guard)
        checks.append(
            ImageCheck(
                row,
                predictions[i] if i < len(predictions) else None,
                truly_adversarial(record, own),
                len(record.queries),
                withheld(record, own),
                record.succeeded,
                record.stopped,
                screened=flagged is not None,
                first_detection=first_flag,
                first_served_success=record.queries_to_success,
                first_detection_by=flagged_by,
                rejected_before_detection=rejected_before,
            )
        )
    return checks


def oracle_label(key: str) -> str:
    """How a result's queries were answered, from its key (attack/policy[/mode])."""
    parts = key.split("/")
    if len(parts) == 2:
        return "HTTP + Redis"
    mode = parts[2].partition("_from")[0]
    ids = mode.removeprefix("in_process").strip("_").removesuffix("ids")
    label = f"in process, {ids} ids" if ids else "in process"
    first = first_image(key)
    return label + (f", from image {first}" if first else "")


def first_image(key: str) -> int:
    """The first image (in the picker's order) a check attacked, from its key (``result_key``):
    0 over HTTP and without ``_from``."""
    parts = key.split("/")
    first = parts[2].partition("_from")[2] if len(parts) > 2 else ""
    return int(first) if first else 0


def table_order(key: str) -> tuple[str, int, str]:
    """Rows by policy, then attack (as ``ATTACKS``), then HTTP before in process."""
    attack, policy = key.split("/")[:2]
    return policy, [str(a) for a in ATTACKS].index(attack), key


def table(results: dict[str, Any]) -> str:
    lines = [
        "| attack | policy | answered by | images | stopped on a served success | succeeded "
        "live (truly adversarial) | predicted by the replay | same outcome | answers withheld "
        "(median per image) | stopped as stalled | detected before first success | median "
        "queries to detection | rule (client, global, changed[, consistent[, close-copy "
        "radius]]) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(results["checks"], key=table_order):
        r = results["checks"][key]
        attack, policy = key.split("/")[:2]
        withheld_median = float(np.median([c["answers_withheld"] for c in r["per_image"]]))
        believed = r.get("believed_success", r["live_success"])  # refuse: the same
        lines.append(
            f"| {attack} | {policy} | {oracle_label(key)} | {r['images']} | {believed} | "
            f"{r['live_success']} | {_or_dash(r['predicted_success'])} | "
            f"{_or_dash(r['same_outcome'], r['images'])} | {withheld_median:.0f} | "
            f"{r.get('stalled', 0)} | {_detection_cells(r)} | "
            f"{_rule_cell(r)} |"
        )
    return "\n".join(lines)


def _detection_cells(result: dict[str, Any]) -> str:
    """The closed loop's detection figures ("-" for checks that did not see the screening:
    over HTTP, or run before they were recorded)."""
    if "screened" not in result:
        return "- | -"
    median = result["median_queries_to_detection"]
    return (
        f"{result['detected_before_success']}/{result['screened']} | "
        f"{'-' if median is None else f'{median:g}'}"
    )


def _or_dash(count: int | None, of: int | None = None) -> str:
    """A count of the replay's ("-" where it covers none of the images), optionally "n/of"."""
    if count is None:
        return "-"
    return f"{count}/{of}" if of is not None else str(count)


def rule_counts(rule: DetectionRule) -> list[int | None]:
    """The rule a check ran under, as (client, global, changed, consistent) counts: a rule
    change invalidates a check, and the table says which rule each row measured (rows with
    three counts ran before the consistent count existed: it was off)."""
    return [rule.client_matches, rule.global_matches, rule.changed_matches, rule.consistent_matches]


def rule_text(counts: list[int | None]) -> str:
    """[5, 5, None] -> "5, 5, -" (a count that is off: -)."""
    return ", ".join("-" if c is None else str(c) for c in counts)


def _rule_cell(result: dict[str, Any]) -> str:
    """The rule's counts, the close-copy radius of checks run since close copies exist
    (2026-12-01; 0: off; rows without one ran before, without close copies), and whether the
    changed answer counted rejections (``--changed-rejected``)."""
    counts, close_radius = result.get("rule"), result.get("close_radius")
    if counts is None:
        return "the service's settings"
    return (
        rule_text(counts)
        + ("" if close_radius is None else f", {close_radius}")
        + (", changed counts rejections" if result.get(CHANGED_REJECTED) else "")
        + (", blend test" if result.get(BLENDS) else "")
    )


CHANGED_REJECTED = "changed_includes_rejected"  # recorded (true) only for --changed-rejected
BLENDS = "blends"  # recorded (true) only for --blends


def checked_rule(changed_rejected: bool) -> DetectionRule:
    """The rule an in-process check screens with: the default, its changed answer counting
    rejections with ``--changed-rejected`` (``DetectionRule.changed_includes_rejected``)."""
    return replace(DEFAULT_RULE, changed_includes_rejected=changed_rejected)


def rule_record(rule: DetectionRule, blends: bool = False) -> dict[str, Any]:
    """What a results file records of the rule a run screened with: its counts, and
    ``CHANGED_REJECTED`` and ``BLENDS`` only when set (records before they existed read as
    without them)."""
    record: dict[str, Any] = {"rule": rule_counts(rule)}
    if rule.changed_includes_rejected:
        record[CHANGED_REJECTED] = True
    if blends:
        record[BLENDS] = True
    return record


def stateful_file(directory: Path) -> Path:
    """The replay's results the check reads: ``directory``'s stateful.json, else the default
    results directory's (``evaluation.stateful_eval`` writes it there). A copy in each results
    directory used to be required: five identical copies of 194 KB were tracked, and the
    working tree outgrew the device carry's headroom (tests/bench/test_gpu_wheels.py)."""
    own = directory / "stateful.json"
    return own if own.is_file() else DEFAULT_RESULTS / "stateful.json"


def result_key(attack: str, policy: str, in_process: bool, ids: int, first: int = 0) -> str:
    """attack/policy[/in_process[_{ids}ids][_from{first}]]: HTTP checks start at image 0."""
    if not in_process:
        return f"{attack}/{policy}"
    return (
        f"{attack}/{policy}/in_process"
        + (f"_{ids}ids" if ids > 1 else "")
        + (f"_from{first}" if first else "")
    )


def recorded(directory: Path) -> dict[str, Any]:
    """The results file as it is now (no file yet: no checks)."""
    out_file = directory / "policy_check.json"
    return json.loads(out_file.read_text()) if out_file.is_file() else {"checks": {}}


def record(directory: Path, key: str, summary: dict[str, Any]) -> None:
    """Add one check to the results file as it is *now*: checks run side by side (one attack
    each, hours long) keep each other's rows; a pool or a comparison of an earlier check under
    the same key goes (``pool``, ``compare``)."""
    results = recorded(directory)
    results["checks"][key] = summary
    # a pool or comparison that holds the replaced check no longer says what its checks say
    for section in ("pooled", "compared"):
        if section in results:
            kept = results[section]
            results[section] = {name: r for name, r in kept.items() if key not in r["checks"]}
    write(results, directory)


def write(results: dict[str, Any], directory: Path) -> None:
    (directory / "policy_check.json").write_text(json.dumps(results, indent=2) + "\n")
    pooled = results.get("pooled", {})
    compared = results.get("compared", {})
    (directory / "policy_check.md").write_text(
        "# The stateful policies live (evaluation.policy_check)\n\n"
        + table(results)
        + "\n"
        + (
            f"\n## Checks pooled image by image (`--pool`)\n\n{pooled_table(pooled)}\n"
            if pooled
            else ""
        )
        + (
            f"\n## Checks compared image by image (`--compare`)\n\n{compared_table(compared)}\n"
            if compared
            else ""
        )
        + first_detections_section(results)
    )


def first_detections_section(results: dict[str, Any]) -> str:
    """How the first detections came, for the checks and pools that recorded it ("" if none)."""
    rows = [(oracle_label(key), key.split("/")[:2], r) for key, r in results["checks"].items()] + [
        ("; ".join(oracle_label(k) for k in r["checks"]), r["checks"][0].split("/")[:2], r)
        for r in results.get("pooled", {}).values()
    ]
    lines = [
        f"| {attack_policy[0]} | {attack_policy[1]} | {label} | {r['detected']} | "
        + " / ".join(str(r["first_detections_by"].get(reason, 0)) for reason in DETECTION_REASONS)
        + f" | {r['mean_rejected_before_detection']:g} |"
        for label, attack_policy, r in sorted(rows, key=lambda row: (row[1], row[0]))
        if "first_detections_by" in r
    ]
    if not lines:
        return ""
    return (
        "\n## How the first detections came (in process)\n\n"
        "| attack | policy | checks | runs detected | first flagged by (client's count / "
        "everyone's / changed answer / blend) | the guard's own rejections before the first "
        "flag (mean per run) |\n|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )


# what pooled checks must share: they measured the same thing on other images
POOLED_ALIKE = ("rule", "close_radius", "bundle_manifest_sha256", CHANGED_REJECTED, BLENDS)


def _recorded_alike(
    results: dict[str, Any],
    keys: Sequence[str],
    enough: bool,
    need: str,
    who: str,
    alike: Sequence[str],
) -> list[dict[str, Any]]:
    """The recorded checks named by ``keys`` (``enough`` of them, all recorded), of one attack
    under one policy and sharing every field of ``alike``; else a ValueError that says which."""
    missing = [key for key in keys if key not in results["checks"]]
    if not enough or missing:
        raise ValueError(f"{need} recorded checks; not recorded: {missing}")
    checks = [results["checks"][key] for key in keys]
    if len({tuple(key.split("/")[:2]) for key in keys}) != 1:
        raise ValueError(f"{who} checks must share attack and policy: {list(keys)}")
    for field in alike:
        if len({json.dumps(check.get(field)) for check in checks}) != 1:
            raise ValueError(f"{who} checks must share their {field}: {list(keys)}")
    return checks


def pool(results: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """Checks of one attack under one policy, run on disjoint images against the same bundle and
    rule, as one check over all their images (``summarise`` of their per-image records): a
    figure on more images than any one run covered, computed as each run's is."""
    checks = _recorded_alike(
        results, keys, len(keys) >= 2, "pool needs at least two", "pooled", POOLED_ALIKE
    )
    images = [ImageCheck(**image) for check in checks for image in check["per_image"]]
    if len({image.row for image in images}) != len(images):
        raise ValueError(f"pooled checks attacked some image twice: {list(keys)}")
    if not all(image.screened for image in images):
        raise ValueError(
            "pooled checks must have seen their detections (in process, or over HTTP under refuse)"
        )
    summary = {k: v for k, v in summarise(images).items() if k != "per_image"}
    return (
        summary | {"checks": list(keys)} | {field: checks[0].get(field) for field in POOLED_ALIKE}
    )


def pooled_table(pooled: dict[str, Any]) -> str:
    """The pools' figures, one row each, with the checks each pools (``table``'s cells)."""
    lines = [
        "| attack | policy | checks pooled | images | succeeded live (truly adversarial) | "
        "stopped as stalled | detected before first success | median queries to detection | "
        "rule (client, global, changed, consistent, close-copy radius) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(pooled):
        r = pooled[name]
        attack, policy = r["checks"][0].split("/")[:2]
        lines.append(
            f"| {attack} | {policy} | {'; '.join(oracle_label(k) for k in r['checks'])} | "
            f"{r['images']} | {r['live_success']} | {r['stalled']} | {_detection_cells(r)} | "
            f"{_rule_cell(r)} |"
        )
    return "\n".join(lines)


def record_pooled(directory: Path, keys: Sequence[str]) -> dict[str, Any]:
    """Pool recorded checks (``pool``) and add the result to the results file, named by its
    checks' keys joined with " + "."""
    results = recorded(directory)
    pooled = pool(results, keys)
    results.setdefault("pooled", {})[" + ".join(keys)] = pooled
    write(results, directory)
    return pooled


# what one image's run must repeat for two checks of it to agree (``first_detection``: where
# both saw the detections)
COMPARED = (
    "live_success",
    "believed_success",
    "live_queries",
    "answers_withheld",
    "stopped",
    "first_served_success",
    "first_detection",
)


def compare(results: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """Two recorded checks of one attack under one policy against the same bundle, image by
    image over the images both attacked: how many agree on every ``COMPARED`` field, and each
    image that does not, with the fields that differ (first check's value, then second's)."""
    first, second = _recorded_alike(
        results, keys, len(keys) == 2, "compare needs two", "compared", ("bundle_manifest_sha256",)
    )
    theirs = {image["row"]: image for image in second["per_image"]}
    pairs = [(mine, theirs[mine["row"]]) for mine in first["per_image"] if mine["row"] in theirs]
    if not pairs:
        raise ValueError(f"compared checks attacked no image in common: {list(keys)}")
    differing = []
    both_seen = 0
    for mine, other in pairs:
        seen = bool(mine.get("screened")) and bool(other.get("screened"))
        both_seen += seen
        fields = [f for f in COMPARED if (seen or f != "first_detection") and mine[f] != other[f]]
        if fields:
            differing.append({"row": mine["row"], **{f: [mine[f], other[f]] for f in fields}})
    return {
        "checks": list(keys),
        "images": len(pairs),
        "agree": len(pairs) - len(differing),
        "detections_compared": both_seen,
        "differing": differing,
    }


def compared_table(compared: dict[str, Any]) -> str:
    """The comparisons, one row each (``compare``)."""
    lines = [
        "| attack | policy | checks compared | images | agree on every field | first "
        "detections compared | differing (row: field first / second) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in sorted(compared):
        r = compared[name]
        attack, policy = r["checks"][0].split("/")[:2]
        differing = "; ".join(
            f"{d['row']}: " + ", ".join(f"{f} {d[f][0]} / {d[f][1]}" for f in COMPARED if f in d)
            for d in r["differing"]
        )
        lines.append(
            f"| {attack} | {policy} | {' vs '.join(oracle_label(k) for k in r['checks'])} | "
            f"{r['images']} | {r['agree']} | {r['detections_compared']} | {differing or '-'} |"
        )
    return "\n".join(lines)


def record_compared(directory: Path, keys: Sequence[str]) -> dict[str, Any]:
    """Compare two recorded checks (``compare``) and add the result to the results file, named
    by their keys joined with " vs "."""
    results = recorded(directory)
    compared = compare(results, keys)
    results.setdefault("compared", {})[" vs ".join(keys)] = compared
    write(results, directory)
    return compared


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.policy_check",
        description="the stateful policies live over HTTP against the replay's prediction",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running advguard serve (loopback)")
    where.add_argument(
        "--in-process", action="store_true", help="the service's screening in process, no HTTP"
    )
    where.add_argument(
        "--pool",
        nargs="+",
        metavar="KEY",
        help="run nothing: pool recorded checks (keys of policy_check.json, disjoint images, one "
        "attack, policy, bundle and rule) image by image into one figure, added to the results",
    )
    where.add_argument(
        "--compare",
        nargs=2,
        metavar="KEY",
        help="run nothing: set two recorded checks of the same images (one attack, policy and "
        "bundle; e.g. over HTTP and in process) side by side image by image, added to the results",
    )
    parser.add_argument("--redis-url", help="with --url: its throwaway Redis (flushed)")
    parser.add_argument(
        "--sybil-ids", type=int, default=1, help="with --in-process: client ids per attacker"
    )
    parser.add_argument(
        "--changed-rejected",
        action="store_true",
        help="with --in-process: the changed answer also counts a query the guard rejects, by "
        "its model class (ADVGUARD_STATEFUL_CHANGED_REJECTED; an experiment, off by default)",
    )
    parser.add_argument(
        "--blends",
        action="store_true",
        help="with --in-process: the blend test on (ADVGUARD_STATEFUL_BLENDS)",
    )
    parser.add_argument("--policy", choices=("refuse", "silent"), help="required to run checks")
    parser.add_argument(
        "--attacks",
        nargs="+",
        choices=ATTACKS,
        default=list(ATTACKS),
        help="query attacks rerun (default: all)",
    )
    parser.add_argument(
        "--images",
        type=at_least(1),
        default=10,
        help="attacked images per attack (default: %(default)s)",
    )
    parser.add_argument(
        "--first-image",
        type=int,
        default=0,
        help="with --in-process: start at this image of query_attacks' order (0: the recorded "
        "runs' first; from 100 the images were never recorded, so the replay predicts nothing)",
    )
    parser.add_argument(
        "--bundle",
        type=Path,
        default=DEFAULT_BUNDLE,
        help="bundle that picks the images and, with --in-process, answers (default: %(default)s)",
    )
    parser.add_argument(
        "--pick-bundle",
        type=Path,
        help="bundle that picks the images instead (the model must be --bundle's): two bundles "
        "then answer the same images, and the attacker draws the same starting photos (from the "
        "photos outside the picked ones)",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=DEFAULT_SOURCE,
        help="CIFAR-10 ImageFolder directory or tar with a test/ split (default: %(default)s)",
    )
    add_data_cache_argument(parser)
    parser.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS,
        help="results directory: stateful.json read (the default directory's if it has none), "
        "policy_check.json and .md written "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="the images' and attacks' draws (default: %(default)s)"
    )
    parser.add_argument(
        "--stall-asks",
        type=at_least(1),
        default=None,
        help="stop a run after this many consecutive asks answered from memory (ART's Boundary "
        "spins for minutes per fresh query once everything is refused, and HopSkipJump's step "
        "search may never end); default: never",
    )
    parser.add_argument(
        "--threads",
        type=at_least(1),
        default=1,
        help="torch CPU threads (default: %(default)s; checks run side by side with more "
        "threads in all than cores slow each other many times over)",
    )
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a run's contradictory or unsafe options before anything is loaded, let alone
    flushed (``--redis-url`` is flushed before every image)."""
    if args.policy is None:
        parser.error("--policy is required to run checks")
    if args.url and not args.redis_url:
        parser.error("--url needs --redis-url (its Redis is flushed before each image)")
    for option, url in (("--url", args.url), ("--redis-url", args.redis_url)):
        if url and not is_loopback(url):
            parser.error(f"{option} {url} is not a loopback address (--redis-url is flushed)")
    if args.sybil_ids < 1 or (args.sybil_ids > 1 and not args.in_process):
        parser.error("--sybil-ids: a positive count, with --in-process")
    if args.changed_rejected and not args.in_process:
        parser.error("--changed-rejected: with --in-process (over HTTP the service's settings)")
    if args.blends and not args.in_process:
        parser.error("--blends: with --in-process (over HTTP the service's settings)")
    if args.first_image < 0 or (args.first_image and not args.in_process):
        parser.error("--first-image: at least 0, with --in-process")


@dataclass(frozen=True)
class Targets:
    """What a run attacks and judges with: the guard, its bundle's manifest digest, the test
    split, the picked rows (``query_attacks``' images, in its order) and the replay's results."""

    guard: Guard
    bundle_sha: str
    split: ImageSplit
    rows: np.ndarray
    stateful: dict[str, Any]


def load_targets(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Targets:
    torch.set_num_threads(args.threads)
    guard = Guard.load(args.bundle, device="cpu")
    bundle_sha = hashlib.sha256((Path(args.bundle) / MANIFEST_NAME).read_bytes()).hexdigest()[:16]
    split = load_split(args.source, "test", guard.preset, args.data_cache)
    # query_attacks' images, in its order (its first 100 were recorded)
    picker = guard if args.pick_bundle is None else Guard.load(args.pick_bundle, device="cpu")
    if picker.manifest.model.weights_sha256 != guard.manifest.model.weights_sha256:
        parser.error("--pick-bundle holds another model than --bundle")
    rows = pick_images(picker, split, max(100, args.first_image + args.images), args.seed)
    stateful = json.loads(stateful_file(args.results).read_text())
    return Targets(guard, bundle_sha, split, rows, stateful)


def check_summary(
    checks: Sequence[ImageCheck],
    seconds: float,
    args: argparse.Namespace,
    targets: Targets,
    argv: Sequence[str],
) -> dict[str, Any]:
    """One attack's recorded summary: its counts and what they were measured against."""
    summary = summarise(checks) | {"seconds": round(seconds, 1)}
    if args.in_process:  # over HTTP the rule is the running service's settings
        summary |= rule_record(checked_rule(args.changed_rejected), args.blends)
        # the close-copy radius of the scheme ScreenedOracle screens with (0: none)
        summary["close_radius"] = default_scheme(EVALUATION_SECRET).close_radius or 0
    # which bundle judged the queries: its manifest lists every file's sha256
    summary["bundle_manifest_sha256"] = targets.bundle_sha
    if args.pick_bundle is not None:
        summary["pick_bundle"] = str(args.pick_bundle)
    summary["rows_sha256"] = hashlib.sha256(targets.rows.tobytes()).hexdigest()[:16]
    summary["command"] = " ".join(["python -m evaluation.policy_check", *map(shlex.quote, argv)])
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Pool or compare recorded checks, or run one: options checked, targets loaded, then each
    attack checked and recorded as soon as it ends (a long run keeps what it finished)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pool:
        pooled = record_pooled(args.results, args.pool)
        print(" + ".join(args.pool) + ": " + json.dumps(pooled), flush=True)
        return 0
    if args.compare:
        compared = record_compared(args.results, args.compare)
        print(" vs ".join(args.compare) + ": " + json.dumps(compared), flush=True)
        return 0
    check_arguments(parser, args)
    targets = load_targets(parser, args)
    oracle_for = (
        in_process_oracles(
            targets.guard,
            args.policy,
            args.sybil_ids,
            checked_rule(args.changed_rejected),
            args.blends,
        )
        if args.in_process
        else http_oracles(args.url, redis.Redis.from_url(args.redis_url), targets.guard)
    )
    for attack in args.attacks:
        started = time.perf_counter()
        checks = check_attack(
            oracle_for,
            args.policy,
            attack,
            targets.guard,
            targets.split,
            targets.rows,
            replay_predictions(targets.stateful, attack, sybil=args.sybil_ids > 1),
            args.images,
            args.seed,
            args.stall_asks,
            args.first_image,
        )
        summary = check_summary(checks, time.perf_counter() - started, args, targets, argv)
        key = result_key(attack, args.policy, args.in_process, args.sybil_ids, args.first_image)
        record(args.results, key, summary)
        brief = {k: v for k, v in summary.items() if k != "per_image"}
        print(f"{key}: {json.dumps(brief)}", flush=True)
    return 0


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m evaluation.policy_check"))
