"""The match rule, pure: which earlier queries are near-duplicates of a query, how they are
counted per client and across every client, and when the counts flag a query attack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class MatchCount:
    """Distinct near-duplicates of a query among some earlier queries, and its exact copies."""

    distinct: int
    exact: int
    best: float  # highest similarity among the near-duplicates (-inf when none)


def near_duplicates(
    similarities: npt.NDArray[np.float64], threshold: float
) -> npt.NDArray[np.bool_]:
    """The match rule's one test: which earlier queries are near-duplicates of the query."""
    return similarities >= threshold


def count_matches(
    similarities: npt.NDArray[np.float64],
    digests: Sequence[bytes],
    own_digest: bytes,
    threshold: float,
) -> MatchCount:
    """The match rule, pure: earlier queries with ``similarity >= threshold`` are near-duplicates;
    those with the query's own pixels (``own_digest``) are exact copies, which count apart (an
    honest resend is not a probe), and copies among the others count once."""
    return _count_rows(
        near_duplicates(similarities, threshold).nonzero()[0], similarities, digests, own_digest
    )


def _count_rows(
    matched: npt.NDArray[np.intp],
    similarities: npt.NDArray[np.float64],
    digests: Sequence[bytes],
    own_digest: bytes,
) -> MatchCount:
    """``count_matches`` of the given matched rows."""
    distinct: set[bytes] = set()
    exact = 0
    best = -np.inf
    for i in matched.tolist():
        if digests[i] == own_digest:
            exact += 1
            continue
        distinct.add(digests[i])
        best = max(best, float(similarities[i]))
    return MatchCount(len(distinct), exact, best)


@dataclass(frozen=True)
class Answer:
    """The compact answer served for a query, kept beside its fingerprint: under the ``silent``
    policy a detected query is served its anchor's answer (the earliest stored near-duplicate),
    so that neither a refusal nor a changed label tells the attacker it was detected (OARS,
    CCS 2023)."""

    decision: Literal["accepted", "rejected", "unguarded"]
    class_index: int
    probability: float
    score: float


@dataclass(frozen=True)
class MatchEvidence:
    """What one query matched: the counts the rule reads, and who sent the matching queries."""

    client: MatchCount  # among the same client's recent queries
    everyone: MatchCount  # among all clients' recent queries (the client's own included)
    other_clients: tuple[str, ...]  # other senders of near-duplicates (at most MAX_EVIDENCE_IDS)
    anchor: Answer | None = None  # the answer kept with the earliest near-duplicate or copy
    # the consistent count's matches: near-duplicates or close copies (None: near-duplicates only)
    consistency: Consistency | None = None

    def consistency_basis(self) -> Consistency:
        """What the consistent count reads: the close copies' evidence when the store gave it,
        else the near-duplicates' (a scheme without close copies)."""
        if self.consistency is not None:
            return self.consistency
        return Consistency(max(self.client.distinct, self.everyone.distinct), self.anchor)


@dataclass(frozen=True)
class Consistency:
    """The consistent count's evidence: distinct near-duplicates or close copies (the larger of
    the two scopes' counts), and the answer kept with the earliest of them or of the copies."""

    distinct: int
    anchor: Answer | None


MAX_EVIDENCE_IDS = 16


NO_COUNT = MatchCount(0, 0, -np.inf)


@dataclass(frozen=True)
class ScopeMatch:
    """The matches of a query in one scope (its client's queries, or everyone's)."""

    count: MatchCount
    others: tuple[str, ...]  # other senders of near-duplicates, oldest first
    anchor: Answer | None  # the answer kept with the earliest match (near-duplicate or copy)
    anchor_at: float  # when that match was stored (inf when none)
    # the same over near-duplicates *or close copies* (the consistent count's matches)
    loose: MatchCount = NO_COUNT
    loose_anchor: Answer | None = None
    loose_anchor_at: float = np.inf


NO_MATCH = ScopeMatch(NO_COUNT, (), None, np.inf)


