"""``doubt_margin``: the flip margin read only where the first pass is in doubt, and the feature
network's mirrored pass run only for those queries."""

from __future__ import annotations

import numpy as np
import torch

from app.core.detector import Detector, empirical_p_values
from app.core.features import FLIPPED_LOGITS, FeatureNetwork, infer_batch
from app.core.guard import mirror_gate
from app.core.models import PRESETS, build_model
from app.core.statistics import (
    DOUBTED_SHARE,
    NOT_DOUBTED,
    DoubtMargin,
    Margin,
    doubted,
    fit_doubt_gate,
)


def _brute_margin(row: np.ndarray, c: int) -> float:
    return float(row[c]) - max(float(v) for j, v in enumerate(row) if j != c)


def test_doubted_rows_and_the_fitted_gate_against_a_loop() -> None:
    """A row is in doubt when its top logit leads the runner-up by less than the gate; the gate
    fitted on authentic logits has ``DOUBTED_SHARE`` of them below it."""
    logits = np.random.default_rng(0).normal(0.0, 3.0, size=(501, 10)).astype(np.float32)
    gate = fit_doubt_gate(logits)
    margins = [_brute_margin(row, int(row.argmax())) for row in logits]
    expected = np.array([m < gate for m in margins])
    np.testing.assert_array_equal(doubted(logits, gate), expected)
    assert abs(expected.mean() - DOUBTED_SHARE) <= 1 / len(logits)


def test_doubt_margin_reads_the_mirror_in_doubt_and_has_no_evidence_elsewhere() -> None:
    """Doubted rows: the margin of the predicted class on the mirrored logits; the others:
    ``NOT_DOUBTED``, whose p-value against any reference is 1, whatever the mirrored logits
    hold there (the network leaves them NaN)."""
    rng = np.random.default_rng(1)
    first = rng.normal(0.0, 2.0, size=(40, 5)).astype(np.float32)
    mirrored = rng.normal(0.0, 2.0, size=(40, 5)).astype(np.float32)
    classes = first.argmax(axis=1)
    gate = 1.0
    pairs = zip(first, classes, strict=True)
    in_doubt = np.array([_brute_margin(r, int(c)) < gate for r, c in pairs])
    assert 0 < in_doubt.sum() < len(first)
    mirrored[~in_doubt] = np.nan
    statistic = DoubtMargin(FLIPPED_LOGITS, "linear", gate)
    values = statistic.values({"linear": first, FLIPPED_LOGITS: mirrored}, classes)
    for i in range(len(first)):
        if in_doubt[i]:
            assert values[i] == _brute_margin(mirrored[i].astype(np.float64), int(classes[i]))
        else:
            assert values[i] == NOT_DOUBTED
    reference = statistic.values({"linear": first, FLIPPED_LOGITS: mirrored}, classes)
    p_values = empirical_p_values(values, reference)
    assert (p_values[~in_doubt] == 1.0).all()
    assert (p_values[in_doubt] < 1.0).all()


def test_a_doubted_row_left_unmirrored_is_unmeasured() -> None:
    """A doubted query whose mirrored logits are missing (NaN) gets the smallest p-value: the
    guard rejects what it could not measure, never waves it through."""
    first = np.array([[2.0, 1.9, 0.0], [5.0, 0.0, 0.0]], dtype=np.float32)
    mirrored = np.full((2, 3), np.nan, dtype=np.float32)
    values = DoubtMargin(FLIPPED_LOGITS, "linear", 1.0).values(
        {"linear": first, FLIPPED_LOGITS: mirrored}, np.array([0, 0])
    )
    assert np.isnan(values[0]) and values[1] == NOT_DOUBTED
    p_values = empirical_p_values(values, np.array([0.5, 1.0, 2.0]))
    assert p_values[0] == 1 / 4 and p_values[1] == 1.0


def _network() -> FeatureNetwork:
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    return FeatureNetwork(model, ["linear", FLIPPED_LOGITS], PRESETS["cifar"]).eval()


