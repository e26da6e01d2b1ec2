"""The model's execution settings (``FeatureNetwork.set_execution``): autocast and channels_last.

bench/gpu/run.sh times them on a GPU and keeps the fastest that leaves decisions unchanged; here,
on the CPU, they must run, keep features float32 and stay close to the fp32 forward pass.
"""

from __future__ import annotations

import pytest
import torch

from app.core.cifar_resnet import cifar_resnet
from app.core.features import FeatureNetwork, infer_batch
from app.core.guard import Guard
from app.core.models import PRESETS
from app.service.settings import Settings
from tests.conftest import DEMO_BUNDLE


def _network() -> FeatureNetwork:
    torch.manual_seed(0)
    model = cifar_resnet("resnet20", num_classes=10).eval()
    return FeatureNetwork(model, ["layer2", "layer3"], PRESETS["cifar"]).eval()


@pytest.mark.parametrize(("precision", "channels_last"), [("fp32", True), ("bf16", False)])
def test_execution_settings_keep_float32_features_close_to_fp32(
    precision: str, channels_last: bool
) -> None:
    network = _network()
    pixels = torch.rand(6, 3, 32, 32)
    reference = infer_batch(network, pixels)
    network.set_execution(precision, channels_last)  # type: ignore[arg-type]
    assert network.precision == precision and network.channels_last is channels_last
    changed = infer_batch(network, pixels)
    for layer in ("layer2", "layer3"):
        assert changed.features[layer].dtype == reference.features[layer].dtype
        tolerance = 1e-5 if precision == "fp32" else 5e-2
        assert torch.allclose(
            torch.from_numpy(changed.features[layer]),
            torch.from_numpy(reference.features[layer]),
            rtol=tolerance,
            atol=tolerance,
        )
    network.set_execution()  # back to the default: the same numbers as before
    again = infer_batch(network, pixels)
    assert (again.features["layer3"] == reference.features["layer3"]).all()


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown precision"):
        _network().set_execution("fp8")  # type: ignore[arg-type]


def test_the_service_reads_precision_and_memory_format(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert (settings.model_precision, settings.channels_last) == ("fp32", False)
    monkeypatch.setenv("ADVGUARD_MODEL_PRECISION", "bf16")
    monkeypatch.setenv("ADVGUARD_CHANNELS_LAST", "true")
    assert (Settings().model_precision, Settings().channels_last) == ("bf16", True)


def test_guard_load_applies_the_execution_settings() -> None:
    guard = Guard.load(DEMO_BUNDLE, device="cpu", precision="bf16", channels_last=True)
    assert guard.network.precision == "bf16" and guard.network.channels_last
    verdicts = guard.classify_pixels(torch.rand(3, 3, 32, 32))
    assert len(verdicts) == 3 and all(0.0 <= v.probability <= 1.0 for v in verdicts)


def _conv_precision_seen_in_forward(network: FeatureNetwork) -> list[str]:
    """What cuDNN's float32 convolution setting was while the model ran (read from a hook)."""
    seen: list[str] = []

    def record(_module: torch.nn.Module, _inputs: object, _output: object) -> None:
        seen.append(str(torch.backends.cudnn.conv.fp32_precision))  # type: ignore[attr-defined]

    handle = network.model.register_forward_hook(record)
    try:
        infer_batch(network, torch.rand(2, 3, 32, 32))
    finally:
        handle.remove()
    return seen


def test_fp32_means_ieee_convolutions_inside_the_forward_pass_only() -> None:
    """cuDNN's default TF32 moved predictions on the H200 (bench/results/gpu): under fp32 the
    forward pass runs IEEE float32 convolutions, and the process's setting is restored after."""
    conv = torch.backends.cudnn.conv  # type: ignore[attr-defined]
    before = conv.fp32_precision
    conv.fp32_precision = "tf32"
    try:
        network = _network()
        assert _conv_precision_seen_in_forward(network) == ["ieee"]
        assert conv.fp32_precision == "tf32"
        network.set_execution("bf16")  # the explicit lower-precision choice is left alone
        assert _conv_precision_seen_in_forward(network) == ["tf32"]
    finally:
        conv.fp32_precision = before
