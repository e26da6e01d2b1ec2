"""Per-client flagging (paper, end of Section 5.1): the statistics, the policies, their thresholds.

Every scored request of a client advances its *window*, the statistics since the window started
(a cleared flag restarts it): the count, the running mean of the score, a bias-corrected EWMA,
the number of rejected predictions and a one-sided CUSUM. ``advance_window`` is the one update,
written once over numpy so that the in-process tracker (scalars) and the threshold calibration
(thousands of simulated clients at once) run the same arithmetic; the Redis tracker's Lua script
mirrors it and a test holds the two equal.

A policy reads one statistic of the window and flags a client once it has ``min_requests`` scored
requests and the statistic crosses the policy's threshold:

- ``mean``: the running mean of the score falls below the threshold;
- ``ewma``: the EWMA of the score falls below the threshold (forgets old honest traffic);
- ``rejection_rate``: the generalised likelihood-ratio statistic of a binomial test of the
  client's rejection count against the honest rejection rate p0, n * KL(r/n || p0) when r/n > p0
  (0 otherwise), rises above the threshold;
- ``cusum``: Page's CUSUM for a downward shift of the score, S <- max(0, S + (ref - score)) with
  ref = honest mean - honest std / 2 (tuned to a shift of one honest standard deviation), rises
  above the threshold.

Thresholds are never hand-picked and never fitted to the traffic being judged: ``calibrate_policy``
replays simulated honest clients, each drawing ``horizon`` scores at random from the bundle's
held-out honest scores (all held-out images, the model's errors included), and sets the threshold
so that a share ``false_flag_rate`` of them is flagged within the horizon.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar, cast, get_args

import numpy as np
import numpy.typing as npt

PolicyKind = Literal["mean", "ewma", "rejection_rate", "cusum"]
FLAG_POLICIES: tuple[PolicyKind, ...] = get_args(PolicyKind)
# Statistics where a *low* value is suspicious (the others: a high value).
_LOW_IS_SUSPICIOUS: frozenset[PolicyKind] = frozenset({"mean", "ewma"})

# chosen by the rule in evaluation/simulate.py:choose_default, on the v2 demo bundle
DEFAULT_POLICY: PolicyKind = "ewma"
DEFAULT_MIN_REQUESTS = 10
DEFAULT_EWMA_ALPHA = 0.05
DEFAULT_FALSE_FLAG_RATE = 0.001
DEFAULT_HORIZON = 200
DEFAULT_CALIBRATION_CLIENTS = 20_000

Values = npt.NDArray[np.float64]
F = TypeVar("F", float, Values)


@dataclass(frozen=True)
class WindowParams:
    """How a window advances: the EWMA's weight and the CUSUM's reference value."""

    ewma_alpha: float = DEFAULT_EWMA_ALPHA
    cusum_reference: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.ewma_alpha <= 1.0:
            raise ValueError(f"ewma_alpha must be in (0, 1], got {self.ewma_alpha}")


@dataclass(frozen=True)
class ScoreWindow:
    """A client's statistics since its window started."""

    scored: int = 0
    mean: float = 0.0
    ewma: float = 0.0
    rejected: int = 0
    cusum: float = 0.0


def ewma_weight(alpha: float, scored: int) -> float:
    """Weight of the newest score in a bias-corrected EWMA after ``scored`` scores (1 at first)."""
    return alpha / (1.0 - (1.0 - alpha) ** scored)


def advance_arrays(
    scored: int,
    mean: F,
    ewma: F,
    rejected: F,
    cusum: F,
    score: F,
    rejected_now: F,
    params: WindowParams,
) -> tuple[F, F, F, F]:
    """One scored request: the new (mean, ewma, rejected, cusum); ``scored`` counts it already.

    Works on floats and on arrays of clients alike; the single definition of the update."""
    new_mean = mean + (score - mean) / scored
    new_ewma = ewma + ewma_weight(params.ewma_alpha, scored) * (score - ewma)
    new_rejected = rejected + rejected_now
    new_cusum = cast(F, np.maximum(0.0, cusum + (params.cusum_reference - score)))
    return new_mean, new_ewma, new_rejected, new_cusum


def advance_window(
    window: ScoreWindow, score: float, accepted: bool, params: WindowParams
) -> ScoreWindow:
    """The window after one more scored request."""
    scored = window.scored + 1
    mean, ewma, rejected, cusum = advance_arrays(
        scored,
        window.mean,
        window.ewma,
        float(window.rejected),
        window.cusum,
        float(score),
        0.0 if accepted else 1.0,
        params,
    )
    return ScoreWindow(scored, float(mean), float(ewma), round(rejected), float(cusum))


def rejection_glr(scored: int, rejected: F, null_rate: float) -> F:
    """n * KL(r/n || p0) where r/n > p0, else 0: the binomial test's log-likelihood ratio."""
    n = float(max(scored, 1))
    rate = np.clip(np.asarray(rejected, dtype=np.float64) / n, 0.0, 1.0)
    p0 = min(max(null_rate, 1e-9), 1.0 - 1e-9)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(rate > 0, rate * np.log(rate / p0), 0.0) + np.where(
            rate < 1, (1 - rate) * np.log((1 - rate) / (1 - p0)), 0.0
        )
    glr = np.where(rate > p0, n * kl, 0.0)
    result: Any = glr if isinstance(rejected, np.ndarray) else float(glr)
    return cast(F, result)


