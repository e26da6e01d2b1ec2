"""Fixtures shared by every test package: tiny real image folders and random-weight models.

Nothing here downloads anything; real CIFAR-10 data and checkpoints come from ../shared.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
CIFAR_TAR = SHARED / "data" / "cifar10-jpeg.tar.gz"
RESNET20 = SHARED / "models" / "resnet20-12fca82f.th"
DEMO_BUNDLE = REPO / "bundles" / "cifar10-resnet20"


def random_image_bytes(rng: np.random.Generator, size: int, tint: int, fmt: str = "PNG") -> bytes:
    """A noisy image whose mean colour depends on ``tint`` (so classes differ a little)."""
    base = np.zeros((size, size, 3), dtype=np.float64)
    base[..., tint % 3] = 120.0
    pixels = np.clip(base + rng.normal(0, 60, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


ImageFolderFactory = Callable[..., Path]


@pytest.fixture
def make_image_folder(tmp_path: Path) -> ImageFolderFactory:
    """make_image_folder(classes=3, per_class=8, size=32, corrupt=0) -> ImageFolder root.

    ``corrupt`` extra files per class are truncated or garbage "images" the builder must skip.
    """

    def factory(
        classes: int = 3, per_class: int = 8, size: int = 32, corrupt: int = 0, name: str = "imgs"
    ) -> Path:
        rng = np.random.default_rng(0)
        root = tmp_path / name
        for label in range(classes):
            folder = root / f"class_{label:02d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                fmt = "PNG" if i % 2 else "JPEG"
                suffix = ".png" if fmt == "PNG" else ".jpg"
                (folder / f"{i:04d}{suffix}").write_bytes(random_image_bytes(rng, size, label, fmt))
            for i in range(corrupt):
                data = random_image_bytes(rng, size, label, "JPEG")
                bad = data[: len(data) // 3] if i % 2 == 0 else b"not an image at all"
                (folder / f"bad_{i:02d}.jpg").write_bytes(bad)
        return root

    return factory


def save_state_dict(model: torch.nn.Module, path: Path, nested: bool) -> Path:
    state = model.state_dict()
    if nested:  # the ../shared checkpoint format: DataParallel prefix inside {"state_dict": ...}
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        torch.save(state, path)
    return path


@pytest.fixture
def cifar_weights(tmp_path: Path) -> Callable[[int], Path]:
    """Random-weight CIFAR ResNet-20 checkpoint with ``num_classes`` outputs, nested format."""
    from app.core.cifar_resnet import cifar_resnet

    def factory(num_classes: int = 3) -> Path:
        torch.manual_seed(0)
        return save_state_dict(
            cifar_resnet("resnet20", num_classes), tmp_path / f"r20_{num_classes}.th", nested=True
        )

    return factory
