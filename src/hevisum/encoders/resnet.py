"""ResNet-50 with timm's (and torchvision's) parameter names: ``conv1``, ``bn1``, ``layer1.0.conv1`` … ``layer4``.

Stem: 7x7/2 convolution, BatchNorm, ReLU, 3x3/2 max-pool. Four stages of bottleneck blocks (3, 4, 6, 3) with
the stride on the 3x3 convolution and a 1x1 convolution + BatchNorm shortcut (``downsample.0/1``) where the
shape changes. ``forward_features`` returns the last feature map; ``forward`` its global average (2048-d).
"""

from __future__ import annotations

import torch
from torch import nn

RESNET50_LAYERS = (3, 4, 6, 3)


class Bottleneck(nn.Module):
    """1x1 reduce → 3x3 (stride) → 1x1 expand (x4), each with BatchNorm; ReLU after the residual sum."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.act = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One block."""
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.act(self.bn1(self.conv1(x)))
        y = self.act(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.act(y + shortcut)


class ResNet50(nn.Module):
    """ResNet-50 trunk without classifier (``num_features`` = 2048)."""

    num_features = 2048

    def __init__(self, layers: tuple[int, int, int, int] = RESNET50_LAYERS) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, n_blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            blocks = []
            for j in range(n_blocks):
                stride = 2 if (j == 0 and i > 0) else 1
                blocks.append(Bottleneck(inplanes, planes, stride))
                inplanes = planes * Bottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images → (B, 2048, H/32, W/32)."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, 2048) global average pool."""
        return self.forward_features(x).mean(dim=(2, 3))
