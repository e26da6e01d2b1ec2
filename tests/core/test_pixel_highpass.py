"""The pseudo-layers ``pixels.highpass`` and ``pixels.loghighpass``: the input pixels' mean
high-frequency energy per colour channel and direction, raw and in log space, which
``mahalanobis@pixels.highpass`` and ``mahalanobis@pixels.loghighpass`` read; and
``pixels.chromahighpass``, the same filters over the Cb and Cr channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.core.errors import ModelLoadError
from app.core.features import (
    LOG_HIGHPASS_FLOOR,
    PIXEL_CHROMA_HIGHPASS,
    PIXEL_HIGHPASS,
    PIXEL_LOG_HIGHPASS,
    FeatureNetwork,
    infer_batch,
)
from app.core.models import PRESETS, build_model


def _reference(pixels: np.ndarray) -> np.ndarray:
    """Brute force in numpy, float64: for each channel, the mean absolute horizontal second
    difference, vertical second difference and Immerkaer kernel response over the interior."""
    n, channels, height, width = pixels.shape
    kernels = [
        np.array([[0, 0, 0], [1, -2, 1], [0, 0, 0]], dtype=np.float64),
        np.array([[0, 1, 0], [0, -2, 0], [0, 1, 0]], dtype=np.float64),
        np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64),
    ]
    out = np.zeros((n, channels * 3))
    for i in range(n):
        for c in range(channels):
            image = pixels[i, c].astype(np.float64)
            for j, kernel in enumerate(kernels):
                total = 0.0
                for y in range(1, height - 1):
                    for x in range(1, width - 1):
                        total += abs(float((image[y - 1 : y + 2, x - 1 : x + 2] * kernel).sum()))
                out[i, 3 * c + j] = total / ((height - 2) * (width - 2))
    return out


def _network(layers: list[str]) -> FeatureNetwork:
    torch.manual_seed(0)
    return FeatureNetwork(build_model("resnet20", 10).eval(), layers, PRESETS["cifar"]).eval()


def test_highpass_energy_matches_a_brute_force_reference() -> None:
    pixels = torch.rand(3, 3, 12, 9, generator=torch.Generator().manual_seed(1))
    features = infer_batch(_network([PIXEL_HIGHPASS, "layer3"]), pixels).features
    assert features[PIXEL_HIGHPASS].shape == (3, 9)
    np.testing.assert_allclose(features[PIXEL_HIGHPASS], _reference(pixels.numpy()), rtol=1e-5)


def test_what_the_filters_see() -> None:
    """A flat image has no energy; column stripes (Square's first probe) are seen by the
    horizontal filter only; a ramp (a smooth gradient, natural) by none of them."""
    flat = torch.full((1, 3, 8, 8), 0.5)
    stripes = flat.clone()
    stripes[..., 0::2] += 8 / 255
    ramp = torch.linspace(0, 1, 8).expand(1, 3, 8, 8).contiguous()
    network = _network([PIXEL_HIGHPASS])
    energies = {
        name: infer_batch(network, pixels).features[PIXEL_HIGHPASS].reshape(3, 3)
        for name, pixels in [("flat", flat), ("stripes", stripes), ("ramp", ramp)]
    }
    np.testing.assert_allclose(energies["flat"], 0, atol=1e-6)
    np.testing.assert_allclose(energies["ramp"], 0, atol=1e-6)
    # 0, eps, 0, eps, ...: every second difference is +-2 eps
    np.testing.assert_allclose(energies["stripes"][:, 0], 2 * 8 / 255, rtol=1e-4)
    np.testing.assert_allclose(energies["stripes"][:, 1], 0, atol=1e-6)
    np.testing.assert_allclose(energies["stripes"][:, 2], 0, atol=1e-6)  # constant down columns


def test_highpass_is_float32_at_every_precision_and_leaves_the_model_alone() -> None:
    """Computed from the pixels outside autocast: the same numbers under bf16, and the model's
    own layers and logits unchanged by asking for it."""
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with_it = infer_batch(_network([PIXEL_HIGHPASS, "layer3"]), pixels)
    without = infer_batch(_network(["layer3"]), pixels)
    np.testing.assert_array_equal(with_it.features["layer3"], without.features["layer3"])
    np.testing.assert_array_equal(with_it.probabilities, without.probabilities)
    network = _network([PIXEL_HIGHPASS])
    network.set_execution("bf16")
    low = infer_batch(network, pixels).features[PIXEL_HIGHPASS]
    assert low.dtype == np.float32
    np.testing.assert_array_equal(low, with_it.features[PIXEL_HIGHPASS])


def test_unknown_layer_names_the_pseudo_layers() -> None:
    with pytest.raises(ModelLoadError, match=r"pixels\.highpass"):
        _network(["pixels.lowpass"])


def test_log_highpass_is_the_floored_log_of_the_same_energies() -> None:
    """``pixels.loghighpass`` = log(max(energy, 1/1024)) of the brute-force energies; a flat
    image sits at the floor (finite), and asking for one pseudo-layer does not change the
    other."""
    pixels = torch.rand(3, 3, 12, 9, generator=torch.Generator().manual_seed(3))
    pixels[0] = 0.5  # flat: zero energy
    both = infer_batch(_network([PIXEL_HIGHPASS, PIXEL_LOG_HIGHPASS]), pixels).features
    alone = infer_batch(_network([PIXEL_LOG_HIGHPASS]), pixels).features
    assert set(alone) == {PIXEL_LOG_HIGHPASS}
    expected = np.log(np.maximum(_reference(pixels.numpy()), LOG_HIGHPASS_FLOOR))
    np.testing.assert_allclose(both[PIXEL_LOG_HIGHPASS], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(both[PIXEL_LOG_HIGHPASS], alone[PIXEL_LOG_HIGHPASS])
    np.testing.assert_allclose(both[PIXEL_LOG_HIGHPASS][0], np.log(1 / 1024), rtol=1e-6)
    assert np.isfinite(both[PIXEL_LOG_HIGHPASS]).all()


def _chroma(pixels: np.ndarray) -> np.ndarray:
    """JFIF's Cb and Cr (without their 0.5 offset) of RGB pixels, float64, as (n, 2, H, W)."""
    r, g, b = (pixels[:, c].astype(np.float64) for c in range(3))
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    return np.stack([cb, cr], axis=1)


def test_chroma_energy_is_the_filters_over_cb_and_cr() -> None:
    """``pixels.chromahighpass`` = the brute-force energies of the Cb and Cr channels (6 numbers),
    alone or beside the RGB energies, and leaves those and the model's outputs unchanged."""
    pixels = torch.rand(3, 3, 12, 9, generator=torch.Generator().manual_seed(5))
    alone = infer_batch(_network([PIXEL_CHROMA_HIGHPASS]), pixels).features
    assert set(alone) == {PIXEL_CHROMA_HIGHPASS} and alone[PIXEL_CHROMA_HIGHPASS].shape == (3, 6)
    expected = _reference(_chroma(pixels.numpy()))
    np.testing.assert_allclose(alone[PIXEL_CHROMA_HIGHPASS], expected, rtol=1e-5, atol=1e-7)
    both = infer_batch(_network([PIXEL_HIGHPASS, PIXEL_CHROMA_HIGHPASS, "layer3"]), pixels)
    rgb = infer_batch(_network([PIXEL_HIGHPASS, "layer3"]), pixels)
    np.testing.assert_array_equal(both.features[PIXEL_HIGHPASS], rgb.features[PIXEL_HIGHPASS])
    np.testing.assert_array_equal(both.features["layer3"], rgb.features["layer3"])
    np.testing.assert_array_equal(both.probabilities, rgb.probabilities)
    np.testing.assert_array_equal(
        both.features[PIXEL_CHROMA_HIGHPASS], alone[PIXEL_CHROMA_HIGHPASS]
    )


def test_chroma_sees_colour_noise_and_not_grey_texture() -> None:
    """A grey image (R = G = B), however textured, has no chroma at all; the same image with
    +-2/255 of noise in one colour channel has chroma energy, while its RGB energy barely
    moves against the texture's."""
    generator = torch.Generator().manual_seed(6)
    texture = torch.rand(1, 1, 16, 16, generator=generator).expand(1, 3, 16, 16).contiguous()
    noise = torch.zeros_like(texture)
    noise[:, 2] = (torch.randint(0, 2, (16, 16), generator=generator) * 2 - 1) * 2 / 255
    network = _network([PIXEL_HIGHPASS, PIXEL_CHROMA_HIGHPASS])
    grey = infer_batch(network, texture).features
    noisy = infer_batch(network, texture + noise).features
    np.testing.assert_allclose(grey[PIXEL_CHROMA_HIGHPASS], 0, atol=1e-6)
    assert (noisy[PIXEL_CHROMA_HIGHPASS] > 1e-3).all()
    rgb_change = np.abs(noisy[PIXEL_HIGHPASS] - grey[PIXEL_HIGHPASS]).max()
    assert rgb_change < 0.1 * grey[PIXEL_HIGHPASS].min()
