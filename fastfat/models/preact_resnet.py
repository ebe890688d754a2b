"""PreActResNet18 (He et al. 2016, identity mappings) as in the fast_adversarial codebase:
BN-ReLU before each conv, 1x1 conv shortcut (no BN) taken from the pre-activated input when the
shape changes, final BN-ReLU, global average pool, linear head. In each block bn2 directly
follows conv1, so fold_bn folds it there; bn1 and the final BN come after a residual sum and
before a ReLU, so they stay (in eval mode): 9 of the 17 BNs remain in the folded copy."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        # shape change -> projection of the pre-activated input; otherwise the raw input
        self.project = stride != 1 or in_planes != planes
        self.shortcut = (nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))
                         if self.project else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.project else x  # structural flag, fixed at build
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """[B, in_channels, H, W] in [0, 1] -> logits [B, num_classes]."""

    def __init__(self, num_blocks: list[int], num_classes: int = 10, width: int = 64,
                 in_channels: int = 3):
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(width, num_blocks[0], 1)
        self.layer2 = self._make_layer(2 * width, num_blocks[1], 2)
        self.layer3 = self._make_layer(4 * width, num_blocks[2], 2)
        self.layer4 = self._make_layer(8 * width, num_blocks[3], 2)
        self.bn = nn.BatchNorm2d(8 * width)
        self.linear = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(torch.flatten(out, 1))

    def _fold_pairs(self) -> list[tuple[str, str]]:
        """(conv, bn) module names where the BN directly follows the conv: read by fold_bn.

        Each block's conv1 -> bn2 -> ReLU -> conv2 (conv1's only consumer is bn2). Not bn1: it
        follows a ReLU-free residual sum (or the stem conv, whose output is also layer1.0's
        identity shortcut) and precedes the ReLU, and not the final bn, likewise. 8 of the 17
        BNs fold; 9 remain (8 bn1 + the final bn)."""
        return [(f"{name}.conv1", f"{name}.bn2") for name, m in self.named_modules()
                if isinstance(m, PreActBlock)]


def preactresnet18(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> PreActResNet:
    return PreActResNet([2, 2, 2, 2], num_classes, width, in_channels)
