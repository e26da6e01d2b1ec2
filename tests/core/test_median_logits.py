"""The pseudo-layer ``median.logits``: the classifier's logits on the image median-filtered over
2x2 pixels (feature squeezing, Xu et al. 2018), which ``margin@median.logits`` (the median
margin) reads."""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import median_filter

from app.core.features import (
    FeatureNetwork,
    median_filter_2x2,
)
from app.core.models import PRESETS, build_model


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
