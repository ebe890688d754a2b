"""CIFAR ResNet18 / ResNet50 (post-activation, He et al. 2016, as in the usual CIFAR codebases):
3x3 stride-1 stem, no max-pool, four stages of width*[1, 2, 4, 8] channels, BN after every conv,
global average pool, linear head. Inputs are [0, 1] images, no normalization inside."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """1x1 conv + BN when the shape changes, identity otherwise (structural, not data-dependent)."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))

    def _fold_pairs(self) -> list[tuple[str, str]]:
        pairs = [("conv1", "bn1"), ("conv2", "bn2")]
        return pairs + ([("shortcut.0", "shortcut.1")] if isinstance(self.shortcut, nn.Sequential) else [])


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))

    def _fold_pairs(self) -> list[tuple[str, str]]:
        pairs = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
        return pairs + ([("shortcut.0", "shortcut.1")] if isinstance(self.shortcut, nn.Sequential) else [])


class ResNet(nn.Module):
    """[B, in_channels, H, W] in [0, 1] -> logits [B, num_classes]; any H, W >= 8 works
    (adaptive pooling: on 32x32 it is the usual avg-pool 4 over the 4x4 map)."""

    def __init__(self, block: type, num_blocks: list[int], num_classes: int = 10,
                 width: int = 64, in_channels: int = 3):
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 2 * width, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, num_blocks[3], stride=2)
        self.linear = nn.Linear(8 * width * block.expansion, num_classes)

    def _make_layer(self, block: type, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(torch.flatten(out, 1))

    def _fold_pairs(self) -> list[tuple[str, str]]:
        """(conv, bn) module names where the BN directly follows the conv: read by fold_bn."""
        pairs = [("conv1", "bn1")]
        for name, m in self.named_modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                pairs += [(f"{name}.{c}", f"{name}.{b}") for c, b in m._fold_pairs()]
        return pairs


def resnet18(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, width, in_channels)


def resnet50(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, width, in_channels)
