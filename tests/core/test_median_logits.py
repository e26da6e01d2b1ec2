"""The pseudo-layer ``median.logits``: the classifier's logits on the image median-filtered over
2x2 pixels (feature squeezing, Xu et al. 2018), which ``margin@median.logits`` (the median
margin) reads."""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import median_filter

from app.core.features import (
    FLIPPED_LOGITS,
    MEDIAN_LOGITS,
    FeatureNetwork,
    infer_batch,
    median_filter_2x2,
)
from app.core.models import PRESETS, build_model
from app.core.statistics import Margin, logit_margins


def _network(layers: list[str]) -> FeatureNetwork:
    torch.manual_seed(0)
    return FeatureNetwork(build_model("resnet20", 10).eval(), layers, PRESETS["cifar"]).eval()


def test_the_filter_is_scipys_median_filter_of_size_two():
    """Xu et al.'s squeezer as their code computes it (``scipy.ndimage.median_filter``, a 2x2
    window, reflected border), channel by channel, on random pixels and on 8-bit ones (ties)."""
    rng = np.random.default_rng(1)
    for pixels in (rng.random((3, 3, 9, 7)), rng.integers(0, 4, (2, 3, 6, 6)) / 3.0):
        pixels = pixels.astype(np.float32)
        expected = median_filter(pixels, size=(1, 1, 2, 2), mode="reflect")
        got = median_filter_2x2(torch.from_numpy(pixels)).numpy()
        np.testing.assert_array_equal(got, expected)


def test_the_filter_takes_the_upper_middle_of_the_window_ending_at_each_pixel():
    """A hand-checked case: each output is the third smallest of the pixel, its left, upper and
    upper-left neighbours (the first row and column repeated at the border)."""
    image = torch.tensor([[1.0, 5.0, 2.0], [4.0, 3.0, 9.0], [0.0, 8.0, 6.0]])
    got = median_filter_2x2(image[None, None])[0, 0]
    expected = torch.tensor([[1.0, 5.0, 5.0], [4.0, 4.0, 5.0], [4.0, 4.0, 8.0]])
    torch.testing.assert_close(got, expected)


def test_median_logits_are_the_models_on_the_filtered_pixels():
    """The second pass gives the logits of the filtered image and leaves the first pass's
    features and probabilities as they are without it; with the mirror too, each second pass
    holds its own image's logits."""
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(21))
    network = _network(["layer3", "linear", MEDIAN_LOGITS, FLIPPED_LOGITS])
    with_it = infer_batch(network, pixels)
    filtered = infer_batch(network, median_filter_2x2(pixels))
    mirrored = infer_batch(network, pixels.flip(-1))
    np.testing.assert_allclose(with_it.features[MEDIAN_LOGITS], filtered.features["linear"])
    np.testing.assert_allclose(with_it.features[FLIPPED_LOGITS], mirrored.features["linear"])
    without = infer_batch(_network(["layer3", "linear"]), pixels)
    for layer in ("layer3", "linear"):
        np.testing.assert_array_equal(with_it.features[layer], without.features[layer])
    np.testing.assert_array_equal(with_it.probabilities, without.probabilities)


def test_median_margin_reads_the_filtered_logits_at_the_first_passs_class():
    pixels = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(22))
    batch = infer_batch(_network([MEDIAN_LOGITS]), pixels)
    values = Margin(MEDIAN_LOGITS).values(batch.features, batch.predictions)
    filtered = infer_batch(_network(["linear"]), median_filter_2x2(pixels))
    expected = logit_margins(filtered.features["linear"], batch.predictions)
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6)


def test_the_row_mask_limits_the_median_pass_and_the_mirror_gate_does_not():
    """``second_pass_only`` (the builder's held-out rows) limits the median pass as it limits
    the mirror; ``mirror_below`` (the doubted flip margin's gate) limits only the mirror, since
    the median margin is read on every image."""
    pixels = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(23))
    network = _network(["linear", MEDIAN_LOGITS])
    full = infer_batch(network, pixels).features[MEDIAN_LOGITS]
    only = torch.tensor([True, False, True, False, False, True])
    sizes: list[int] = []
    network.model.register_forward_hook(lambda _m, inputs, _o: sizes.append(inputs[0].shape[0]))
    masked = infer_batch(network, pixels, only).features[MEDIAN_LOGITS]
    assert sizes == [6, 3]
    np.testing.assert_allclose(masked[only.numpy()], full[only.numpy()], rtol=1e-5, atol=1e-5)
    assert np.isnan(masked[~only.numpy()]).all()
    network.mirror_below = -1e9  # no query in doubt: no mirrored row, every median row
    sizes.clear()
    gated = infer_batch(network, pixels).features[MEDIAN_LOGITS]
    assert sizes == [6, 6]
    np.testing.assert_allclose(gated, full, rtol=1e-5, atol=1e-5)