@dataclass(frozen=True)
class FlagPolicy:
    """A flagging decision rule: the statistic it reads and where it flags."""

    kind: PolicyKind
    threshold: float
    min_requests: int = DEFAULT_MIN_REQUESTS
    window: WindowParams = WindowParams()
    null_rejection_rate: float = 0.05  # p0 of the rejection-rate test

    def __post_init__(self) -> None:
        if self.kind not in FLAG_POLICIES:
            raise ValueError(f"unknown flag policy {self.kind!r}; one of {FLAG_POLICIES}")
        if self.min_requests < 1:
            raise ValueError("min_requests must be at least 1")
        if not 0.0 < self.null_rejection_rate < 1.0:
            raise ValueError("null_rejection_rate must be in (0, 1)")

    def statistic(self, window: ScoreWindow) -> float:
        return float(
            policy_statistic(
                self.kind,
                window.scored,
                window.mean,
                window.ewma,
                float(window.rejected),
                window.cusum,
                self.null_rejection_rate,
            )
        )

    def should_flag(self, window: ScoreWindow) -> bool:
        """Enough scored requests and the statistic past the threshold."""
        if window.scored < self.min_requests:
            return False
        return crosses(self.kind, self.statistic(window), self.threshold)


def policy_statistic(
    kind: PolicyKind, scored: int, mean: F, ewma: F, rejected: F, cusum: F, null_rate: float
) -> F:
    """The value a policy compares with its threshold."""
    if kind == "mean":
        return mean
    if kind == "ewma":
        return ewma
    if kind == "cusum":
        return cusum
    return rejection_glr(scored, rejected, null_rate)


def crosses(kind: PolicyKind, statistic: float, threshold: float) -> bool:
    """Whether ``statistic`` is past ``threshold`` in the policy's suspicious direction."""
    return statistic < threshold if kind in _LOW_IS_SUSPICIOUS else statistic > threshold


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class HonestTraffic:
    """What honest traffic scores, from the bundle's calibration."""

    scores: Values  # the predicted class's score for held-out images, errors included
    service_threshold: float  # the acceptance threshold in force

    @property
    def rejection_rate(self) -> float:
        return float(np.mean(self.scores < self.service_threshold))

    @property
    def cusum_reference(self) -> float:
        """Honest mean minus half an honest standard deviation: a CUSUM tuned to a 1-sigma drop."""
        return float(self.scores.mean() - 0.5 * self.scores.std())


def simulate_extremes(
    kind: PolicyKind,
    score_paths: Values,
    service_threshold: float,
    min_requests: int,
    window: WindowParams,
    null_rate: float,
) -> Values:
    """Per client (row of ``score_paths``), the most suspicious value its statistic reaches at or
    after ``min_requests`` scored requests: a client is flagged iff it crosses the threshold."""
    clients, horizon = score_paths.shape
    if horizon < min_requests:
        raise ValueError("the horizon is shorter than min_requests")
    mean = np.zeros(clients)
    ewma = np.zeros(clients)
    rejected = np.zeros(clients)
    cusum = np.zeros(clients)
    low = kind in _LOW_IS_SUSPICIOUS
    extreme = np.full(clients, np.inf if low else -np.inf)
    for step in range(horizon):
        scores = score_paths[:, step]
        mean, ewma, rejected, cusum = advance_arrays(
            step + 1,
            mean,
            ewma,
            rejected,
            cusum,
            scores,
            (scores < service_threshold).astype(np.float64),
            window,
        )
        if step + 1 >= min_requests:
            value = policy_statistic(kind, step + 1, mean, ewma, rejected, cusum, null_rate)
            extreme = np.minimum(extreme, value) if low else np.maximum(extreme, value)
    return extreme


def calibrate_policy(
    kind: PolicyKind,
    honest: HonestTraffic,
    *,
    min_requests: int = DEFAULT_MIN_REQUESTS,
    ewma_alpha: float = DEFAULT_EWMA_ALPHA,
    false_flag_rate: float = DEFAULT_FALSE_FLAG_RATE,
    horizon: int = DEFAULT_HORIZON,
    clients: int = DEFAULT_CALIBRATION_CLIENTS,
    seed: int = 0,
) -> FlagPolicy:
    """The policy whose threshold flags ``false_flag_rate`` of simulated honest clients within
    ``horizon`` requests (deterministic for a seed)."""
    if not 0.0 < false_flag_rate < 1.0:
        raise ValueError(f"false_flag_rate must be in (0, 1), got {false_flag_rate}")
    if honest.scores.size == 0:
        raise ValueError("cannot calibrate a flag policy on an empty score set")
    window = WindowParams(ewma_alpha=ewma_alpha, cusum_reference=honest.cusum_reference)
    null_rate = min(max(honest.rejection_rate, 1e-4), 0.5)
    rng = np.random.default_rng(seed)
    paths = rng.choice(honest.scores.astype(np.float64), size=(clients, horizon), replace=True)
    extremes = simulate_extremes(
        kind, paths, honest.service_threshold, min_requests, window, null_rate
    )
    level = false_flag_rate if kind in _LOW_IS_SUSPICIOUS else 1.0 - false_flag_rate
    threshold = float(np.quantile(extremes, level))
    return FlagPolicy(
        kind=kind,
        threshold=threshold,
        min_requests=min_requests,
        window=window,
        null_rejection_rate=null_rate,
    )


def with_threshold(policy: FlagPolicy, threshold: float) -> FlagPolicy:
    """The same policy with an operator's threshold."""
    return replace(policy, threshold=threshold)
