from pathlib import Path

import pytest
import torch

from app.core.errors import ModelLoadError
from app.core.features import FeatureNetwork, global_average_pool
from app.core.models import PRESETS, build_model, describe_architecture, load_model, logits_layer
from tests.conftest import RESNET20, save_state_dict


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="unknown architecture 'resnet21'"):
        describe_architecture("resnet21")


def test_missing_weights_file(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("resnet20", tmp_path / "nope.th", 10)


def test_weights_that_do_not_fit(tmp_path: Path, cifar_weights):
    with pytest.raises(ModelLoadError, match="do not fit resnet32"):
        load_model("resnet32", cifar_weights(10), 10)
    with pytest.raises(ModelLoadError, match="do not fit resnet20 with 7 classes"):
        load_model("resnet20", cifar_weights(10), 7)
    (tmp_path / "junk.th").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="cannot read") as junk:
        load_model("resnet20", tmp_path / "junk.th", 10)
    assert "not a PyTorch state dict (" in str(junk.value) and "\n" not in str(junk.value)
    (tmp_path / "empty.th").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"empty\.th: not a PyTorch state dict \(\w+"):
        load_model("resnet20", tmp_path / "empty.th", 10)


def test_a_misfit_is_said_in_a_few_short_lines(cifar_weights) -> None:
    """resnet20's weights under resnet56: torch lists every unexpected key on one line, kilobytes
    of them; the error keeps four lines of at most 200 characters."""
    with pytest.raises(ModelLoadError, match="do not fit resnet56") as misfit:
        load_model("resnet56", cifar_weights(10), 10)
    lines = str(misfit.value).splitlines()
    assert 2 <= len(lines) <= 5 and max(len(line) for line in lines[1:]) <= 200


def test_shared_cifar_checkpoint_loads_with_module_prefix():
    model = load_model("resnet20", RESNET20, 10)
    assert not model.training
    net = FeatureNetwork(model, ["layer1", "layer3"], PRESETS["cifar"])
    out = net(torch.rand(2, 3, 32, 32))
    assert out.logits.shape == (2, 10)
    assert out.features["layer1"].shape == (2, 16) and out.features["layer3"].shape == (2, 64)


@pytest.mark.parametrize("depth", ["resnet32", "resnet44", "resnet56", "resnet110"])
def test_cifar_family_round_trips_plain_state_dicts(tmp_path: Path, depth: str):
    path = save_state_dict(build_model(depth, 10), tmp_path / f"{depth}.pt", nested=False)
    assert describe_architecture(depth).default_layer == "layer3"
    load_model(depth, path, 10)


def test_torchvision_model_by_name(tmp_path: Path):
    path = save_state_dict(build_model("resnet18", 5), tmp_path / "r18.pt", nested=False)
    model = load_model("resnet18", path, 5)
    info = describe_architecture("resnet18")
    assert info.preset == "imagenet" and info.default_layer == "layer4"
    net = FeatureNetwork(model, ["avgpool", "layer4"], PRESETS["imagenet"])
    out = net(torch.rand(1, 3, 224, 224))
    torch.testing.assert_close(out.features["avgpool"], out.features["layer4"])
    assert out.features["avgpool"].shape == (1, 512)


def test_unknown_layer_and_pooling_shapes():
    with pytest.raises(ModelLoadError, match="no layer named"):
        FeatureNetwork(build_model("resnet20", 10), ["pool5"], PRESETS["cifar"])
    assert global_average_pool(torch.ones(2, 5, 3, 3)).shape == (2, 5)
    assert global_average_pool(torch.ones(2, 7, 5)).shape == (2, 5)


@pytest.mark.parametrize(
    ("arch", "size", "expected"), [("resnet20", 32, "linear"), ("resnet18", 64, "fc")]
)
def test_logits_layer_outputs_the_logits(arch: str, size: int, expected: str):
    """The hooked output of ``logits_layer`` is what the forward pass returns: the margin
    statistic reads the same numbers the prediction comes from."""
    torch.manual_seed(0)
    model = build_model(arch, 7).eval()
    name = logits_layer(model)
    assert name == expected
    preset = PRESETS[describe_architecture(arch).preset]
    out = FeatureNetwork(model, [name], preset)(torch.rand(3, 3, size, size))
    torch.testing.assert_close(out.features[name], out.logits.float(), rtol=0, atol=0)


def test_logits_layer_of_a_model_without_a_linear_layer_is_an_error():
    with pytest.raises(ModelLoadError, match="no linear layer"):
        logits_layer(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()))
