"""The detector: statistics of a query's features -> one score per query -> accept or reject.

One design covers every bundle:

- the paper's detector is one statistic (the DW-kNN vote of the last layer) with no
  combination: the score *is* the vote, thresholded on held-out authentic images;
- a combined detector turns each statistic (``app.core.statistics``: votes, Mahalanobis and
  class-conditional kNN distances at any layers) into an empirical p-value against the
  statistic's values on held-out authentic images (the *reference* part), and combines them
  (Fisher, harmonic mean, or Tippett's minimum). Its threshold on the combined value comes from a
  *different* held-out part, so the retention it advertises holds on unseen images.

Score conventions: every statistic is "higher = more authentic"; every combined score is a
p-value-like number in (0, 1], higher = more authentic. A prediction is accepted when its score is
at or above the bundle's threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from app.core.statistics import DOUBTED_SHARE, NOT_DOUBTED, Statistic, statistic_name

Combination = Literal["single", "fisher", "hmp", "min_p"]
COMBINATIONS: tuple[Combination, ...] = ("single", "fisher", "hmp", "min_p")


def empirical_p_values(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(n,) p-value of each value against authentic reference values: low values are unusual.

    p = (1 + #{reference <= value}) / (1 + #reference), in (0, 1]. A value that is not finite
    (NaN, or +inf: an overflow, say of fp16 logits) was not measured, and gets the smallest
    p-value, 1 / (1 + #reference), like -inf: the guard rejects what it cannot measure. Sorted
    as numbers, NaN and +inf would rank above every reference value, p = 1, the most authentic.
    """
    return sorted_reference_p_values(values, np.sort(reference.astype(np.float64)))


def sorted_reference_p_values(values: np.ndarray, ordered: np.ndarray) -> np.ndarray:
    """``empirical_p_values`` against a reference already sorted ascending (float64): what a
    detector, which sorts its reference once, computes for every batch."""
    measured = values.astype(np.float64)
    at_or_below = np.searchsorted(ordered, measured, side="right")
    at_or_below[~np.isfinite(measured)] = 0
    p_values: np.ndarray = (1.0 + at_or_below) / (1.0 + ordered.size)
    return p_values


def fisher_combination(p_values: np.ndarray) -> np.ndarray:
    """(n, L) p-values -> (n,) combined p-value by Fisher's method.

    T = -2 sum_l log p_l follows chi2 with 2L degrees of freedom when the p-values are
    independent and uniform; its survival function has the closed form
    exp(-T/2) sum_{j<L} (T/2)^j / j!. Layers of one network are not independent, so the result
    is used as a monotone combined score (thresholded on held-out images), not as a probability.
    """
    half = -np.log(np.clip(p_values.astype(np.float64), 1e-300, 1.0)).sum(axis=1)
    term = np.ones_like(half)
    total = np.ones_like(half)
    for j in range(1, p_values.shape[1]):
        term = term * half / j
        total = total + term
    combined: np.ndarray = np.clip(np.exp(-half) * total, 0.0, 1.0)
    return combined


def harmonic_mean_p(p_values: np.ndarray) -> np.ndarray:
    """(n, L) -> (n,) the equally weighted harmonic mean p-value L / sum_l 1/p_l (Wilson 2019).

    Valid under any dependence up to a small factor, and dominated by the smallest p-values
    without being decided by one alone: a robust choice for correlated layers of one network.
    """
    p = np.clip(p_values.astype(np.float64), 1e-300, 1.0)
    combined: np.ndarray = p.shape[1] / (1.0 / p).sum(axis=1)
    return combined


def tippett_combination(p_values: np.ndarray) -> np.ndarray:
    """(n, L) -> (n,) Tippett's minimum-p: 1 - (1 - min_l p_l)^L."""
    smallest = np.clip(p_values.astype(np.float64), 0.0, 1.0).min(axis=1)
    with np.errstate(divide="ignore"):  # min p = 1: log1p(-1) = -inf, and the result is 1
        combined: np.ndarray = -np.expm1(p_values.shape[1] * np.log1p(-smallest))
    return combined


def combine_p_values(p_values: np.ndarray, combination: Combination) -> np.ndarray:
    if combination == "fisher":
        return fisher_combination(p_values)
    if combination == "hmp":
        return harmonic_mean_p(p_values)
    if combination == "min_p":
        return tippett_combination(p_values)
    raise ValueError(f"combination {combination!r} does not combine p-values")


