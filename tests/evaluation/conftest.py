"""The evaluation tests' shared photos: the demo bundle's guard, and CIFAR-10 test photos it
classifies correctly and accepts."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from app.core.guard import Guard
from tests.conftest import CIFAR_TAR, DEMO_BUNDLE


@pytest.fixture(scope="module")
def guard() -> Guard:
    torch.set_num_threads(1)
    return Guard.load(DEMO_BUNDLE, device="cpu")


@pytest.fixture(scope="module")
def labelled(guard: Guard) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 test photos the model classifies correctly and the guard accepts, 2 per class."""
    images, labels = [], []
    names = guard.class_names
    counts = dict.fromkeys(names, 0)
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or parts[0] != "test" or counts.get(parts[1], 2) >= 4:
                continue
            handle = tar.extractfile(member)
            assert handle is not None
            picture = Image.open(io.BytesIO(handle.read())).convert("RGB")
            images.append(np.asarray(picture).transpose(2, 0, 1))
            labels.append(names.index(parts[1]))
            counts[parts[1]] += 1
            if all(c >= 4 for c in counts.values()):
                break
    pixels, targets = np.stack(images), np.array(labels)
    verdicts = guard.classify_pixels(torch.from_numpy(pixels.astype(np.float32) / 255.0))
    keep = [v.accepted and v.predicted_class == t for v, t in zip(verdicts, targets, strict=True)]
    return pixels[keep], targets[keep]
