"""The Madry/TRADES wide ResNet usually called WRN-34-10 (the FAT paper's "WRN-32-10"):
depth 34 -> 5 pre-activation BasicBlocks per stage, stem conv of 16 channels, stages of
160/320/640 channels, final BN-ReLU, global average pool, linear head, TRADES initialisation.
`width` is the first stage's channels (default 160 = 16 * 10); the stem scales with it.
fold_bn folds each block's bn2 into its conv1: 16 of the 31 BNs remain in the folded copy."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3. On a shape change the block pre-activates its input
    once and feeds it to both the residual branch and a 1x1 conv shortcut (as in TRADES)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes  # TRADES keys on channels only
        self.conv_shortcut = (None if self.equal_in_out else
                              nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        if self.equal_in_out:  # structural, fixed at build time
            return x + out
        return self.conv_shortcut(act) + out


class WideResNet(nn.Module):
    """[B, in_channels, H, W] in [0, 1] -> logits [B, num_classes]."""

    def __init__(self, depth: int = 34, num_classes: int = 10, width: int = 160,
                 in_channels: int = 3):
        super().__init__()
        assert (depth - 4) % 6 == 0, "WideResNet depth must be 6n+4"
        n = (depth - 4) // 6
        stem = max(1, round(width / 10))
        widths = [stem, width, 2 * width, 4 * width]
        self.conv1 = nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False)
        self.block1 = self._stage(widths[0], widths[1], n, 1)
        self.block2 = self._stage(widths[1], widths[2], n, 2)
        self.block3 = self._stage(widths[2], widths[3], n, 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():  # TRADES init: He-normal fan-out, BN 1/0, linear bias 0
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    @staticmethod
    def _stage(in_planes: int, out_planes: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*[WideBlock(in_planes if i == 0 else out_planes, out_planes,
                                         stride if i == 0 else 1) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1)  # = avg-pool 8 on 32x32 inputs
        return self.fc(torch.flatten(out, 1))

    def _fold_pairs(self) -> list[tuple[str, str]]:
        """(conv, bn) module names where the BN directly follows the conv: read by fold_bn.

        Each block's conv1 -> bn2 -> ReLU -> conv2 (conv1's only consumer is bn2), so bn2 folds
        into conv1: 15 of the 31 BNs of WRN-34-10. The 15 bn1 and the final bn1 remain (16),
        each before a ReLU and after a residual sum, except block1.0.bn1: it follows the stem
        conv, which has no other consumer when block1.0 projects, but is left unfolded (one
        16-channel pass, the smallest)."""
        return [(f"{name}.conv1", f"{name}.bn2") for name, m in self.named_modules()
                if isinstance(m, WideBlock)]


def wrn32_10(num_classes: int = 10, width: int = 160, in_channels: int = 3) -> WideResNet:
    """The FAT paper's "WRN-32-10" ("wrn-32-10"; "wrn-34-10" names the same network): the TRADES
    WideResNet of depth 34, 32 weight layers on the main path plus 2 shortcut convs."""
    return WideResNet(34, num_classes, width, in_channels)
