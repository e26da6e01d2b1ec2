"""The CIFAR-10 ResNet family of He et al. 2016 (Section 4.2), with option-A shortcuts.

Option A: the shortcut of a block that halves the resolution and doubles the width subsamples by
2 and zero-pads the new channels, so it has no parameters. Parameter names follow the widely used
checkpoints in ../shared/models (``conv1``, ``bn1``, ``layer1..3``, ``linear``), so their state
dicts load without renaming once the DataParallel ``module.`` prefix is stripped. ``avgpool`` is a
parameter-free module (not a functional call) so that its input can be hooked like torchvision's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CIFAR_RESNET_DEPTHS: dict[str, int] = {
    "resnet20": 20,
    "resnet32": 32,
    "resnet44": 44,
    "resnet56": 56,
    "resnet110": 110,
}


class _ZeroPadShortcut(nn.Module):
    """Option-A shortcut: stride-2 subsampling plus zero channels, no parameters."""

    def __init__(self, pad_channels: int) -> None:
        super().__init__()
        self.pad_channels = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_channels, self.pad_channels))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = _ZeroPadShortcut(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """conv1(16) -> layer1(16, 32x32) -> layer2(32, 16x16) -> layer3(64, 8x8) -> GAP -> linear."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_stage(16, blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(32, blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(64, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for block_stride in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, block_stride))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(self.avgpool(out), 1)
        logits: torch.Tensor = self.linear(out)
        return logits


def cifar_resnet(arch: str, num_classes: int = 10) -> CifarResNet:
    """Build an uninitialised CIFAR ResNet by name (``resnet20`` ... ``resnet110``)."""
    return CifarResNet(CIFAR_RESNET_DEPTHS[arch], num_classes=num_classes)
