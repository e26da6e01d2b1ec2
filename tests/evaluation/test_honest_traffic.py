"""The honest look-alike traffic (evaluation.honest_traffic) on the demo bundle and real CIFAR-10
photos: its queries are what the service sees, and interleaving keeps each client's order."""

from __future__ import annotations

import numpy as np

from app.core.guard import Guard
from evaluation.honest_traffic import (
    HonestQuery,
    as_served,
    encode,
    interleave,
    to_pil,
)


def test_honest_queries_are_what_the_service_sees(
    guard: Guard, labelled: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = labelled
    png = as_served(encode(to_pil(images[0]), None), guard.preset)
    assert np.array_equal(png, images[0])  # a 32x32 PNG passes unchanged
    big = as_served(encode(to_pil(images[0]).resize((64, 64)), 90), guard.preset)
    assert big.shape == (3, 32, 32) and big.dtype == np.uint8


def test_interleave_keeps_each_clients_order() -> None:
    image = np.zeros((3, 2, 2), np.uint8)
    clients = [[HonestQuery(f"c{c}", "plain", image + i) for i in range(5)] for c in range(4)]
    merged = list(interleave(clients, seed=0))
    assert len(merged) == 20
    for c in range(4):
        mine = [int(q.image[0, 0, 0]) for q in merged if q.client == f"c{c}"]
        assert mine == list(range(5))