def summarise_matches(
    similarities: npt.NDArray[np.float64],
    digests: Sequence[bytes],
    clients: Sequence[str],
    answers: Sequence[Answer | None],
    own_digest: bytes,
    client_id: str,
    threshold: float,
    stored_at: npt.NDArray[np.float64],
    close: npt.NDArray[np.bool_] | None = None,
) -> ScopeMatch:
    """Every store's one summary of a query against its *live* earlier queries of one scope,
    given oldest first: the rule's counts (``count_matches``), the other senders and the anchor;
    with ``close`` (which of them are close copies: ``Scheme.close``), the same count and anchor
    over near-duplicates or close copies, for the consistent count. Which entries are live is
    the store's business; what a match is, and what it counts, is decided here only."""
    near = near_duplicates(similarities, threshold)
    matched_rows = near.nonzero()[0]
    count = _count_rows(matched_rows, similarities, digests, own_digest)
    loose_rows = matched_rows if close is None else (near | close).nonzero()[0]
    loose, loose_anchor, loose_at = count, None, np.inf
    if len(loose_rows):
        if len(loose_rows) > len(matched_rows):  # close copies beside the near-duplicates
            loose = _count_rows(loose_rows, similarities, digests, own_digest)
        loose_first = int(loose_rows[stored_at[loose_rows].argmin()])
        loose_anchor, loose_at = answers[loose_first], float(stored_at[loose_first])
    if len(matched_rows) == 0:
        return ScopeMatch(count, (), None, np.inf, loose, loose_anchor, loose_at)
    # the earliest stored; ties: the first given (argmin's first minimum), the oldest stored
    first = int(matched_rows[stored_at[matched_rows].argmin()])
    matched = matched_rows.tolist()
    others: list[str] = []
    for i in matched:
        sender = clients[i]
        if sender != client_id and sender not in others:
            others.append(sender)
            if len(others) == MAX_EVIDENCE_IDS:
                break
    return ScopeMatch(
        count,
        tuple(others),
        answers[first],
        float(stored_at[first]),
        loose,
        loose_anchor,
        loose_at,
    )


def evidence_of(client: ScopeMatch, everyone: ScopeMatch) -> MatchEvidence:
    """Both scopes' matches as the rule's evidence; each anchor is the earlier of the two."""
    anchor = client.anchor if client.anchor_at < everyone.anchor_at else everyone.anchor
    loose_anchor = (
        client.loose_anchor
        if client.loose_anchor_at < everyone.loose_anchor_at
        else everyone.loose_anchor
    )
    consistency = Consistency(max(client.loose.distinct, everyone.loose.distinct), loose_anchor)
    return MatchEvidence(client.count, everyone.count, everyone.others, anchor, consistency)


def changes_answer(
    evidence: MatchEvidence, answer: Answer | None, include_rejected: bool = False
) -> bool:
    """Whether ``answer`` would tell its client a class other than the one the model gave the
    query's anchor (its earliest stored near-duplicate or copy, whatever that query's decision):
    the answer carries a class (accepted, or the guard is off) and the anchor's class differs.
    A query attack is exactly a search for such a near-duplicate; an honest edit of a photo
    rarely is one. ``include_rejected``: a rejected answer counts too, by the class the model
    gave it (the client hears no class, but hears that something changed: a decision-based
    attack reads the rejection as its signal)."""
    anchor = evidence.anchor
    return (
        answer is not None
        and (include_rejected or answer.decision != "rejected")
        and anchor is not None
        and anchor.class_index != answer.class_index
    )


def shows_another_class(anchor: Answer | None, answer: Answer | None) -> bool:
    """Whether ``answer`` would show its client a class that its anchor's answer did not show:
    the answer carries a class (accepted, or the guard is off) and the anchor was rejected (no
    class shown) or carried another. Beside ``changes_answer``, it catches a Square probe that
    the guard rejected with the wrong class, followed by a near-copy accepted with that class
    (five of Square's successes under ``refuse`` on 2026-12-01)."""
    return (
        answer is not None
        and answer.decision != "rejected"
        and anchor is not None
        and (anchor.decision == "rejected" or anchor.class_index != answer.class_index)
    )


