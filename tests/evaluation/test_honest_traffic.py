"""The honest look-alike traffic (evaluation.honest_traffic) on the demo bundle and real CIFAR-10
photos: its queries are what the service sees, and interleaving keeps each client's order."""

from __future__ import annotations

import numpy as np

from app.core.guard import Guard
from app.core.images import encode_image
from evaluation.honest_traffic import (
    HonestQuery,
    as_served,
    interleave,
    stored,
    to_pil,
)


def test_honest_queries_are_what_the_service_sees(
    guard: Guard, labelled: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = labelled
    png = as_served(encode_image(to_pil(images[0]), None), guard.preset)
    assert np.array_equal(png, images[0])  # a 32x32 PNG passes unchanged
    big = as_served(encode_image(to_pil(images[0]).resize((64, 64)), 90), guard.preset)
    assert big.shape == (3, 32, 32) and big.dtype == np.uint8


def test_interleave_keeps_each_clients_order() -> None:
    image = np.zeros((3, 2, 2), np.uint8)
    clients = [[HonestQuery(f"c{c}", "plain", image + i) for i in range(5)] for c in range(4)]
    merged = list(interleave(clients, seed=0))
    assert len(merged) == 20
    for c in range(4):
        mine = [int(q.image[0, 0, 0]) for q in merged if q.client == f"c{c}"]
        assert mine == list(range(5))


def test_a_png_is_the_adversarial_rounded_and_a_jpeg_smooths_its_colour(guard: Guard) -> None:
    """PNG: the served pixels are the adversarial rounded to 8 bits (a 32x32 upload is served as
    it is); JPEG 95 with 4:2:0: the colour channels lose fine detail, so the served image's
    chroma varies less between neighbouring pixels than the adversarial's."""
    preset = guard.preset
    rng = np.random.default_rng(0)
    adversarial = rng.uniform(0.0, 1.0, (3, 3, 32, 32)).astype(np.float32)
    png = stored(adversarial, None, preset)
    np.testing.assert_array_equal(png, np.rint(adversarial * 255.0).astype(np.uint8))
    jpeg = stored(adversarial, 95, preset).astype(np.float64)

    def chroma_roughness(pixels: np.ndarray) -> float:
        red_minus_green = pixels[:, 0] - pixels[:, 1]
        return float(np.abs(np.diff(red_minus_green, axis=-1)).mean())

    assert jpeg.shape == png.shape
    assert chroma_roughness(jpeg) < 0.5 * chroma_roughness(png.astype(np.float64))
