"""The match rule, pure: counting near-duplicates and exact copies, summarising a scope,
the detection rule's parts and the consistent count's anchor."""

from __future__ import annotations

import numpy as np
import pytest

from app.core.stateful.match_rule import (
    NO_MATCH,
    Answer,
    DetectionRule,
    MatchCount,
    MatchEvidence,
    changes_answer,
    count_matches,
    evidence_of,
    summarise_matches,
)


def test_count_matches_pure() -> None:
    similarities = np.array([50.0, 40.0, 40.0, 10.0, 45.0])
    digests = [b"own", b"a", b"a", b"b", b"c"]
    count = count_matches(similarities, digests, b"own", threshold=30.0)
    assert count == MatchCount(distinct=2, exact=1, best=45.0)  # "a" once, "own" an exact copy
    assert count_matches(np.zeros(0), [], b"x", 1.0) == MatchCount(0, 0, -np.inf)


def test_detection_rule() -> None:
    rule = DetectionRule(client_matches=3, global_matches=5)
    none = MatchCount(0, 0, -np.inf)
    assert rule.detects(MatchEvidence(MatchCount(3, 0, 40.0), none, ()))
    assert rule.detects(MatchEvidence(none, MatchCount(5, 0, 40.0), ("x",)))
    assert not rule.detects(MatchEvidence(MatchCount(2, 9, 40.0), MatchCount(4, 9, 40.0), ()))
    with pytest.raises(ValueError):
        DetectionRule(0, 1)
    with pytest.raises(ValueError):
        DetectionRule(1, 1, changed_matches=0)


def test_the_rule_names_the_part_that_detects_in_a_fixed_order() -> None:
    """``reason``: the client's count first, then everyone's, then the changed answer; None
    exactly when ``detects`` is False."""
    rule = DetectionRule(client_matches=3, global_matches=5, changed_matches=2)
    none, two = MatchCount(0, 0, -np.inf), MatchCount(2, 0, 40.0)
    cat, dog = Answer("accepted", 3, 0.9, 0.5), Answer("accepted", 5, 0.9, 0.4)
    cases = [
        (
            MatchEvidence(MatchCount(3, 0, 40.0), MatchCount(5, 0, 40.0), (), cat),
            dog,
            "client_matches",
        ),
        (MatchEvidence(two, MatchCount(5, 0, 40.0), ("x",), cat), dog, "global_matches"),
        (MatchEvidence(two, two, (), cat), dog, "changed_answer"),
        (MatchEvidence(two, two, (), cat), cat, None),
        (MatchEvidence(none, none, ()), None, None),
    ]
    for evidence, answer, reason in cases:
        assert rule.reason(evidence, answer) == reason
        assert rule.detects(evidence, answer) is (reason is not None)


def test_a_changed_answer_detects_from_its_own_count() -> None:
    """A query whose answer would carry another class than its anchor's is detected from
    ``changed_matches`` near-duplicates, in either scope; a rejected answer tells no class, and
    without an answer (or the count off) only the near-duplicate counts apply."""
    rule = DetectionRule(client_matches=5, global_matches=5, changed_matches=2)
    cat = Answer("rejected", 3, 0.6, 0.001)  # the anchor's class counts whatever its decision
    two = MatchCount(2, 0, 40.0)
    one = MatchCount(1, 0, 40.0)
    dog = Answer("accepted", 5, 0.9, 0.4)
    assert changes_answer(MatchEvidence(two, two, (), cat), dog)
    assert rule.detects(MatchEvidence(two, two, (), cat), dog)
    assert rule.detects(MatchEvidence(one, two, ("x",), cat), dog)  # everyone's count
    assert rule.detects(MatchEvidence(two, one, (), cat), Answer("unguarded", 5, 0.9, 0.0))
    assert not rule.detects(MatchEvidence(one, one, (), cat), dog)  # too few near-duplicates
    assert not rule.detects(MatchEvidence(two, two, (), cat), Answer("accepted", 3, 0.9, 0.4))
    assert not rule.detects(MatchEvidence(two, two, (), cat), Answer("rejected", 5, 0.9, 0.0))
    assert not rule.detects(MatchEvidence(two, two, (), None), dog)  # no anchor
    assert not rule.detects(MatchEvidence(two, two, (), cat))  # no answer given
    assert not DetectionRule(5, 5).detects(MatchEvidence(two, two, (), cat), dog)  # off


def test_a_rejected_answer_changes_the_class_only_when_the_rule_counts_rejections() -> None:
    """``changed_includes_rejected``: a query the guard would reject counts as a changed answer
    by its model class; the same class as the anchor's, or too few near-duplicates, still does
    not, and the client's and everyone's counts are untouched."""
    counting = DetectionRule(5, 5, changed_matches=2, changed_includes_rejected=True)
    plain = DetectionRule(5, 5, changed_matches=2)
    cat = Answer("accepted", 3, 0.9, 0.5)
    rejected_dog = Answer("rejected", 5, 0.6, 0.001)
    rejected_cat = Answer("rejected", 3, 0.6, 0.001)
    two, one = MatchCount(2, 0, 40.0), MatchCount(1, 0, 40.0)
    evidence = MatchEvidence(two, two, (), cat)
    assert changes_answer(evidence, rejected_dog, include_rejected=True)
    assert not changes_answer(evidence, rejected_dog)
    assert counting.reason(evidence, rejected_dog) == "changed_answer"
    assert plain.reason(evidence, rejected_dog) is None
    assert counting.reason(evidence, rejected_cat) is None  # the anchor's own class
    assert counting.reason(MatchEvidence(one, one, (), cat), rejected_dog) is None
    assert counting.reason(MatchEvidence(two, two, (), None), rejected_dog) is None  # no anchor
    accepted_dog = Answer("accepted", 5, 0.9, 0.4)
    assert counting.reason(evidence, accepted_dog) == plain.reason(evidence, accepted_dog)


