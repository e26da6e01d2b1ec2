"""Attack-source detection under simulated traffic (paper, end of Section 5.1), measured.

A population of clients sends images to the guard: honest clients send CIFAR-10 test images drawn
at random (the model's natural errors included), attackers send the evaluation's adversarials of
one attack, mixed attackers send one adversarial every ``mix_every`` requests and authentic test
images otherwise. Every flag policy of ``app.core.flagging``, calibrated on the bundle's held-out
honest scores exactly as the service calibrates it (``app.service.main.flag_policy_for``), judges
the same traffic: the per-request scores are computed once by the bundle's Guard and replayed,
client by client, through the service's own ``InMemoryTracker``. ``run_live`` sends a smaller
population over HTTP to a running service (Redis behind it) and checks that the service flags
exactly the clients, at exactly the requests, that the replay of the scores it served predicts.
"""

from __future__ import annotations

import io
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

from app.core.flagging import FLAG_POLICIES, FlagPolicy, PolicyKind
from app.core.guard import Guard
from app.service.tracking import InMemoryTracker, Observation

HONEST = "honest"


@dataclass(frozen=True)
class ScoredPool:
    """Images a client may send, with the score and verdict the guard gives each."""

    pixels: np.ndarray  # (n, 3, H, W) uint8
    scores: np.ndarray  # (n,) float64
    accepted: np.ndarray  # (n,) bool
    predictions: np.ndarray  # (n,) int64


def score_pool(guard: Guard, pixels: np.ndarray, batch_size: int = 500) -> ScoredPool:
    """The guard's score and verdict for each 8-bit image, as the service computes them."""
    scores, predictions = [], []
    for start in range(0, len(pixels), batch_size):
        chunk = torch.from_numpy(pixels[start : start + batch_size].astype(np.float32) / 255.0)
        batch = guard.infer(chunk)
        scores.append(guard.score(batch).astype(np.float64))
        predictions.append(batch.predictions)
    all_scores = np.concatenate(scores)
    return ScoredPool(
        pixels, all_scores, all_scores >= guard.threshold, np.concatenate(predictions)
    )


@dataclass(frozen=True)
class ClientPlan:
    client_id: str
    # "honest", "<attack>", "mixed-<attack>"; the stress kinds: "warm<W>-<attack>" and
    # "honest-<class>" (``plan_stress_population``)
    kind: str
    requests: list[tuple[str, int]]  # (pool, row) in sending order
    # the request number its attack starts at: requests-to-flag are counted from there (a
    # client flagged earlier counts as flagged at its first adversarial)
    attack_starts: int = 1


