"""The model's execution settings (``FeatureNetwork.set_execution``): autocast and channels_last.

bench/gpu/run.sh times them on a GPU and keeps the fastest that leaves decisions unchanged; here,
on the CPU, they must run, keep features float32 and stay close to the fp32 forward pass.
"""

from __future__ import annotations

import numpy as np
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
    assert not settings.model_traced
    monkeypatch.setenv("ADVGUARD_MODEL_TRACED", "true")
    assert Settings().model_traced


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


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def test_a_traced_forward_gives_the_eager_values_bit_for_bit() -> None:
    """The demo bundle's model and pooled features, traced, at batch sizes other than the one
    it was traced with: the same logits, probabilities, predictions and features, bit for bit,
    and the same verdicts."""
    eager = Guard.load(DEMO_BUNDLE, device="cpu")
    traced = Guard.load(DEMO_BUNDLE, device="cpu", traced=True)
    assert traced.network.traced and not eager.network.traced
    torch.manual_seed(3)
    for n in (1, 5, 33):
        pixels = torch.rand(n, 3, 32, 32)
        a, b = infer_batch(eager.network, pixels), infer_batch(traced.network, pixels)
        assert _same_bits(a.probabilities, b.probabilities)
        assert _same_bits(a.predictions, b.predictions)
        assert sorted(a.features) == sorted(b.features)
        assert all(_same_bits(a.features[k], b.features[k]) for k in a.features)
        assert eager.classify_pixels(pixels) == traced.classify_pixels(pixels)


def test_only_forward_passes_without_gradients_run_the_traced_graph(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The attacks' forward passes (with gradients) stay on the eager modules, and get the
    eager gradient; a gradient-free pass never calls them."""
    network = _network()
    pixels = torch.rand(4, 3, 32, 32, requires_grad=True)
    network(pixels).logits.sum().backward()
    assert pixels.grad is not None
    eager_grad = pixels.grad.clone()
    network.trace(torch.zeros(2, 3, 32, 32))
    pixels.grad = None
    network(pixels).logits.sum().backward()
    assert torch.equal(pixels.grad, eager_grad)

    def eager_forbidden(normalised: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise AssertionError("the eager modules ran")

    monkeypatch.setattr(network, "captured_forward", eager_forbidden)
    with torch.inference_mode():
        assert network(torch.rand(2, 3, 32, 32)).logits.shape == (2, 10)
    with pytest.raises(AssertionError, match="eager modules ran"):
        network(pixels)


def test_tracing_needs_fp32_and_a_new_execution_drops_the_trace() -> None:
    network = _network()
    network.set_execution("bf16")
    with pytest.raises(ValueError, match="fp32"):
        network.trace(torch.zeros(1, 3, 32, 32))
    network.set_execution("fp32", channels_last=True)
    network.trace(torch.zeros(1, 3, 32, 32))
    assert network.traced
    assert sorted(network.state_dict()) == sorted(_network().state_dict())  # no second copy
    network.set_execution("fp32")
    assert not network.traced
