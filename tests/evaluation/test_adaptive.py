"""The adaptive attack's torch statistics compute what the detector computes."""

from pathlib import Path

import numpy as np
import pytest
import torch

from app.core.detector import Detector
from app.core.features import PIXEL_HIGHPASS, FeatureNetwork
from app.core.models import PRESETS, build_model
from app.core.statistics import Margin, logit_margins
from evaluation.adaptive import SurrogateMargin, adaptive_pgd, second_passes_read, surrogates


def test_surrogate_margin_equals_the_statistic_and_is_standardised_by_its_reference():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(30, 10))
    classes = rng.integers(0, 10, size=30)
    reference = rng.normal(4.0, 2.0, size=(50, 1))
    detector = Detector([Margin("linear"), Margin("linear")], "fisher", np.hstack([reference] * 2))
    surrogate = surrogates(detector)[0]
    assert isinstance(surrogate, SurrogateMargin)
    features = {"linear": torch.from_numpy(logits)}
    got = surrogate.values(features, torch.from_numpy(classes)).numpy()
    np.testing.assert_allclose(got, logit_margins(logits, classes), rtol=1e-12)
    z = (logit_margins(logits, classes) - reference.mean()) / reference.std()
    objective = surrogate.objective(features, torch.from_numpy(classes)).numpy()
    np.testing.assert_allclose(objective, np.minimum(z, 1.0), rtol=1e-9)
    # the attacker's gradient reaches the logits
    features["linear"].requires_grad_(True)
    surrogate.objective(features, torch.from_numpy(classes)).sum().backward()
    assert features["linear"].grad is not None and features["linear"].grad.abs().sum() > 0


def test_the_smooth_adaptive_attack_stays_in_its_l2_ball_and_adds_no_dense_noise():
    """PGD-L2 from the photo: every image within eps in L2 and in [0, 1]; it moves towards the
    target; and unlike PGD-Linf's random start and signed steps it does not add a +-alpha
    pattern to every pixel (the high-pass energy rises far less for the same number of steps)."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    network = FeatureNetwork(model, [PIXEL_HIGHPASS], PRESETS["cifar"]).eval()
    generator = torch.Generator().manual_seed(4)
    photos = torch.rand(6, 3, 32, 32, generator=generator) * 0.2 + 0.4  # smooth-ish, inside
    photos = torch.nn.functional.avg_pool2d(photos, 3, stride=1, padding=1)
    target = torch.arange(6) % 10
    smooth = adaptive_pgd(network, [], photos, target, 0.5, 0.1, 8, norm="l2").adversarial
    dense = adaptive_pgd(network, [], photos, target, 8 / 255, 2 / 255, 8).adversarial
    moved = (torch.from_numpy(smooth) - photos).flatten(1).norm(dim=1)
    assert (moved <= 0.5 + 1e-5).all() and (moved > 0).any()
    assert smooth.min() >= 0.0 and smooth.max() <= 1.0
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(model(photos), target)
        after = torch.nn.functional.cross_entropy(model(torch.from_numpy(smooth)), target)
        energy = {
            name: network(torch.from_numpy(x)).features[PIXEL_HIGHPASS].mean().item()
            for name, x in (("smooth", smooth), ("dense", dense), ("photo", photos.numpy()))
        }
    assert after < before
    assert energy["smooth"] - energy["photo"] < 0.5 * (energy["dense"] - energy["photo"])


def test_the_adaptive_attack_reads_the_chroma_energy_as_the_detector_does():
    """A Mahalanobis statistic of ``pixels.chromahighpass`` rebuilt in torch gives the detector's
    values, and the attacker's gradient reaches the pixels through it."""
    from app.core.features import PIXEL_CHROMA_HIGHPASS, infer_batch
    from app.core.statistics import Mahalanobis, fit_class_density

    torch.manual_seed(0)
    network = FeatureNetwork(
        build_model("resnet20", 10).eval(), [PIXEL_CHROMA_HIGHPASS], PRESETS["cifar"]
    ).eval()
    generator = torch.Generator().manual_seed(7)
    fitting = torch.rand(40, 3, 16, 16, generator=generator)
    fitted = infer_batch(network, fitting).features[PIXEL_CHROMA_HIGHPASS].astype(np.float64)
    density = fit_class_density([(fitted, np.arange(40) % 4)], 4, 6)
    statistic = Mahalanobis(PIXEL_CHROMA_HIGHPASS, density)
    reference = statistic.values({PIXEL_CHROMA_HIGHPASS: fitted}, np.arange(40) % 4)[:, None]
    detector = Detector([statistic, statistic], "hmp", np.hstack([reference] * 2))
    surrogate = surrogates(detector)[0]
    pixels = torch.rand(5, 3, 16, 16, generator=generator, requires_grad=True)
    classes = torch.tensor([0, 1, 2, 3, 0])
    got = surrogate.values(network(pixels).features, classes)
    expected = statistic.values(infer_batch(network, pixels.detach()).features, classes.numpy())
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-4)
    got.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