@dataclass(frozen=True)
class Evidence:
    """Everything the detector computed for a batch: per statistic and combined."""

    names: list[str]
    values: np.ndarray  # (n, S) raw statistics, higher = more authentic
    p_values: np.ndarray | None  # (n, S); None for a single statistic
    scores: np.ndarray  # (n,) the combined score the threshold applies to


# Computes the second-pass layers a detector defers (``Detector.deferred_layers``) for the rows
# a boolean mask marks: layer -> (n, d) values, NaN in the other rows.
LookAgain = Callable[[np.ndarray], Mapping[str, np.ndarray]]


class Detector:
    """Statistics -> (p-values -> combination) -> one score per query.

    A ``suspect_margin`` statistic is read only for *suspect* queries: those whose combination
    of the detector's other statistics falls below ``suspect_gate``, the ``DOUBTED_SHARE``
    quantile of the reference part's own such values; every other query's p-value for it is 1.
    Its reference column is gated the same way (``NOT_DOUBTED`` for the reference images that
    are not suspects), so a suspect's p-value ranks it among the reference's suspects and above
    every other reference image, as a ``doubt_margin``'s does. The gate is fitted here, from the
    raw reference, so that a subset (``subset``) fits its own.

    Not thread-safe when an index lives on a GPU: one thread must own a Detector.
    """

    def __init__(
        self,
        statistics: Sequence[Statistic],
        combination: Combination = "single",
        reference: np.ndarray | None = None,
    ) -> None:
        if not statistics:
            raise ValueError("a detector needs at least one statistic")
        if combination not in COMBINATIONS:
            raise ValueError(f"unknown combination {combination!r}; use one of {COMBINATIONS}")
        if combination == "single":
            if len(statistics) != 1:
                raise ValueError("combination 'single' takes exactly one statistic")
        else:
            if reference is None or reference.ndim != 2 or reference.shape[1] != len(statistics):
                raise ValueError("a combination needs (n, statistics) reference values")
            if reference.shape[0] == 0:
                raise ValueError("empty reference values")
        self.statistics = list(statistics)
        self.combination: Combination = combination
        self.suspect_columns = [
            i for i, statistic in enumerate(self.statistics) if statistic.kind == "suspect_margin"
        ]
        self.plain_columns = [
            i for i in range(len(self.statistics)) if i not in self.suspect_columns
        ]
        if self.suspect_columns and (combination == "single" or not self.plain_columns):
            raise ValueError("a suspect_margin needs other statistics and a combination")
        self.raw_reference: np.ndarray | None = None  # as given, rows aligned (``subset``)
        self.reference: np.ndarray | None = None  # sorted per column, suspects gated
        self.suspect_gate: float | None = None
        if reference is not None:
            self.raw_reference = reference.astype(np.float64)
            self.reference = np.sort(self.raw_reference, axis=0)
            if self.suspect_columns:
                self._gate_suspects(self.raw_reference)

    def _gate_suspects(self, raw: np.ndarray) -> None:
        """Fit ``suspect_gate`` on the reference rows' combination of the other statistics and
        gate the suspect columns of the sorted reference with it."""
        assert self.reference is not None
        first = self._first_stage(raw)
        self.suspect_gate = float(np.quantile(first, DOUBTED_SHARE))
        gated = raw[:, self.suspect_columns].copy()
        gated[first >= self.suspect_gate] = NOT_DOUBTED
        self.reference[:, self.suspect_columns] = np.sort(gated, axis=0)

    def _first_stage(self, values: np.ndarray) -> np.ndarray:
        """(n,) the combination of the statistics other than the suspect margins."""
        assert self.reference is not None
        p_values = np.stack(
            [
                sorted_reference_p_values(values[:, i], self.reference[:, i])
                for i in self.plain_columns
            ],
            axis=1,
        )
        return combine_p_values(p_values, self.combination)

    def suspects(self, values: np.ndarray) -> np.ndarray:
        """(n,) bool: the queries whose suspect margins the detector reads (none without a
        ``suspect_margin``). Only the other statistics' columns of ``values`` are read."""
        if not self.suspect_columns:
            return np.zeros(values.shape[0], dtype=bool)
        suspect: np.ndarray = self._first_stage(values) < self.suspect_gate
        return suspect

    @property
    def deferred_layers(self) -> list[str]:
        """Layers only suspect margins read: a network may compute them for the suspects alone
        (``values``' ``look_again``)."""
        others = {self.statistics[i].layer_name for i in self.plain_columns}
        suspect = [self.statistics[i].layer_name for i in self.suspect_columns]
        return [layer for layer in dict.fromkeys(suspect) if layer not in others]

    @property
    def names(self) -> list[str]:
        return [statistic_name(s) for s in self.statistics]

    @property
    def layers(self) -> list[str]:
        """Feature layers the statistics read, in first-use order."""
        return list(dict.fromkeys(s.layer_name for s in self.statistics))

    def values(
        self,
        features: Mapping[str, np.ndarray],
        classes: np.ndarray,
        look_again: LookAgain | None = None,
    ) -> np.ndarray:
        """(n, S) every statistic of ``classes[i]`` (the predicted class) for query i. A layer
        that only suspect margins read may be missing from ``features``: ``look_again``
        computes it for the suspects (NaN elsewhere), once the other statistics are known."""
        out = np.empty((classes.shape[0], len(self.statistics)))
        for i in self.plain_columns:
            out[:, i] = self.statistics[i].values(features, classes)
        missing = [layer for layer in self.deferred_layers if layer not in features]
        if missing:
            if look_again is None:
                raise ValueError(f"no {missing} features, and nothing to compute them with")
            features = {**features, **look_again(self.suspects(out))}
        for i in self.suspect_columns:
            out[:, i] = self.statistics[i].values(features, classes)
        return out

    def p_values(self, values: np.ndarray) -> np.ndarray:
        return self._p_values_and_suspects(values)[0]

    def _p_values_and_suspects(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``p_values`` and ``suspects``, the suspects' first stage computed once."""
        if self.reference is None:
            raise ValueError("a single-statistic detector has no reference values")
        reference = self.reference  # sorted per column when the detector was made
        p_values = np.stack(
            [
                sorted_reference_p_values(values[:, i], reference[:, i])
                for i in range(values.shape[1])
            ],
            axis=1,
        )
        suspects = np.zeros(values.shape[0], dtype=bool)
        if self.suspect_columns:  # the others' suspect margins are not read: p = 1
            # the first stage from the plain columns' p-values just computed, not again
            first = combine_p_values(p_values[:, self.plain_columns], self.combination)
            suspects = first < self.suspect_gate
            p_values[np.ix_(~suspects, np.array(self.suspect_columns))] = 1.0
        return p_values, suspects

    def combine(self, values: np.ndarray) -> np.ndarray:
        """(n, S) statistics -> (n,) score."""
        if self.combination == "single":
            return values[:, 0].astype(np.float64)
        return combine_p_values(self.p_values(values), self.combination)

    def score(
        self,
        features: Mapping[str, np.ndarray],
        classes: np.ndarray,
        look_again: LookAgain | None = None,
    ) -> np.ndarray:
        """(n,) the score of ``classes[i]`` for query i: what the threshold applies to."""
        return self.combine(self.values(features, classes, look_again))

    def evidence(
        self,
        features: Mapping[str, np.ndarray],
        classes: np.ndarray,
        look_again: LookAgain | None = None,
    ) -> Evidence:
        values = self.values(features, classes, look_again)
        if self.combination == "single":
            return Evidence(self.names, values, None, self.combine(values))
        p_values, suspects = self._p_values_and_suspects(values)  # once: the score combines these
        if self.suspect_columns:  # shown as not read, as a doubt_margin's are
            values[np.ix_(~suspects, np.array(self.suspect_columns))] = NOT_DOUBTED
        return Evidence(self.names, values, p_values, combine_p_values(p_values, self.combination))

    def subset(self, columns: Sequence[int], combination: Combination | None = None) -> Detector:
        """The detector made of some of these statistics (ablations; same reference rows)."""
        chosen = [self.statistics[i] for i in columns]
        how = combination or self.combination
        if len(chosen) == 1 and combination is None:
            how = "single"
        reference = None if self.raw_reference is None else self.raw_reference[:, list(columns)]
        return Detector(chosen, how, reference if how != "single" else None)
