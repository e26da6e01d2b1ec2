"""EER accuracy, AUROC and TPR at a fixed FPR against brute-force definitions."""

import numpy as np
import pytest

from evaluation.metrics import auroc, eer_accuracy, roc_curve, tpr_at_fpr


def test_separated_sets():
    pos, neg = np.array([0.8, 0.9, 1.0]), np.array([0.1, 0.2])
    assert eer_accuracy(pos, neg)[0] == 1.0
    assert auroc(pos, neg) == 1.0
    assert tpr_at_fpr(pos, neg, 0.05) == 1.0


def test_auroc_matches_pair_counting():
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 20, 200).astype(float)
    neg = rng.integers(0, 15, 150).astype(float)
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auroc(pos, neg) == pytest.approx(pairs)


def test_eer_is_where_error_rates_cross():
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(1.0, 1.0, 4000), rng.normal(-1.0, 1.0, 4000)
    accuracy, threshold = eer_accuracy(pos, neg)
    # two unit Gaussians 2 apart: EER = Phi(-1) = 0.1587
    assert accuracy == pytest.approx(1 - 0.1587, abs=0.01)
    fnr = (pos < threshold).mean()
    fpr = (neg >= threshold).mean()
    assert abs(fnr - fpr) < 0.01


def test_roc_is_monotone_and_complete():
    rng = np.random.default_rng(2)
    roc = roc_curve(rng.random(50), rng.random(70))
    assert roc.tpr[0] == 0 and roc.fpr[0] == 0 and roc.tpr[-1] == 1 and roc.fpr[-1] == 1
    assert (np.diff(roc.tpr) >= 0).all() and (np.diff(roc.fpr) >= 0).all()


def test_a_transfer_success_needs_a_photo_the_judged_model_got_right() -> None:
    """The judged model's own clean errors used to count as transfer successes."""
    from evaluation.run import transfer_successes

    truth = np.array([0, 1, 2, 3])
    clean = np.array([0, 1, 9, 9])  # photos 2 and 3: wrong already, without any attack
    predicted = np.array([5, 1, 5, 3])
    assert transfer_successes(predicted, clean, truth).tolist() == [True, False, False, False]
