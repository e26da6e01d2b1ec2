"""Batch norms folded into their convolutions (``app.core.folding``): the feature network of a
real checkpoint gives the unfolded model's logits and features on real photos, hooks on a folded
batch norm still read its output, and nothing is folded that would change what is read."""

from __future__ import annotations

import copy
import io
import tarfile

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from app.core.features import FeatureNetwork, image_to_pixels
from app.core.folding import fold_batch_norms
from app.core.models import PRESETS, load_model
from tests.conftest import CIFAR_TAR, RESNET20

BLOCKS = ["layer1.2", "layer2.2", "layer3.2"]


def _test_photos(count: int) -> torch.Tensor:
    """The first ``count`` CIFAR-10 test photos in the archive, as the service's pixels."""
    pixels = []
    with tarfile.open(CIFAR_TAR) as archive:
        for member in archive:
            if member.isfile() and "test/" in member.name and member.name.endswith(".jpg"):
                data = archive.extractfile(member)
                assert data is not None
                image = Image.open(io.BytesIO(data.read())).convert("RGB")
                pixels.append(image_to_pixels(image, PRESETS["cifar"]))
                if len(pixels) == count:
                    break
    return torch.stack(pixels)


def _reference(
    model: nn.Module, layers: list[str], normalised: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Logits and pooled outputs of ``layers`` of an unfolded model, by plain hooks."""
    outputs: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: outputs.__setitem__(name, out.mean(dim=(2, 3)))
        )
        for name in layers
    ]
    outputs["logits"] = model(normalised)
    for handle in handles:
        handle.remove()
    return outputs


def test_the_real_resnet20_gives_the_same_logits_and_features_folded() -> None:
    model = load_model("resnet20", RESNET20, 10)
    unfolded = copy.deepcopy(model)
    layers = [*BLOCKS, "layer1.0.bn1"]  # a batch norm's own output as a feature layer too
    network = FeatureNetwork(model, layers, PRESETS["cifar"]).eval()
    assert len(network.folded) == 19  # the stem's and both of each of the 9 blocks'
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    pixels = _test_photos(64)
    with torch.inference_mode():
        folded = network(pixels)
        reference = _reference(unfolded, layers, (pixels - network.mean) / network.std)
    assert torch.equal(folded.logits.argmax(1), reference["logits"].argmax(1))
    torch.testing.assert_close(folded.logits, reference["logits"], rtol=1e-4, atol=1e-4)
    for name in layers:
        torch.testing.assert_close(folded.features[name], reference[name], rtol=1e-4, atol=1e-5)


def test_a_convolution_read_as_a_feature_keeps_its_batch_norm() -> None:
    model = load_model("resnet20", RESNET20, 10)
    unfolded = copy.deepcopy(model)
    network = FeatureNetwork(model, ["layer2.0.conv1"], PRESETS["cifar"]).eval()
    assert "layer2.0.bn1" not in network.folded and len(network.folded) == 18
    assert isinstance(model.get_submodule("layer2.0.bn1"), nn.BatchNorm2d)
    pixels = _test_photos(8)
    with torch.inference_mode():
        features = network(pixels).features["layer2.0.conv1"]
        reference = _reference(unfolded, ["layer2.0.conv1"], (pixels - network.mean) / network.std)
    torch.testing.assert_close(features, reference["layer2.0.conv1"], rtol=1e-5, atol=1e-6)


def test_torchvision_resnet_with_fitted_statistics_is_folded_exactly_enough() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    for module in model.modules():  # batch norms that are not the identity at init
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    unfolded = copy.deepcopy(model)
    folded = fold_batch_norms(model)
    assert len(folded) == 20 and "layer2.0.downsample.1" in folded
    pixels = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        torch.testing.assert_close(model(pixels), unfolded(pixels), rtol=1e-4, atol=1e-4)


def test_a_model_in_training_mode_is_not_folded() -> None:
    model = load_model("resnet20", RESNET20, 10).train()
    assert fold_batch_norms(model) == []
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 19


class _Branching(nn.Module):
    """Control flow on the data: not traceable, so left as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn(self.conv(x))
        return out if bool(out.mean() > 0) else -out


class _SharedOutput(nn.Module):
    """The convolution's output is read twice: folding would change the second reader's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return self.bn(out) + out


@pytest.mark.parametrize("model_type", [_Branching, _SharedOutput])
def test_models_that_cannot_be_folded_safely_are_left_alone(model_type: type[nn.Module]) -> None:
    model = model_type().eval()
    assert fold_batch_norms(model) == []
    assert isinstance(model.get_submodule("bn"), nn.BatchNorm2d)
