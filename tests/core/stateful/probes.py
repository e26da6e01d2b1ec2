"""What a query attack sends and the photos it starts from: the probes the stateful tests
(here and in tests/service, tests/evaluation) feed the fingerprints and stores."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.honest_traffic import train_photos
from tests.conftest import CIFAR_TAR

SECRET = b"test-secret"


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """The first 40 CIFAR-10 training photos of the archive, (40, 3, 32, 32) uint8."""
    return train_photos(CIFAR_TAR, 40)


def square_step(image: np.ndarray, rng: np.random.Generator, size: int = 5) -> np.ndarray:
    """What a Square attack query looks like: its current image with a square moved by +-8/255
    per channel."""
    out = image.astype(np.int16)
    top, left = rng.integers(0, 32 - size, 2)
    out[:, top : top + size, left : left + size] += rng.choice([-8, 8], size=(3, 1, 1))
    stepped: np.ndarray = np.clip(out, 0, 255).astype(np.uint8)
    return stepped


def noise_step(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a HopSkipJump gradient-estimation query looks like once rounded to 8 bits: its
    boundary point with +-1 grey level on a third of the values (the recorded runs' consecutive
    queries share a median of 30 sketch bits; these pairs too)."""
    change = rng.choice([-1, 0, 1], p=[1 / 6, 2 / 3, 1 / 6], size=image.shape)
    stepped: np.ndarray = np.clip(image.astype(np.int16) + change, 0, 255).astype(np.uint8)
    return stepped


def attack_sequence(image: np.ndarray, length: int, seed: int) -> np.ndarray:
    """The photo, then probes around it, alternately Square-like and HopSkipJump-like."""
    rng = np.random.default_rng(seed)
    probes = [(square_step if i % 2 else noise_step)(image, rng) for i in range(length - 1)]
    return np.stack([image, *probes])
