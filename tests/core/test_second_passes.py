"""What the median and JPEG second passes share (``median.logits``, ``jpeg.logits``): the
classifier's logits on the transformed image, read by a margin at the first pass's class, run
for every image or only the builder's held-out rows, never limited by the mirror's doubt gate."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from app.core.features import (
    FLIPPED_LOGITS,
    JPEG_LOGITS,
    MEDIAN_LOGITS,
    FeatureNetwork,
    infer_batch,
    jpeg_squeeze,
    median_filter_2x2,
)
from app.core.models import PRESETS, build_model
from app.core.statistics import Margin, logit_margins

SECOND_PASSES = pytest.mark.parametrize(
    ("layer", "transform"),
    [(MEDIAN_LOGITS, median_filter_2x2), (JPEG_LOGITS, jpeg_squeeze)],
    ids=["median", "jpeg"],
)


def _network(layers: list[str]) -> FeatureNetwork:
    torch.manual_seed(0)
    return FeatureNetwork(build_model("resnet20", 10).eval(), layers, PRESETS["cifar"]).eval()


def _pixels(count: int, seed: int) -> torch.Tensor:
    """Random 8-bit images, as uploads are."""
    values = torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return (values * 255).round() / 255


@SECOND_PASSES
def test_the_second_pass_gives_the_models_logits_on_the_transformed_pixels(
    layer: str, transform: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """The second pass gives the logits of the transformed image and leaves the first pass's
    features and probabilities as they are without it; beside the mirror, each second pass
    holds its own image's logits."""
    pixels = _pixels(4, 21)
    network = _network(["layer3", "linear", layer, FLIPPED_LOGITS])
    with_it = infer_batch(network, pixels)
    transformed = infer_batch(network, transform(pixels))
    mirrored = infer_batch(network, pixels.flip(-1))
    np.testing.assert_allclose(with_it.features[layer], transformed.features["linear"])
    np.testing.assert_allclose(with_it.features[FLIPPED_LOGITS], mirrored.features["linear"])
    without = infer_batch(_network(["layer3", "linear"]), pixels)
    for name in ("layer3", "linear"):
        np.testing.assert_array_equal(with_it.features[name], without.features[name])
    np.testing.assert_array_equal(with_it.probabilities, without.probabilities)


@SECOND_PASSES
def test_the_margin_reads_the_transformed_logits_at_the_first_passs_class(
    layer: str, transform: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    pixels = _pixels(5, 22)
    batch = infer_batch(_network([layer]), pixels)
    values = Margin(layer).values(batch.features, batch.predictions)
    transformed = infer_batch(_network(["linear"]), transform(pixels))
    expected = logit_margins(transformed.features["linear"], batch.predictions)
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6)


@SECOND_PASSES
def test_the_row_mask_limits_the_pass_and_the_mirror_gate_does_not(
    layer: str, transform: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """``second_pass_only`` (the builder's held-out rows) limits it as it limits the mirror;
    ``mirror_below`` (the doubted flip margin's gate) limits only the mirror, since these
    margins are read on every image."""
    pixels = _pixels(6, 23)
    network = _network(["linear", layer])
    full = infer_batch(network, pixels).features[layer]
    only = torch.tensor([True, False, True, False, False, True])
    sizes: list[int] = []
    network.model.register_forward_hook(lambda _m, inputs, _o: sizes.append(inputs[0].shape[0]))
    masked = infer_batch(network, pixels, only).features[layer]
    assert sizes == [6, 3]
    np.testing.assert_allclose(masked[only.numpy()], full[only.numpy()], rtol=1e-5, atol=1e-5)
    assert np.isnan(masked[~only.numpy()]).all()
    network.mirror_below = -1e9  # no query in doubt: no mirrored row, every row of this pass
    sizes.clear()
    gated = infer_batch(network, pixels).features[layer]
    assert sizes == [6, 6]
    np.testing.assert_allclose(gated, full, rtol=1e-5, atol=1e-5)
