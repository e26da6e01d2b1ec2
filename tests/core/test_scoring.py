import numpy as np
import pytest

from app.core.scoring import SCORE_FUNCTIONS, class_scores


def reference_score(labels, sq_dists, cls, kind):
    """Brute force, one query at a time, straight from the paper's Eq. 2 and Table 1."""
    num = den = 0.0
    for rank, (label, sq) in enumerate(zip(labels, sq_dists, strict=True), start=1):
        if label < 0:
            continue
        w = {"knn": 1.0, "wknn": 1.0 / rank, "dwknn": 1.0 / max(sq, 1e-12)}[kind]
        den += w
        num += w * (label == cls)
    return num / den if den > 0 else 0.0


@pytest.mark.parametrize("kind", SCORE_FUNCTIONS)
def test_scores_match_brute_force_reference(kind):
    rng = np.random.default_rng(1)
    n, k, classes = 40, 57, 6
    sq = np.sort(rng.uniform(0.01, 9.0, (n, k)), axis=1).astype(np.float32)
    labels = rng.integers(0, classes, (n, k))
    labels[3, -5:] = -1  # missing results at the tail
    pred = rng.integers(0, classes, n)
    got = class_scores(labels, sq, pred, kind)
    want = np.array([reference_score(labels[i], sq[i], pred[i], kind) for i in range(n)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    assert np.all((got >= 0) & (got <= 1))


def test_dwknn_zero_distance_is_finite_and_dominant():
    labels = np.array([[2, 1, 1, 1]])
    sq = np.array([[0.0, 1.0, 1.0, 1.0]], dtype=np.float32)
    score = class_scores(labels, sq, np.array([2]), "dwknn")
    assert np.isfinite(score).all()
    assert score[0] > 0.999  # the identical training image decides
    both_zero = class_scores(np.array([[2, 1]]), np.zeros((1, 2)), np.array([2]), "dwknn")
    assert both_zero[0] == pytest.approx(0.5)


def test_no_valid_neighbour_scores_zero():
    labels = np.full((2, 3), -1)
    sq = np.full((2, 3), np.inf)
    assert class_scores(labels, sq, np.array([0, 1]), "dwknn").tolist() == [0.0, 0.0]


def test_shape_errors_are_clear():
    with pytest.raises(ValueError):
        class_scores(np.zeros((2, 3), int), np.zeros((2, 4)), np.zeros(2, int), "knn")
    with pytest.raises(ValueError):
        class_scores(np.zeros((2, 3), int), np.zeros((2, 3)), np.zeros(2, int), "bogus")  # type: ignore[arg-type]