def test_the_network_mirrors_only_the_doubted_queries() -> None:
    """With ``mirror_below`` the second pass sees the doubted rows alone and gives them the
    logits a full mirrored pass gives; the others hold NaN; a batch without doubt costs one
    pass; every statistic value is the full pass's."""
    pixels = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    network = _network()
    full = infer_batch(network, pixels)
    first = full.features["linear"]
    top_two = np.sort(first, axis=1)[:, -2:]
    margins = top_two[:, 1] - top_two[:, 0]
    gate = float(np.median(margins))
    sizes: list[int] = []
    network.model.register_forward_hook(lambda _m, inputs, _o: sizes.append(inputs[0].shape[0]))
    network.mirror_below = gate
    gated = infer_batch(network, pixels)
    in_doubt = margins < gate
    assert sizes == [12, int(in_doubt.sum())]
    np.testing.assert_allclose(
        gated.features[FLIPPED_LOGITS][in_doubt],
        full.features[FLIPPED_LOGITS][in_doubt],
        rtol=1e-5,
        atol=1e-5,
    )
    assert np.isnan(gated.features[FLIPPED_LOGITS][~in_doubt]).all()
    statistic = DoubtMargin(FLIPPED_LOGITS, "linear", gate)
    np.testing.assert_allclose(
        statistic.values(gated.features, gated.predictions),
        statistic.values(full.features, full.predictions),
        rtol=1e-5,
    )
    sizes.clear()
    network.mirror_below = -1.0  # no margin is negative: nothing in doubt
    assert np.isnan(infer_batch(network, pixels).features[FLIPPED_LOGITS]).all()
    assert sizes == [12]


def test_a_row_mask_limits_the_mirrored_pass_with_or_without_the_gate() -> None:
    """``second_pass_only`` (the builder's held-out rows): only those rows are mirrored, with the
    full pass's logits, NaN elsewhere; with a gate, only the rows both allow; an empty mask
    costs no second pass."""
    pixels = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    network = _network()
    full = infer_batch(network, pixels).features[FLIPPED_LOGITS]
    only = torch.tensor([True, False] * 5)
    sizes: list[int] = []
    network.model.register_forward_hook(lambda _m, inputs, _o: sizes.append(inputs[0].shape[0]))
    masked = infer_batch(network, pixels, only).features[FLIPPED_LOGITS]
    assert sizes == [10, 5]
    np.testing.assert_allclose(masked[only.numpy()], full[only.numpy()], rtol=1e-5, atol=1e-5)
    assert np.isnan(masked[~only.numpy()]).all()
    first = infer_batch(network, pixels).features["linear"]
    top_two = np.sort(first, axis=1)[:, -2:]
    margins = top_two[:, 1] - top_two[:, 0]
    network.mirror_below = float(np.median(margins))
    both = only.numpy() & (margins < network.mirror_below)
    gated = infer_batch(network, pixels, only).features[FLIPPED_LOGITS]
    np.testing.assert_allclose(gated[both], full[both], rtol=1e-5, atol=1e-5)
    assert np.isnan(gated[~both]).all()
    sizes.clear()
    network.mirror_below = None
    nothing = infer_batch(network, pixels, torch.zeros(10, dtype=torch.bool))
    assert np.isnan(nothing.features[FLIPPED_LOGITS]).all() and sizes == [10]


def test_the_mirror_gate_follows_the_statistics() -> None:
    """The network mirrors every query when a plain margin reads the mirror, else just above
    the largest doubt gate; without either, nothing to set."""
    doubt = [DoubtMargin(FLIPPED_LOGITS, "linear", 1.5), DoubtMargin(FLIPPED_LOGITS, "linear", 2.0)]
    gate = mirror_gate(doubt)
    assert gate is not None and 2.0 < gate < 2.01
    assert mirror_gate([*doubt, Margin(FLIPPED_LOGITS)]) is None
    assert mirror_gate([Margin("linear")]) is None
    detector = Detector([doubt[0], Margin("linear")], "hmp", np.zeros((3, 2)))
    assert mirror_gate(detector.statistics) == mirror_gate(doubt[:1])
