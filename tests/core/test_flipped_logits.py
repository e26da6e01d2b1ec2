"""The pseudo-layer ``flip.logits``: the classifier's logits on the horizontally mirrored input,
which ``margin@flip.logits`` (the flip margin) reads."""

from __future__ import annotations

import numpy as np
import torch

from app.core.features import FLIPPED_LOGITS, MEDIAN_LOGITS, FeatureNetwork, infer_batch
from app.core.models import PRESETS, build_model
from app.core.statistics import Margin, logit_margins


def _network(layers: list[str]) -> FeatureNetwork:
    torch.manual_seed(0)
    return FeatureNetwork(build_model("resnet20", 10).eval(), layers, PRESETS["cifar"]).eval()


def test_flipped_logits_are_the_models_on_the_mirrored_pixels() -> None:
    """The second pass gives the logits of the mirrored image, and leaves the first pass's
    features and probabilities as they are without it."""
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    network = _network(["layer3", "linear", FLIPPED_LOGITS])
    with_it = infer_batch(network, pixels)
    mirrored = infer_batch(network, pixels.flip(-1))
    np.testing.assert_allclose(with_it.features[FLIPPED_LOGITS], mirrored.features["linear"])
    without = infer_batch(_network(["layer3", "linear"]), pixels)
    for layer in ("layer3", "linear"):
        np.testing.assert_array_equal(with_it.features[layer], without.features[layer])
    np.testing.assert_array_equal(with_it.probabilities, without.probabilities)
    assert set(without.features) == {"layer3", "linear"}


def test_flip_margin_reads_the_mirrored_logits_at_the_first_passs_class() -> None:
    """``margin@flip.logits`` is the margin of the class predicted on the image as sent, read on
    the mirrored image's logits (a photo keeps its class under a mirror; a perturbation fitted
    to one alignment often does not): checked against a network that sees the mirrored pixels
    as its input."""
    pixels = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    batch = infer_batch(_network([FLIPPED_LOGITS]), pixels)
    values = Margin(FLIPPED_LOGITS).values(batch.features, batch.predictions)
    mirrored = infer_batch(_network(["linear"]), pixels.flip(-1))
    expected = logit_margins(mirrored.features["linear"], batch.predictions)
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6)


def test_flipped_logits_follow_the_execution_settings() -> None:
    """channels_last runs the mirrored pass in the same memory format, with the same numbers."""
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    network = _network([FLIPPED_LOGITS])
    plain = infer_batch(network, pixels).features[FLIPPED_LOGITS]
    network.set_execution("fp32", channels_last=True)
    np.testing.assert_allclose(
        infer_batch(network, pixels).features[FLIPPED_LOGITS], plain, rtol=1e-4, atol=1e-5
    )


def test_classify_runs_the_first_pass_only() -> None:
    """What attacks differentiate (``LogitsModel``): the first pass's logits, computed once;
    the mirrored pass, which a network that carries ``flip.logits`` runs in ``forward``, is not
    paid for."""
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    network = _network(["layer3", FLIPPED_LOGITS])
    calls: list[int] = []
    network.model.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        logits = network.classify(pixels)
        assert len(calls) == 1
        expected = network(pixels).logits
    assert len(calls) == 3  # forward: the image and its mirror
    torch.testing.assert_close(logits, expected)


def test_forward_without_second_passes_skips_the_mirror_and_the_median() -> None:
    """``second_passes=False``: one pass of the model, every other feature as with the mirrored
    and median-filtered passes; a set of names runs only those second passes."""
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    network = _network(["layer3", "linear", FLIPPED_LOGITS, MEDIAN_LOGITS])
    calls: list[int] = []
    network.model.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        both = network(pixels)
        assert len(calls) == 3
        first = network(pixels, second_passes=False)
        median_only = network(pixels, second_passes={MEDIAN_LOGITS})
    assert len(calls) == 6  # the first pass and the median-filtered one, not the mirror
    assert set(first.features) == {"layer3", "linear"}
    assert set(median_only.features) == {"layer3", "linear", MEDIAN_LOGITS}
    torch.testing.assert_close(first.logits, both.logits)
    torch.testing.assert_close(median_only.features[MEDIAN_LOGITS], both.features[MEDIAN_LOGITS])
    for layer in ("layer3", "linear"):
        torch.testing.assert_close(first.features[layer], both.features[layer])
