"""The pseudo-layer ``jpeg.logits``: the classifier's logits on the image stored as a JPEG at
quality 75 and decoded (the JPEG squeezer, Das et al. 2017), which ``margin@jpeg.logits`` (the
JPEG margin, selection round 12) reads."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import torch
from PIL import Image

from app.core.features import (
    JPEG_SQUEEZE_QUALITY,
    FeatureNetwork,
    image_to_pixels,
    jpeg_squeeze,
)
from app.core.images import decode_image, encode_image, jpeg_round_trip
from app.core.models import PRESETS, build_model
from tests.conftest import CIFAR_TAR


def _network(layers: list[str]) -> FeatureNetwork:
    torch.manual_seed(0)
    return FeatureNetwork(build_model("resnet20", 10).eval(), layers, PRESETS["cifar"]).eval()


def _photo_like(seed: int, count: int) -> torch.Tensor:
    """Smooth images with some texture, as 8-bit values: JPEG keeps them near, not equal."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((count, 3, 4, 4))
    smooth = coarse.repeat(8, axis=2).repeat(8, axis=3) + 0.05 * rng.random((count, 3, 32, 32))
    return torch.from_numpy(np.round(np.clip(smooth, 0, 1) * 255) / 255).float()


def test_the_squeeze_is_an_upload_stored_at_quality_75_and_decoded_as_the_service_does():
    """Each image, as 8 bits, saved by Pillow as a JPEG at quality 75 and read back through the
    service's own decoding (``decode_image`` + ``image_to_pixels``): the same values bit for
    bit; the file is a 4:2:0 JPEG at 75 (libjpeg's luminance table at that quality)."""
    pixels = _photo_like(1, 3)
    squeezed = jpeg_squeeze(pixels)
    for image, got in zip(pixels, squeezed, strict=True):
        eight_bit = (image.numpy() * 255).round().astype(np.uint8).transpose(1, 2, 0)
        data = encode_image(Image.fromarray(eight_bit), JPEG_SQUEEZE_QUALITY)
        expected = image_to_pixels(decode_image(data, min_size=32), PRESETS["cifar"])
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        stored = Image.open(io.BytesIO(data))
        assert stored.format == "JPEG" and stored.layer[0][1:3] == (2, 2)  # 4:2:0
        assert stored.quantization[0][:6] == [8, 6, 5, 8, 12, 20]  # libjpeg's at 75
    assert not torch.equal(squeezed, pixels)  # lossy: it changed them


def _cifar_test_photos(count: int) -> torch.Tensor:
    """The first ``count`` test photos of the real CIFAR-10 archive (JPEGs at quality 75), as
    the service reads them."""
    photos = []
    with tarfile.open(CIFAR_TAR) as archive:
        for member in archive:
            if member.name.startswith("test/") and member.name.endswith(".jpg"):
                data = archive.extractfile(member).read()  # type: ignore[union-attr]
                photos.append(image_to_pixels(decode_image(data), PRESETS["cifar"]))
                if len(photos) == count:
                    break
    return torch.stack(photos)


def test_real_photos_come_back_nearly_unchanged_and_dense_noise_does_not():
    """What the statistic reads, on real CIFAR-10 photos (stored at quality 75): squeezed, they
    move by a fraction of a grey level on average (measured 0.27), while dense +-8/255 noise
    added to them is mostly quantised away (measured: 7.8 grey levels off the photo, 3.3 after
    the squeeze)."""
    photos = _cifar_test_photos(16)
    assert (jpeg_squeeze(photos) - photos).abs().mean() * 255 < 1.0
    sign = torch.sign(torch.randn(photos.shape, generator=torch.Generator().manual_seed(3)))
    noisy = ((photos + 8 / 255 * sign).clamp(0, 1) * 255).round() / 255
    assert (noisy - photos).abs().mean() * 255 > 7
    assert (jpeg_squeeze(noisy) - photos).abs().mean() * 255 < 4


def test_the_gradient_passes_straight_through():
    """BPDA: with a gradient wanted the values are the round trip's (within float rounding) and
    the gradient of a sum is one for every pixel; without, the values are exactly the round
    trip's."""
    pixels = _photo_like(4, 2).requires_grad_(True)
    squeezed = jpeg_squeeze(pixels)
    torch.testing.assert_close(squeezed, jpeg_squeeze(pixels.detach()), rtol=0, atol=1e-6)
    (squeezed * torch.arange(3.0).view(1, 3, 1, 1)).sum().backward()
    assert pixels.grad is not None
    expected = torch.arange(3.0).view(1, 3, 1, 1).expand_as(pixels)
    torch.testing.assert_close(pixels.grad, expected)


def test_a_client_reencoding_is_the_same_round_trip():
    """``jpeg_round_trip`` is what the honest-edit study's JPEG edits apply too: one codec."""
    image = Image.fromarray(
        (_photo_like(8, 1)[0].numpy() * 255).round().astype(np.uint8).transpose(1, 2, 0)
    )
    again = jpeg_round_trip(image, 75)
    assert again.mode == "RGB" and again.size == image.size
    decoded = decode_image(encode_image(image, 75))
    assert np.array_equal(np.asarray(again), np.asarray(decoded.convert("RGB")))