@pytest.mark.parametrize("layer", ["flip.logits", "median.logits"])
def test_the_adaptive_attack_reads_a_second_pass_margin_through_its_pass(layer):
    """``margin@flip.logits`` and ``margin@median.logits`` rebuilt in torch give the detector's
    values, and the attacker's gradient reaches the pixels through the second (mirrored or
    median-filtered) forward pass."""
    from app.core.features import infer_batch

    torch.manual_seed(0)
    network = FeatureNetwork(build_model("resnet20", 10).eval(), [layer], PRESETS["cifar"]).eval()
    statistic = Margin(layer)
    reference = np.random.default_rng(5).normal(2.0, 1.0, size=(40, 1))
    detector = Detector([statistic, statistic], "hmp", np.hstack([reference] * 2))
    surrogate = surrogates(detector)[0]
    assert second_passes_read([surrogate]) == {layer}
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    pixels.requires_grad_(True)
    classes = torch.tensor([0, 3, 5, 9])
    got = surrogate.values(network(pixels).features, classes)
    expected = statistic.values(infer_batch(network, pixels.detach()).features, classes.numpy())
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_the_adaptive_attack_runs_only_the_second_passes_its_statistics_read():
    """An attack on the first pass's statistics does not pay for the network's mirrored or
    median-filtered pass (a network that carries both, as the evaluation's does, runs them by
    default); one on the flip margin runs the mirror alone, one on the median margin the filter
    alone, one on both both."""
    from app.core.features import FLIPPED_LOGITS, MEDIAN_LOGITS

    torch.manual_seed(0)
    network = FeatureNetwork(
        build_model("resnet20", 10).eval(),
        ["linear", FLIPPED_LOGITS, MEDIAN_LOGITS],
        PRESETS["cifar"],
    ).eval()
    reference = np.random.default_rng(6).normal(2.0, 1.0, size=(40, 2))
    inputs: list[torch.Tensor] = []
    network.model.register_forward_hook(lambda _m, args, _o: inputs.append(args[0].detach()))
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(13))
    target = torch.tensor([1, 2])
    cases = (
        (["linear"], 1),
        ([FLIPPED_LOGITS], 2),
        ([MEDIAN_LOGITS], 2),
        ([FLIPPED_LOGITS, MEDIAN_LOGITS], 3),
    )
    for layers, passes in cases:
        statistics = [Margin(layer) for layer in layers]
        combination = "hmp" if len(layers) > 1 else "single"
        detector = Detector(statistics, combination, reference[:, : len(layers)])
        inputs.clear()
        adaptive_pgd(network, surrogates(detector), pixels, target, 8 / 255, 2 / 255, steps=2)
        assert len(inputs) == 3 * passes  # three forward passes of the attack (steps + 1)
        first = inputs[0]  # which second passes ran: the mirror's input is the first's mirrored
        seconds = inputs[1:passes]
        mirrored = any(torch.allclose(second, first.flip(-1)) for second in seconds)
        assert mirrored == (FLIPPED_LOGITS in layers)
        assert len(seconds) - int(mirrored) == int(MEDIAN_LOGITS in layers)


