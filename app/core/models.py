"""Classifier construction: architecture name + local weights file -> ``nn.Module`` in eval mode.

Two families: the CIFAR-10 ResNets (``resnet20`` ... ``resnet110``, option-A shortcuts) and every
torchvision classification model (``resnet50``, ``vit_b_16``, ...). Weights always come from a local
file: nothing is ever downloaded. Preprocessing presets live here too because a model and its
preprocessing are one unit: the bundle records both and the service replays them exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torchvision
from torch import nn

from app.core.cifar_resnet import CIFAR_RESNET_DEPTHS, cifar_resnet
from app.core.errors import ModelLoadError

ModelFamily = Literal["cifar", "torchvision"]
PresetName = Literal["cifar", "imagenet"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessingPreset:
    """Geometry and normalisation of one model family.

    Resize + centre crop + scaling to [0, 1] happen on the image ("pixels", the box an attacker
    perturbs); normalisation happens inside the network wrapper so attacks can work in pixel space.
    """

    name: PresetName
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


PRESETS: dict[str, PreprocessingPreset] = {
    # CIFAR checkpoints were trained on 32x32 inputs with ImageNet statistics (../shared/README.md).
    "cifar": PreprocessingPreset("cifar", 32, 32, IMAGENET_MEAN, IMAGENET_STD),
    # torchvision's ImageNet classification recipe.
    "imagenet": PreprocessingPreset("imagenet", 256, 224, IMAGENET_MEAN, IMAGENET_STD),
}


@dataclass(frozen=True)
class ArchitectureInfo:
    family: ModelFamily
    arch: str
    preset: PresetName
    default_layer: str


def _torchvision_classifiers() -> list[str]:
    names: list[str] = torchvision.models.list_models(module=torchvision.models)
    return names


def describe_architecture(arch: str) -> ArchitectureInfo:
    """Resolve an architecture name to its family, preprocessing and default feature layer.

    The default layer is the paper's pool5 analogue: the output of the last convolutional stage,
    i.e. the input of the global average pool.
    """
    if arch in CIFAR_RESNET_DEPTHS:
        return ArchitectureInfo("cifar", arch, "cifar", "layer3")
    known = _torchvision_classifiers()
    if arch not in known:
        raise ModelLoadError(
            f"unknown architecture {arch!r}: use one of the CIFAR ResNets "
            f"{sorted(CIFAR_RESNET_DEPTHS)} or a torchvision classification model "
            f"(e.g. resnet18, resnet50, vit_b_16; {len(known)} available)"
        )
    if arch.startswith(("resnet", "resnext", "wide_resnet")):
        layer = "layer4"
    elif arch.startswith(("vit_", "swin_", "maxvit")):
        layer = "encoder" if arch.startswith("vit_") else "features"
    else:
        layer = "features"
    return ArchitectureInfo("torchvision", arch, "imagenet", layer)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract_state_dict(loaded: Any) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or the nested ``{"state_dict": ...}`` form; strip ``module.``."""
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError("weights file does not hold a state dict of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}


def build_model(arch: str, num_classes: int) -> nn.Module:
    """An uninitialised network of the named architecture (random weights)."""
    info = describe_architecture(arch)
    if info.family == "cifar":
        return cifar_resnet(arch, num_classes=num_classes)
    model: nn.Module = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    return model


def _first_line(text: str, limit: int = 200) -> str:
    """The first line of ``text``, cut at ``limit`` characters: enough to say what is wrong."""
    line = text.strip().splitlines()[0] if text.strip() else "no reason given"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def load_model(arch: str, weights_path: Path, num_classes: int) -> nn.Module:
    """Build ``arch`` and load ``weights_path`` strictly; raise ``ModelLoadError`` on any misfit."""
    info = describe_architecture(arch)
    if not weights_path.is_file():
        raise ModelLoadError(f"weights file not found: {weights_path}")
    try:
        loaded = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and format errors all mean "not a weights file"
        reason = _first_line(f"{type(exc).__name__}: {exc}")
        raise ModelLoadError(
            f"cannot read weights file {weights_path}: not a PyTorch state dict ({reason})"
        ) from exc
    state = _extract_state_dict(loaded)
    model = build_model(info.arch, num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # its key lists can run to kilobytes: each line is cut short
        first_lines = "\n".join(_first_line(line) for line in str(exc).splitlines()[:4])
        raise ModelLoadError(
            f"weights in {weights_path.name} do not fit {arch} with {num_classes} classes:\n"
            f"{first_lines}"
        ) from exc
    return model.eval()


def residual_blocks(model: nn.Module) -> list[str]:
    """Names of every residual block, in forward order: the children of each ``layerN`` stage
    (CIFAR ResNets: 3 stages of n blocks; torchvision ResNets: ``layer1.0`` ... ``layer4.2``)."""
    blocks = []
    for stage_name, stage in model.named_children():
        if stage_name.startswith("layer") and isinstance(stage, nn.Sequential):
            blocks += [f"{stage_name}.{child}" for child, _ in stage.named_children()]
    if not blocks:
        raise ModelLoadError(f"{type(model).__name__} has no residual stages named layerN")
    return blocks


def logits_layer(model: nn.Module) -> str:
    """Name of the module whose output is the logits: the last linear layer in the model's
    module order (``linear`` for the CIFAR ResNets, ``fc`` for torchvision's)."""
    linear: list[str] = [
        name for name, module in model.named_modules() if isinstance(module, nn.Linear)
    ]
    if not linear:
        raise ModelLoadError(f"{type(model).__name__} has no linear layer to read logits from")
    return linear[-1]