def test_a_class_change_keeps_its_anchor_from_the_consistent_count() -> None:
    """``keeps_anchor``: from ``consistent_matches`` distinct near-duplicates in either scope, a
    query whose answer would show a class its anchor's did not (another class, or any class
    after a rejected anchor) is to be served the anchor's answer; it never detects (the counts
    decide that alone), and a rejected answer shows no class."""
    rule = DetectionRule(5, 5, changed_matches=2, consistent_matches=1)
    cat = Answer("accepted", 3, 0.9, 0.5)
    dog = Answer("accepted", 5, 0.8, 0.4)
    none = MatchCount(0, 0, -np.inf)
    one = MatchCount(1, 0, 30.0)
    copy_only = MatchCount(0, 3, -np.inf)  # exact copies are not near-duplicates
    assert rule.keeps_anchor(MatchEvidence(one, one, (), cat), dog)
    assert rule.keeps_anchor(MatchEvidence(none, one, ("x",), cat), dog)  # everyone's count
    assert not rule.detects(MatchEvidence(one, one, (), cat), dog)
    assert not rule.keeps_anchor(MatchEvidence(copy_only, copy_only, (), cat), dog)
    assert not rule.keeps_anchor(MatchEvidence(one, one, (), cat), cat)  # same class
    rejected_dog = Answer("rejected", 5, 0.7, 0.001)
    assert rule.keeps_anchor(MatchEvidence(one, one, (), rejected_dog), dog)  # newly shown
    unguarded_dog = Answer("unguarded", 5, 0.8, 0.0)
    assert rule.keeps_anchor(MatchEvidence(one, one, (), rejected_dog), unguarded_dog)
    assert not rule.keeps_anchor(MatchEvidence(one, one, (), dog), rejected_dog)  # none shown
    assert not rule.keeps_anchor(MatchEvidence(one, one, (), cat), Answer("rejected", 5, 0.8, 0))
    assert not rule.keeps_anchor(MatchEvidence(one, one, (), None), dog)  # no anchor
    assert not DetectionRule(5, 5, 2).keeps_anchor(MatchEvidence(one, one, (), cat), dog)  # off
    stricter = DetectionRule(5, 5, consistent_matches=2)
    assert not stricter.keeps_anchor(MatchEvidence(one, one, (), cat), dog)
    with pytest.raises(ValueError):
        DetectionRule(5, 5, consistent_matches=0)


def test_no_near_duplicate_summarises_to_no_match() -> None:
    """The stores return NO_MATCH without summarising when nothing is a near-duplicate: it must
    be exactly what the summary of such a scope is."""
    for similarities in (np.zeros(0), np.array([3.0, 24.0])):
        n = len(similarities)
        summary = summarise_matches(
            similarities, [b"a", b"b"][:n], ["c", "d"][:n], [None] * n, b"x", "c", 25.0, np.zeros(n)
        )
        assert summary == NO_MATCH


def test_summarise_matches_pure() -> None:
    """Counts as ``count_matches``; the anchor is the earliest match (copies included, ties: the
    oldest stored); other senders in order, the query's own client left out."""
    a1, a2, a3 = (Answer("accepted", i, 0.9, 0.5) for i in range(3))
    summary = summarise_matches(
        np.array([50.0, 10.0, 40.0, 45.0]),
        [b"own", b"x", b"a", b"b"],
        ["bob", "carol", "me", "bob"],
        [a1, a2, a3, None],
        b"own",
        "me",
        30.0,
        np.array([5.0, 1.0, 3.0, 3.0]),
    )
    assert summary.count == MatchCount(distinct=2, exact=1, best=45.0)
    assert (summary.anchor, summary.anchor_at) == (a3, 3.0)  # carol's is older but no match
    assert summary.others == ("bob",)
    none = summarise_matches(np.array([1.0]), [b"x"], ["a"], [a1], b"y", "me", 30.0, np.ones(1))
    assert none.anchor is None and none.count.distinct == 0
    # the earlier anchor of the two scopes wins
    later = summary.__class__(summary.count, (), a1, 9.0)
    assert evidence_of(later, summary).anchor == a3
    assert evidence_of(summary, NO_MATCH).anchor == a3


def test_summarise_matches_counts_close_copies_apart() -> None:
    """Close copies join the consistent count's matches (count and earliest anchor), never the
    near-duplicates'; an exact copy counts as exact in both."""
    a1, a2, a3 = (Answer("accepted", i, 0.9, 0.5) for i in range(3))
    summary = summarise_matches(
        np.array([2.0, 40.0, 3.0, 1024.0]),
        [b"a", b"b", b"c", b"own"],
        ["x", "y", "z", "me"],
        [a1, a2, a3, None],
        b"own",
        "me",
        25.0,
        np.array([1.0, 2.0, 3.0, 4.0]),
        np.array([True, False, False, True]),
    )
    assert summary.count == MatchCount(1, 1, 40.0) and summary.anchor == a2
    assert summary.loose == MatchCount(2, 1, 40.0)  # a (close) and b (near); own is exact
    assert (summary.loose_anchor, summary.loose_anchor_at) == (a1, 1.0)
    plain = summarise_matches(
        np.array([2.0, 40.0]), [b"a", b"b"], ["x", "y"], [a1, a2], b"o", "me", 25.0, np.ones(2)
    )
    assert (plain.loose, plain.loose_anchor) == (plain.count, plain.anchor)