def plan_population(
    pool_sizes: dict[str, int],
    attacks: Sequence[str],
    honest_clients: int,
    attack_clients: int,
    requests: int,
    mix_every: int,
    seed: int,
    prefix: str = "sim",
) -> list[ClientPlan]:
    """Honest clients, pure attackers and mixed attackers per attack; deterministic for a seed.
    Each client draws distinct images from its pool (with replacement when the pool is short)."""
    rng = np.random.default_rng(seed)

    def draw(pool: str, count: int) -> list[int]:
        size = pool_sizes[pool]
        rows = rng.choice(size, size=count, replace=count > size)
        return [int(r) for r in rows]

    plans = [
        ClientPlan(f"{prefix}-honest-{i}", HONEST, [(HONEST, r) for r in draw(HONEST, requests)])
        for i in range(honest_clients)
    ]
    for attack in attacks:
        for i in range(attack_clients):
            rows = draw(attack, requests)
            plans.append(ClientPlan(f"{prefix}-{attack}-{i}", attack, [(attack, r) for r in rows]))
        for i in range(attack_clients):
            adversarial = iter(draw(attack, requests // mix_every + 1))
            authentic = iter(draw(HONEST, requests))
            sequence = [
                (attack, next(adversarial))
                if j % mix_every == mix_every - 1
                else (HONEST, next(authentic))
                for j in range(requests)
            ]
            plans.append(ClientPlan(f"{prefix}-mixed-{attack}-{i}", f"mixed-{attack}", sequence))
    return plans


def plan_stress_population(
    pool_sizes: dict[str, int],
    attacks: Sequence[str],
    honest_labels: np.ndarray,
    class_names: Sequence[str],
    warm_ups: Sequence[int],
    attack_clients: int,
    class_clients: int,
    requests: int,
    seed: int,
    prefix: str = "stress",
) -> list[ClientPlan]:
    """The clients ``plan_population`` leaves out, replayed beside it (``choose_default`` reads
    both kinds since 2026-11-30):

    - ``warm<W>-<attack>``: an attacker with a history, ``W`` honest requests before it attacks
      (an API key used honestly first); its requests-to-flag count from its first adversarial;
    - ``honest-<class>``: an honest client whose photos are all of one (true) class, as a
      single-purpose application's are; scores differ by class, so the class-balanced honest
      population the thresholds are calibrated for is not the only honest traffic there is.
    """
    rng = np.random.default_rng(seed)

    def draw(size: int, count: int) -> list[int]:
        return [int(r) for r in rng.choice(size, size=count, replace=count > size)]

    plans: list[ClientPlan] = []
    for warm in warm_ups:
        if not 0 < warm < requests:
            raise ValueError(f"a warm-up of {warm} requests leaves no attack in {requests}")
        for attack in attacks:
            for i in range(attack_clients):
                honest = [(HONEST, r) for r in draw(pool_sizes[HONEST], warm)]
                adversarial = [(attack, r) for r in draw(pool_sizes[attack], requests - warm)]
                plans.append(
                    ClientPlan(
                        f"{prefix}-warm{warm}-{attack}-{i}",
                        f"warm{warm}-{attack}",
                        honest + adversarial,
                        attack_starts=warm + 1,
                    )
                )
    for label, name in enumerate(class_names):
        rows = np.flatnonzero(honest_labels == label)
        for i in range(class_clients):
            chosen = rows[draw(len(rows), requests)]
            plans.append(
                ClientPlan(
                    f"{prefix}-honest-{name}-{i}",
                    f"{HONEST}-{name}",
                    [(HONEST, int(r)) for r in chosen],
                )
            )
    return plans


def is_honest(kind: str) -> bool:
    """The base honest population and the one-class honest kinds."""
    return kind == HONEST or kind.startswith(f"{HONEST}-")


def pool_flag_values(pool: ScoredPool, policy: FlagPolicy) -> np.ndarray:
    """(n,) what each image adds to a client's window under ``policy``, as the service's
    ``FlagPolicy.flag_value`` computes it."""
    return policy.flag_values(pool.scores, pool.predictions)


def replay(
    plans: Sequence[ClientPlan], pools: dict[str, ScoredPool], policy: FlagPolicy
) -> dict[str, int | None]:
    """Per client, the request at which the service's tracker flags it (None: never)."""
    tracker = InMemoryTracker(policy, ttl_s=math.inf)
    values = {name: pool_flag_values(pool, policy) for name, pool in pools.items()}
    flagged_at: dict[str, int | None] = {}
    for plan in plans:
        flagged_at[plan.client_id] = None
        for i, (pool, row) in enumerate(plan.requests, start=1):
            observation = Observation(
                plan.client_id,
                float(values[pool][row]),
                bool(pools[pool].accepted[row]),
                float(i),
            )
            if tracker.record(observation).newly_flagged:
                flagged_at[plan.client_id] = i
                break
    return flagged_at


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class TimeToFlag:
    clients: int
    median: float | None  # None: more than half never flagged within the horizon
    p90: float | None
    never_share: float

    @staticmethod
    def of(times: Sequence[int | None]) -> TimeToFlag:
        values = np.array([math.inf if t is None else float(t) for t in times])

        def quantile(q: float) -> float | None:
            value = float(np.quantile(values, q, method="inverted_cdf"))
            return None if math.isinf(value) else value

        return TimeToFlag(len(values), quantile(0.5), quantile(0.9), float(np.isinf(values).mean()))


@dataclass(frozen=True)
class PolicyOutcome:
    policy: FlagPolicy
    honest_flagged: dict[int, float]  # within n requests -> share of honest clients flagged
    honest_interval: tuple[float, float]  # 95% CI of the share within the horizon
    attackers: dict[str, TimeToFlag]  # client kind -> requests until flagged
    times_by_kind: dict[str, list[int | None]] = field(repr=False)  # honest included
    # the one-class honest kinds: kind -> (clients flagged within the horizon, clients)
    honest_kinds: dict[str, tuple[int, int]] = field(default_factory=dict)


def judge(
    plans: Sequence[ClientPlan],
    pools: dict[str, ScoredPool],
    policy: FlagPolicy,
    checkpoints: Sequence[int],
) -> PolicyOutcome:
    flagged_at = replay(plans, pools, policy)
    times: dict[str, list[int | None]] = {}
    for plan in plans:
        at = flagged_at[plan.client_id]
        since_attack = None if at is None else max(at - plan.attack_starts + 1, 1)
        times.setdefault(plan.kind, []).append(since_attack)
    honest = times.get(HONEST, [])
    horizon = max(len(p.requests) for p in plans)
    flagged_honest = sum(t is not None for t in honest)
    return PolicyOutcome(
        policy=policy,
        honest_flagged={
            n: sum(t is not None and t <= n for t in honest) / max(len(honest), 1)
            for n in [*checkpoints, horizon]
        },
        honest_interval=wilson_interval(flagged_honest, len(honest)),
        attackers={
            kind: TimeToFlag.of(t) for kind, t in sorted(times.items()) if not is_honest(kind)
        },
        times_by_kind=times,
        honest_kinds={
            kind: (sum(t is not None for t in flagged), len(flagged))
            for kind, flagged in sorted(times.items())
            if is_honest(kind) and kind != HONEST
        },
    )


def choose_default(
    outcomes: dict[PolicyKind, PolicyOutcome],
    pure_attacks: Sequence[str],
    max_false: float,
    warm_ups: Sequence[int] = (),
) -> PolicyKind | None:
    """The rule fixed before measuring (2026-11-30, before ``ewma_anchored`` was first run; the
    rule before it read only attackers from their first request and mixed-class honest clients):
    among policies flagging at most ``max_false`` of the honest clients within the horizon and at
    most ``max_false`` of the one-class honest clients taken together (when there are any), the
    lowest mean over pure attacks of the *slowest* median requests-to-flag across the client
    histories measured (attacking from the first request, and after each of ``warm_ups`` honest
    requests; never counts as horizon + 1); ties go to the fewer never-flagged attackers."""
    best: tuple[float, float, PolicyKind] | None = None
    for kind, outcome in outcomes.items():
        horizon = max(outcome.honest_flagged)
        if outcome.honest_flagged[horizon] > max_false:
            continue
        one_class = list(outcome.honest_kinds.values())
        if one_class and sum(f for f, _ in one_class) > max_false * sum(n for _, n in one_class):
            continue
        slowest, nevers = [], []
        for attack in pure_attacks:
            histories = [attack, *(f"warm{w}-{attack}" for w in warm_ups)]
            times = [outcome.attackers[h] for h in histories]
            slowest.append(max(t.median or float(horizon + 1) for t in times))
            nevers.append(max(t.never_share for t in times))
        key = (float(np.mean(slowest)), float(np.mean(nevers)), kind)
        if best is None or key < best:
            best = key
    return None if best is None else best[2]


def all_policies(calibrate: Callable[[PolicyKind], FlagPolicy]) -> dict[PolicyKind, FlagPolicy]:
    return {kind: calibrate(kind) for kind in FLAG_POLICIES}


# --------------------------------------------------------------------------- over HTTP


def png_bytes(pixels: np.ndarray) -> bytes:
    """An 8-bit (3, H, W) image as PNG: lossless, so the service sees exactly these pixels."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0))).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class LiveRequest:
    status: int
    score: float | None
    accepted: bool | None
    sent: float
    answered: float


@dataclass(frozen=True)
class LiveClient:
    plan: ClientPlan
    requests: list[LiveRequest]
    stats: dict[str, Any] | None  # the service's /clients/{id} answer


class _Payloads:
    """Each pool image's PNG upload, encoded once and shared by the client threads."""

    def __init__(self, pools: dict[str, ScoredPool]) -> None:
        self._pools = pools
        self._lock = threading.Lock()
        self._encoded: dict[tuple[str, int], bytes] = {}

    def __call__(self, pool: str, row: int) -> bytes:
        with self._lock:
            key = (pool, row)
            if key not in self._encoded:
                self._encoded[key] = png_bytes(self._pools[pool].pixels[row])
            return self._encoded[key]


def _classified(
    http: httpx.Client, data: bytes, headers: dict[str, str], stop_at: float
) -> LiveRequest:
    """One upload, as a well-behaved client sends it: a 503 is retried after its Retry-After
    (at most 5 s) until ``stop_at``."""
    while True:
        sent = time.time()
        response = http.post(
            "/classify", files={"file": ("image.png", data, "image/png")}, headers=headers
        )
        answered = time.time()
        if response.status_code != 503 or time.monotonic() > stop_at:
            break
        time.sleep(min(float(response.headers.get("Retry-After", "1")), 5.0))
    body = response.json() if response.status_code == 200 else {}
    decision = body.get("decision")
    return LiveRequest(
        response.status_code,
        body.get("score"),
        None if decision is None else decision == "accepted",
        sent,
        answered,
    )


def run_live(
    http: httpx.Client,
    admin: httpx.Client,
    plans: Sequence[ClientPlan],
    pools: dict[str, ScoredPool],
    admin_token: str,
    concurrency: int = 8,
    admin_header: str = "X-Admin-Token",
    client_header: str = "X-Client-ID",
    deadline_s: float = 600.0,
) -> list[LiveClient]:
    """Each client sends its requests in order; clients run ``concurrency`` at a time. Bounded:
    a client stops at the first non-200 answer (after retrying 503s as Retry-After says) or when
    ``deadline_s`` has passed. ``admin`` talks to the service's admin listener (the client
    statistics live there, not on the public port)."""
    stop_at = time.monotonic() + deadline_s
    payload = _Payloads(pools)

    def send(plan: ClientPlan) -> LiveClient:
        done: list[LiveRequest] = []
        for pool, row in plan.requests:
            if time.monotonic() > stop_at:
                break
            request = _classified(
                http, payload(pool, row), {client_header: plan.client_id}, stop_at
            )
            done.append(request)
            if request.status != 200:
                break
        answer = admin.get(f"/clients/{plan.client_id}", headers={admin_header: admin_token})
        return LiveClient(plan, done, answer.json() if answer.status_code == 200 else None)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(send, plans))


def live_agreement(
    clients: Sequence[LiveClient], policy: FlagPolicy, pools: dict[str, ScoredPool]
) -> dict[str, Any]:
    """Replay the scores the service served, per client, through the tracker; compare with the
    service's own flags and counts."""
    tracker = InMemoryTracker(policy, ttl_s=math.inf)
    rows: list[dict[str, Any]] = []
    for client in clients:
        predicted_at: int | None = None
        score_gap = 0.0
        for i, (request, (pool, row)) in enumerate(
            zip(client.requests, client.plan.requests, strict=False), start=1
        ):
            expected = float(pools[pool].scores[row])
            served = expected if request.score is None else float(request.score)
            score_gap = max(score_gap, abs(served - expected))
            accepted = (
                bool(pools[pool].accepted[row]) if request.accepted is None else (request.accepted)
            )
            # the class the tracker saw: the model's prediction (the pool's, offline; a rejected
            # answer withholds it, and a ``silent`` one may serve another's)
            flag_value = policy.flag_value(served, int(pools[pool].predictions[row]))
            result = tracker.record(Observation(client.plan.client_id, flag_value, accepted, i))
            if result.newly_flagged:
                predicted_at = i
        stats = client.stats or {}
        served_flagged_at = stats.get("flagged_at")
        at_request = None
        if served_flagged_at is not None:
            at_request = next(
                (
                    i
                    for i, r in enumerate(client.requests, start=1)
                    if r.sent <= served_flagged_at <= r.answered  # one clock: loopback
                ),
                None,
            )
        rows.append(
            {
                "client_id": client.plan.client_id,
                "kind": client.plan.kind,
                "sent": len(client.requests),
                "ok": sum(r.status == 200 for r in client.requests),
                "service_requests": stats.get("requests"),
                "service_flagged": bool(stats.get("flagged", False)),
                "replay_flagged_at": predicted_at,
                "service_flagged_near_request": at_request,
                "max_score_gap": score_gap,
            }
        )
    return {
        "clients": rows,
        "all_answered_200": all(r["ok"] == r["sent"] for r in rows),
        "counts_match": all(r["service_requests"] == r["sent"] for r in rows),
        "flags_match": all(
            r["service_flagged"] == (r["replay_flagged_at"] is not None) for r in rows
        ),
        "max_score_gap": max((r["max_score_gap"] for r in rows), default=0.0),
    }


def load_pools(
    guard: Guard, test_pixels: np.ndarray, attack_pixels: dict[str, np.ndarray]
) -> dict[str, ScoredPool]:
    pools = {HONEST: score_pool(guard, test_pixels)}
    for name, pixels in attack_pixels.items():
        pools[name] = score_pool(guard, pixels)
    return pools


def pool_summary(pools: dict[str, ScoredPool], labels: np.ndarray) -> dict[str, Any]:
    honest = pools[HONEST]
    return {
        name: {
            "images": len(pool.scores),
            "mean_score": round(float(pool.scores.mean()), 4),
            "rejected_share": round(float((~pool.accepted).mean()), 4),
            **(
                {"accuracy": round(float((honest.predictions == labels).mean()), 4)}
                if name == HONEST
                else {}
            ),
        }
        for name, pool in pools.items()
    }


def honest_by_class(
    pool: ScoredPool, labels: np.ndarray, class_names: Sequence[str], policy: FlagPolicy
) -> dict[str, dict[str, float]]:
    """Per true class of the honest pool: the model's accuracy, and the mean flag value the
    policies average (of all its photos, of the correctly classified, of the errors): what a
    client sending photos of that class only adds to its window."""
    values = pool_flag_values(pool, policy)
    out: dict[str, dict[str, float]] = {}
    for label, name in enumerate(class_names):
        rows = labels == label
        correct = pool.predictions[rows] == label

        def mean(selected: np.ndarray) -> float:
            return round(float(selected.mean()), 4) if selected.size else math.nan

        out[name] = {
            "accuracy": mean(correct.astype(np.float64)),
            "mean_flag_value": mean(values[rows]),
            "correct": mean(values[rows][correct]),
            "errors": mean(values[rows][~correct]),
        }
    return out


def ensure_path(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
