"""The feature extractor's batching (``app.core.features.infer_in_batches``): a set of any size
gives the same probabilities, predictions and features as one forward pass over it, in order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.core.cifar_resnet import cifar_resnet
from app.core.features import FeatureNetwork, infer_batch, infer_in_batches
from app.core.models import PRESETS


def _network() -> FeatureNetwork:
    torch.manual_seed(0)
    model = cifar_resnet("resnet20", num_classes=10).eval()
    return FeatureNetwork(model, ["layer1", "layer3"], PRESETS["cifar"]).eval()


@pytest.mark.parametrize("batch_size", [1, 3, 7, 50])
def test_batches_of_any_size_match_one_pass_in_order(batch_size: int) -> None:
    network = _network()
    pixels = torch.rand(7, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    whole = infer_batch(network, pixels)
    batched = infer_in_batches(network, pixels, batch_size=batch_size)
    np.testing.assert_array_equal(batched.predictions, whole.predictions)
    np.testing.assert_allclose(batched.probabilities, whole.probabilities, rtol=1e-5, atol=1e-6)
    assert set(batched.features) == {"layer1", "layer3"}
    for layer, values in whole.features.items():
        assert batched.features[layer].shape == values.shape
        np.testing.assert_allclose(batched.features[layer], values, rtol=1e-4, atol=1e-5)
