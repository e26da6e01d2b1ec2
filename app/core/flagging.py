"""Per-client flagging (paper, end of Section 5.1): the statistics, the policies, their thresholds.

Every scored request of a client advances its *window*, the statistics since the window started
(a cleared flag restarts it): the count, the running mean of the score, a bias-corrected EWMA,
the number of rejected predictions, a one-sided CUSUM, and a one-sided CUSUM of the client's drop
below its own running mean (``shift``). ``advance_window`` is the one update,
written once over numpy so that the in-process tracker (scalars) and the threshold calibration
(thousands of simulated clients at once) run the same arithmetic; the Redis tracker's Lua script
mirrors it and a test holds the two equal.

A policy reads one statistic of the window and flags a client once it has ``min_requests`` scored
requests and the statistic crosses the policy's threshold:

- ``mean``: the running mean of the score falls below the threshold;
- ``ewma``: the EWMA of the score falls below the threshold (forgets old honest traffic);
- ``ewma_anchored``: the textbook EWMA control chart (Roberts 1959), started at the honest mean
  mu0 instead of at the client's first score, falls below the threshold. From the same window:
  z_n = (1 - alpha)^n mu0 + (1 - (1 - alpha)^n) ewma_n. A fresh client's first requests no
  longer dominate it, so its threshold is not set by their noise and holds as tight for a client
  with a long honest history as for a new one;
- ``rejection_rate``: the generalised likelihood-ratio statistic of a binomial test of the
  client's rejection count against the honest rejection rate p0, n * KL(r/n || p0) when r/n > p0
  (0 otherwise), rises above the threshold;
- ``cusum``: Page's CUSUM for a downward shift of the score, S <- max(0, S + (ref - score)) with
  ref = honest mean - honest std / 2 (tuned to a shift of one honest standard deviation), rises
  above the threshold;
- ``ewma_shift``: ``ewma`` (its threshold), *or* the client's ``shift`` rising above a second
  threshold: S <- max(0, S + (m - k - score)), m the window's mean before the request, k half
  the honest standard deviation. ``cusum`` and ``ewma_anchored`` compare a client with the
  population's honest mean, so they flag honest clients of one error-prone class, whose own
  mean is lower; ``shift`` compares it with its own history, so it sees a client that attacks
  after an honest history (an API key used honestly, then for an attack: the default ``ewma``,
  weighed down by that history, is slow there) and stays quiet for a steady client of any
  class. A client that attacks from its first request has no history to drop from: ``ewma``
  flags it. Each threshold is calibrated at half the false-flag budget.

What a window averages is the request's *flag value*. With a ``ClassScale`` (bundles that store
the predicted class of their held-out honest scores) it is the score's empirical p-value among the
held-out honest scores of the same predicted class: scores differ by class, so a raw-score
threshold fitted on class-balanced traffic flags honest clients whose photos are all of a
low-scoring class, while per-class p-values of honest traffic predicted as any one class are
spread evenly over (0, 1]. Without one (older bundles, or ``flag_per_class`` off) it is the
guard's score itself.

Thresholds are never hand-picked and never fitted to the traffic being judged: ``calibrate_policy``
replays simulated honest clients, each drawing ``horizon`` requests at random from the bundle's
held-out honest scores (all held-out images, the model's errors included), and sets the threshold
so that a share ``false_flag_rate`` of them is flagged within the horizon.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar, cast, get_args

import numpy as np
import numpy.typing as npt

from app.core.detector import sorted_reference_p_values

PolicyKind = Literal["mean", "ewma", "ewma_anchored", "rejection_rate", "cusum", "ewma_shift"]
# what a policy compares with a threshold: its own statistic, and ``shift`` (ewma_shift's second)
StatisticKind = Literal["mean", "ewma", "ewma_anchored", "rejection_rate", "cusum", "shift"]
FLAG_POLICIES: tuple[PolicyKind, ...] = get_args(PolicyKind)
# Statistics where a *low* value is suspicious (the others: a high value).
_LOW_IS_SUSPICIOUS: frozenset[StatisticKind] = frozenset({"mean", "ewma", "ewma_anchored"})

# chosen by the rule in evaluation/simulate.py:choose_default, on the v2 demo bundle's per-class
# values: ewma until 2026-12-06, when ewma_shift was added as a candidate (rule 762b32e, fixed
# before its first run) and the rule picked it. On raw scores, which bundles without the classes
# use, no policy meets the rule's one-class budget (the same day), and ewma_shift flags the
# fewest one-class clients of the six: the default stays one constant
DEFAULT_POLICY: PolicyKind = "ewma_shift"
DEFAULT_MIN_REQUESTS = 10
DEFAULT_EWMA_ALPHA = 0.05
DEFAULT_FALSE_FLAG_RATE = 0.001
DEFAULT_HORIZON = 200
DEFAULT_CALIBRATION_CLIENTS = 20_000
# a class with fewer held-out honest predictions is ranked against all of them (its own p-values
# would move in steps of more than 5%)
MIN_CLASS_REFERENCE = 20

Values = npt.NDArray[np.float64]
F = TypeVar("F", float, Values)


@dataclass(frozen=True)
class WindowParams:
    """How a window advances: the EWMA's weight, the CUSUM's reference value and the shift's
    allowance (k: how far below its own mean a request must fall to count); and where the
    anchored EWMA starts (the honest mean; read by that statistic, not by the update)."""

    ewma_alpha: float = DEFAULT_EWMA_ALPHA
    cusum_reference: float = 0.0
    anchor: float = 0.0
    shift_allowance: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.ewma_alpha <= 1.0:
            raise ValueError(f"ewma_alpha must be in (0, 1], got {self.ewma_alpha}")


@dataclass(frozen=True, slots=True)
class ScoreWindow:
    """A client's statistics since its window started. Slotted: the in-process tracker keeps one
    per client, and the sixth statistic (shift) took a dict-backed window from 542 to 590 bytes
    a client (`advguard bench client_rotation`, 100,000 ids, 2026-12-06); slotted, 526."""

    scored: int = 0
    mean: float = 0.0
    ewma: float = 0.0
    rejected: int = 0
    cusum: float = 0.0
    shift: float = 0.0  # the CUSUM of the drop below the client's own running mean


def ewma_weight(alpha: float, scored: int) -> float:
    """Weight of the newest score in a bias-corrected EWMA after ``scored`` scores (1 at first)."""
    return alpha / (1.0 - (1.0 - alpha) ** scored)


def advance_arrays(
    scored: int,
    mean: F,
    ewma: F,
    rejected: F,
    cusum: F,
    shift: F,
    score: F,
    rejected_now: F,
    params: WindowParams,
) -> tuple[F, F, F, F, F]:
    """One scored request: the new (mean, ewma, rejected, cusum, shift); ``scored`` counts it
    already. The shift compares the request with the mean of the requests before it (none for
    the first: no increment).

    Works on floats and on arrays of clients alike; the single definition of the update."""
    new_mean = mean + (score - mean) / scored
    new_ewma = ewma + ewma_weight(params.ewma_alpha, scored) * (score - ewma)
    new_rejected = rejected + rejected_now
    new_cusum = cast(F, np.maximum(0.0, cusum + (params.cusum_reference - score)))
    drop = (mean - params.shift_allowance - score) if scored > 1 else 0.0 * score
    new_shift = cast(F, np.maximum(0.0, shift + drop))
    return new_mean, new_ewma, new_rejected, new_cusum, new_shift


def advance_window(
    window: ScoreWindow, score: float, accepted: bool, params: WindowParams
) -> ScoreWindow:
    """The window after one more scored request."""
    scored = window.scored + 1
    mean, ewma, rejected, cusum, shift = advance_arrays(
        scored,
        window.mean,
        window.ewma,
        float(window.rejected),
        window.cusum,
        window.shift,
        float(score),
        0.0 if accepted else 1.0,
        params,
    )
    return ScoreWindow(
        scored, float(mean), float(ewma), round(rejected), float(cusum), float(shift)
    )


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


@dataclass(frozen=True, eq=False)
class ClassScale:
    """A request's flag value: its score's empirical p-value among the held-out honest scores of
    its predicted class (``app.core.detector``'s p-value, the one definition), or among all of
    them for a class with fewer than ``MIN_CLASS_REFERENCE`` held-out predictions."""

    by_class: dict[int, Values]  # predicted class -> its honest scores, finite, sorted
    pooled: Values  # every finite honest score, sorted

    @staticmethod
    def fit(
        scores: Values, predictions: npt.NDArray[np.int64], min_class: int = MIN_CLASS_REFERENCE
    ) -> ClassScale:
        if scores.shape != predictions.shape or scores.ndim != 1:
            raise ValueError("one predicted class per honest score is needed")
        finite = np.isfinite(scores)
        if not finite.any():
            raise ValueError("cannot fit a class scale on no finite honest score")
        values, classes = scores[finite].astype(np.float64), predictions[finite]
        counts = np.bincount(classes) if classes.size else np.zeros(0, dtype=np.int64)
        by_class = {
            int(c): np.sort(values[classes == c])
            for c in np.flatnonzero(counts >= max(min_class, 1))
        }
        return ClassScale(by_class, np.sort(values))

    def reference(self, predicted: int) -> Values:
        return self.by_class.get(predicted, self.pooled)

    def values(self, scores: Values, predictions: npt.NDArray[np.int64]) -> Values:
        """(n,) flag values of fresh scores: p = (1 + #{reference <= score}) / (1 + #reference)."""
        out = np.empty(scores.shape, dtype=np.float64)
        for predicted in np.unique(predictions):
            rows = predictions == predicted
            out[rows] = sorted_reference_p_values(scores[rows], self.reference(int(predicted)))
        return out

    def value(self, score: float, predicted: int) -> float:
        """One request's flag value (the service's path: no grouping by class)."""
        return float(sorted_reference_p_values(np.array([score]), self.reference(predicted))[0])

    def held_out_values(self, scores: Values, predictions: npt.NDArray[np.int64]) -> Values:
        """The flag values of the scores this scale was fitted on, each ranked among the others
        (leave one out), as a fresh honest image of its class is ranked: counting a score in its
        own reference would make honest traffic look more ordinary than it is."""
        out = self.values(scores, predictions)  # (1 + a) / (1 + n), a counts the score itself
        for predicted in np.unique(predictions):
            rows = (predictions == predicted) & np.isfinite(scores)
            n = self.reference(int(predicted)).size
            if n > 1:
                counted = np.round(out[rows] * (1 + n)) - 1  # a, itself included
                out[rows] = (1 + np.maximum(counted - 1, 0)) / n
        return out


@dataclass(frozen=True)
class FlagPolicy:
    """A flagging decision rule: the statistic it reads and where it flags, and the scale that
    turns a request's score into the value the statistics average (None: the score itself).
    ``shift_threshold``: ewma_shift's second threshold, on the window's ``shift`` (the other
    policies have none)."""

    kind: PolicyKind
    threshold: float
    min_requests: int = DEFAULT_MIN_REQUESTS
    window: WindowParams = WindowParams()
    null_rejection_rate: float = 0.05  # p0 of the rejection-rate test
    scale: ClassScale | None = field(default=None, compare=False)
    shift_threshold: float | None = None

    def flag_value(self, score: float, predicted: int) -> float:
        """What a scored request adds to its client's window."""
        return score if self.scale is None else self.scale.value(score, predicted)

    def flag_values(self, scores: Values, predictions: npt.NDArray[np.int64]) -> Values:
        """``flag_value`` of many requests at once (the same values)."""
        return scores if self.scale is None else self.scale.values(scores, predictions)

    def __post_init__(self) -> None:
        if self.kind not in FLAG_POLICIES:
            raise ValueError(f"unknown flag policy {self.kind!r}; one of {FLAG_POLICIES}")
        if self.min_requests < 1:
            raise ValueError("min_requests must be at least 1")
        if not 0.0 < self.null_rejection_rate < 1.0:
            raise ValueError("null_rejection_rate must be in (0, 1)")
        if (self.kind == "ewma_shift") != (self.shift_threshold is not None):
            raise ValueError("ewma_shift, and only it, needs a shift threshold")

    def statistic(self, window: ScoreWindow) -> float:
        """The policy's first statistic (ewma_shift's: the EWMA; ``shift`` is the window's)."""
        return self._statistic(self.thresholds()[0][0], window)

    def _statistic(self, kind: StatisticKind, window: ScoreWindow) -> float:
        return float(
            policy_statistic(
                kind,
                window.scored,
                window.mean,
                window.ewma,
                float(window.rejected),
                window.cusum,
                window.shift,
                self.null_rejection_rate,
                self.window,
            )
        )

    def should_flag(self, window: ScoreWindow) -> bool:
        """Enough scored requests and a statistic past its threshold."""
        if window.scored < self.min_requests:
            return False
        return any(
            crosses(kind, self._statistic(kind, window), threshold)
            for kind, threshold in self.thresholds()
        )

    def thresholds(self) -> list[tuple[StatisticKind, float]]:
        """Each statistic the policy reads, with its threshold."""
        if self.kind == "ewma_shift":
            assert self.shift_threshold is not None  # __post_init__
            return [("ewma", self.threshold), ("shift", self.shift_threshold)]
        return [(self.kind, self.threshold)]


def policy_statistic(
    kind: StatisticKind,
    scored: int,
    mean: F,
    ewma: F,
    rejected: F,
    cusum: F,
    shift: F,
    null_rate: float,
    window: WindowParams,
) -> F:
    """The value a statistic compares with its threshold."""
    if kind == "ewma":
        return ewma
    if kind == "mean":
        return mean
    if kind == "ewma_anchored":
        prior = (1.0 - window.ewma_alpha) ** scored  # the anchor's weight left after n scores
        return prior * window.anchor + (1.0 - prior) * ewma
    if kind == "cusum":
        return cusum
    if kind == "shift":
        return shift
    return rejection_glr(scored, rejected, null_rate)


def crosses(kind: StatisticKind, statistic: float, threshold: float) -> bool:
    """Whether ``statistic`` is past ``threshold`` in the statistic's suspicious direction."""
    return statistic < threshold if kind in _LOW_IS_SUSPICIOUS else statistic > threshold


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class HonestTraffic:
    """What honest traffic scores, from the bundle's calibration."""

    scores: Values  # the predicted class's score for held-out images, errors included
    service_threshold: float  # the acceptance threshold in force
    # each score's predicted class: given, the policy reads per-class flag values (``ClassScale``)
    predictions: npt.NDArray[np.int64] | None = None

    @property
    def rejection_rate(self) -> float:
        return float(np.mean(self.scores < self.service_threshold))

    def scale(self) -> ClassScale | None:
        if self.predictions is None:
            return None
        return ClassScale.fit(self.scores.astype(np.float64), self.predictions)

    def flag_values(self, scale: ClassScale | None) -> Values:
        """What each held-out request would add to a window: its score, or its leave-one-out
        per-class p-value."""
        if scale is None or self.predictions is None:
            return self.scores.astype(np.float64)
        return scale.held_out_values(self.scores.astype(np.float64), self.predictions)


def shift_allowance(flag_values: Values) -> float:
    """Half an honest standard deviation: the allowance of a CUSUM tuned to a drop of one
    standard deviation (the shift's, below the client's own mean; the CUSUM's, below the honest
    mean: ``cusum_reference``)."""
    return float(0.5 * flag_values.std())


def cusum_reference(flag_values: Values) -> float:
    """Honest mean minus half an honest standard deviation: a CUSUM tuned to a 1-sigma drop."""
    return float(flag_values.mean() - shift_allowance(flag_values))


def simulate_extremes(
    kind: StatisticKind,
    value_paths: Values,
    rejected_paths: npt.NDArray[np.bool_],
    min_requests: int,
    window: WindowParams,
    null_rate: float,
) -> Values:
    """Per client (row of ``value_paths``: its requests' flag values; ``rejected_paths``: whether
    the service rejected each), the most suspicious value statistic ``kind`` reaches at or after
    ``min_requests`` scored requests: a client is flagged iff it crosses the threshold."""
    clients, horizon = value_paths.shape
    if rejected_paths.shape != value_paths.shape:
        raise ValueError("one rejection per flag value is needed")
    if horizon < min_requests:
        raise ValueError("the horizon is shorter than min_requests")
    # mean, ewma, rejected, cusum, shift: one array of clients each
    state: tuple[Values, Values, Values, Values, Values] = (np.zeros(clients),) * 5
    low = kind in _LOW_IS_SUSPICIOUS
    extreme = np.full(clients, np.inf if low else -np.inf)
    for step in range(horizon):
        rejected_now = rejected_paths[:, step].astype(np.float64)
        state = advance_arrays(step + 1, *state, value_paths[:, step], rejected_now, window)
        if step + 1 >= min_requests:
            value = policy_statistic(kind, step + 1, *state, null_rate, window)
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
    ``horizon`` requests (deterministic for a seed); per-class flag values when ``honest`` has
    its predicted classes. A policy of two statistics (ewma_shift) gets a threshold for each at
    half the rate, on the same simulated clients: together they flag at most the rate."""
    if not 0.0 < false_flag_rate < 1.0:
        raise ValueError(f"false_flag_rate must be in (0, 1), got {false_flag_rate}")
    if honest.scores.size == 0:
        raise ValueError("cannot calibrate a flag policy on an empty score set")
    scale = honest.scale()
    flag_values = honest.flag_values(scale)
    window = WindowParams(
        ewma_alpha=ewma_alpha,
        cusum_reference=cusum_reference(flag_values),
        anchor=float(flag_values.mean()),
        shift_allowance=shift_allowance(flag_values),
    )
    null_rate = min(max(honest.rejection_rate, 1e-4), 0.5)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, honest.scores.size, size=(clients, horizon))
    value_paths = flag_values[drawn]
    rejected_paths = honest.scores[drawn] < honest.service_threshold
    statistics: tuple[StatisticKind, ...] = ("ewma", "shift") if kind == "ewma_shift" else (kind,)
    rate = false_flag_rate / len(statistics)
    thresholds = []
    for statistic in statistics:
        extremes = simulate_extremes(
            statistic, value_paths, rejected_paths, min_requests, window, null_rate
        )
        level = rate if statistic in _LOW_IS_SUSPICIOUS else 1.0 - rate
        thresholds.append(float(np.quantile(extremes, level)))
    return FlagPolicy(
        kind=kind,
        threshold=thresholds[0],
        min_requests=min_requests,
        window=window,
        null_rejection_rate=null_rate,
        scale=scale,
        shift_threshold=thresholds[1] if len(thresholds) > 1 else None,
    )


def with_threshold(policy: FlagPolicy, threshold: float) -> FlagPolicy:
    """The same policy with an operator's threshold."""
    return replace(policy, threshold=threshold)