DetectionReason = Literal["client_matches", "global_matches", "changed_answer", "blend"]
DETECTION_REASONS: tuple[DetectionReason, ...] = get_args(DetectionReason)


@dataclass(frozen=True)
class DetectionRule:
    """Flag a query with at least ``client_matches`` distinct near-duplicates among its client's
    recent queries, or at least ``global_matches`` among everyone's. The second catches an attack
    spread over many client ids; it is higher because a viral photo's circulating versions are
    near-duplicates of each other across clients.

    With ``changed_matches``, also flag a query whose answer would change the class its anchor
    got (``changes_answer``) once it has that many distinct near-duplicates in either scope. A
    score-based attack (Square) can succeed in its first few queries, before any count reaches
    its threshold; the query that would succeed is the one whose class changes, and it is
    screened before it is answered. All thresholds are calibrated on honest traffic.

    With ``consistent_matches``, a query that is *not* detected but whose answer would show a
    class its anchor's did not (``shows_another_class``), with that many distinct
    near-duplicates or close copies (``close_copies``: Square's first probe is one), is served
    the anchor's answer instead (``keeps_anchor``; the service does so under ``refuse`` and
    ``silent``): nobody is flagged or refused, so it needs no calibration, and an attack's
    probe that would newly succeed before the counts reach ``changed_matches`` hears what its
    anchor heard. An honest near-exact copy of a photo hears what the photo got (the answers it
    replaces: evaluation.consistency_cost).

    ``changed_includes_rejected`` (off by default; an experiment of 2026-12-07): the changed
    answer also counts a query the guard would reject whose model class differs from its
    anchor's (``changes_answer``'s ``include_rejected``). Measured: HopSkipJump flagged a
    median of one query earlier, honest bursts flagged one over the calibration budget (21 of
    4,000 against 20): so not the default (evaluation/README.md)."""

    client_matches: int
    global_matches: int
    changed_matches: int | None = None
    consistent_matches: int | None = None
    changed_includes_rejected: bool = False

    def __post_init__(self) -> None:
        if self.client_matches < 1 or self.global_matches < 1:
            raise ValueError("match counts must be at least 1")
        if self.changed_matches is not None and self.changed_matches < 1:
            raise ValueError("changed_matches must be at least 1 (None: off)")
        if self.consistent_matches is not None and self.consistent_matches < 1:
            raise ValueError("consistent_matches must be at least 1 (None: off)")

    def detects(self, evidence: MatchEvidence, answer: Answer | None = None) -> bool:
        """``answer``: the one the query is about to be given (None: judge by counts only)."""
        return self.reason(evidence, answer) is not None

    def reason(
        self, evidence: MatchEvidence, answer: Answer | None = None
    ) -> DetectionReason | None:
        """Which part of the rule detects the query (None: none does), checked in this order:
        its client's count, everyone's count, then the changed answer. What an evaluation
        reports of a false flag, to tell a client's own repeats from other clients' copies."""
        if evidence.client.distinct >= self.client_matches:
            return "client_matches"
        if evidence.everyone.distinct >= self.global_matches:
            return "global_matches"
        if (
            self.changed_matches is not None
            and max(evidence.client.distinct, evidence.everyone.distinct) >= self.changed_matches
            and changes_answer(evidence, answer, self.changed_includes_rejected)
        ):
            return "changed_answer"
        return None

    def keeps_anchor(self, evidence: MatchEvidence, answer: Answer | None) -> bool:
        """Whether a query the rule does not detect should be served its anchor's answer
        (``MatchEvidence.consistency_basis``'s anchor) instead of ``answer``: it has
        ``consistent_matches`` distinct near-duplicates or close copies in either scope, and
        ``answer`` would show a class the earliest of them did not (``shows_another_class``).
        Judged apart from ``detects`` (call it on undetected queries): it neither flags nor
        refuses."""
        basis = evidence.consistency_basis()
        return (
            self.consistent_matches is not None
            and basis.distinct >= self.consistent_matches
            and shows_another_class(basis.anchor, answer)
        )