def test_the_adaptive_attack_raises_the_doubted_flip_margin_as_the_flip_margin():
    """``doubt_margin@flip.logits`` rebuilt in torch is the flip margin itself (raising it helps
    the attacker whether or not the first pass ends in doubt), standardised by the doubted
    reference images' values alone (the others hold ``NOT_DOUBTED``)."""
    from app.core.features import FLIPPED_LOGITS
    from app.core.statistics import NOT_DOUBTED, DoubtMargin

    doubted = np.random.default_rng(7).normal(1.0, 0.5, size=10)
    column = np.concatenate([doubted, np.full(30, NOT_DOUBTED)])[:, None]
    statistic = DoubtMargin(FLIPPED_LOGITS, "linear", 2.0)
    detector = Detector([statistic, Margin("linear")], "hmp", np.hstack([column, column]))
    surrogate = surrogates(detector)[0]
    assert isinstance(surrogate, SurrogateMargin)
    assert (surrogate.name, surrogate.layer) == ("doubt_margin@flip.logits", FLIPPED_LOGITS)
    assert surrogate.reference_mean == pytest.approx(doubted.mean())
    assert surrogate.reference_std == pytest.approx(doubted.std())
    assert second_passes_read([surrogate]) == {FLIPPED_LOGITS}


def test_the_adaptive_attack_raises_the_suspect_jpeg_margin_as_the_jpeg_margin():
    """``suspect_margin@jpeg.logits`` rebuilt in torch is the JPEG margin itself, read for every
    query (the attacker need not know which queries the detector suspects), standardised by the
    reference's suspects' values alone (the detector's gated column)."""
    from app.core.features import JPEG_LOGITS
    from app.core.statistics import NOT_DOUBTED, SuspectMargin

    rng = np.random.default_rng(8)
    reference = np.column_stack([rng.normal(0.0, 1.0, 50), rng.normal(1.0, 0.5, 50)])
    detector = Detector([Margin("linear"), SuspectMargin(JPEG_LOGITS)], "hmp", reference)
    read = detector.reference[:, 1][detector.reference[:, 1] < NOT_DOUBTED]
    assert 0 < read.size < 50
    surrogate = surrogates(detector)[1]
    assert isinstance(surrogate, SurrogateMargin)
    assert (surrogate.name, surrogate.layer) == ("suspect_margin@jpeg.logits", JPEG_LOGITS)
    assert surrogate.reference_mean == pytest.approx(read.mean())
    assert surrogate.reference_std == pytest.approx(read.std())
    assert second_passes_read([surrogate]) == {JPEG_LOGITS}


def test_every_v2_preset_gets_both_adaptive_attacks_and_its_own_columns():
    """Each v2 preset the evaluation builds is attacked by its own PGD-Linf and smooth PGD-L2
    (``adaptive_v2``, ``adaptive_v2_median_l2``, ...: v2's set names as before, so their cached
    adversarials still match), and each row's own-attack columns point at the sets crafted
    against it, not at v2's."""
    from types import SimpleNamespace

    from evaluation.configurations import DetectorConfig
    from evaluation.options import EvaluateOptions
    from evaluation.run import adaptive_targets, own_attack_columns

    paper = DetectorConfig("pca_whiten-layer3-k1000", "table2", ("layer3",))
    fisher = DetectorConfig("fisher-3", "multilayer", ("layer1", "layer2", "layer3"))
    presets = [DetectorConfig(p, "v2", (), preset=p) for p in ("v2", "v2-flip", "v2-median")]
    guards = {c.name: (c, None) for c in [paper, fisher, *presets]}
    mut = SimpleNamespace(info=SimpleNamespace(default_layer="layer3"))
    options = EvaluateOptions(source=Path("unused.tar.gz"), out=Path("unused"))
    targets = adaptive_targets(options, mut, guards)
    assert targets == {
        "adaptive": "pca_whiten-layer3-k1000",
        "adaptive_v2": "v2",
        "adaptive_v2_l2": "v2",
        "adaptive_v2_flip": "v2-flip",
        "adaptive_v2_flip_l2": "v2-flip",
        "adaptive_v2_median": "v2-median",
        "adaptive_v2_median_l2": "v2-median",
        "adaptive_multilayer": "fisher-3",
    }
    own = own_attack_columns(targets)
    assert own["v2-median"] == {
        "adaptive_own": "adaptive_v2_median",
        "adaptive_own_l2": "adaptive_v2_median_l2",
    }
    assert own["v2"] == {"adaptive_own": "adaptive_v2", "adaptive_own_l2": "adaptive_v2_l2"}
    assert own["fisher-3"] == {"adaptive_own": "adaptive_multilayer"}
    off = EvaluateOptions(source=Path("unused.tar.gz"), out=Path("unused"), adaptive=False)
    assert adaptive_targets(off, mut, guards) == {}
