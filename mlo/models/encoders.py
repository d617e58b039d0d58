"""Classifier encoders: image → feature vector (``out_dim`` features).

Each factory takes ``in_channels``, ``image_size`` and ``width`` (ignored where the architecture
fixes it) and returns a module with an ``out_dim`` attribute.
"""
from __future__ import annotations

import math

import torch.nn as nn
import torch.nn.functional as F

from mlo.models.registry import register_model


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Stages of two 3x3 conv-BN-ReLU layers and a 2x2 max-pool; channels double per stage."""

    def __init__(self, in_channels: int, image_size: int, width: int):
        super().__init__()
        stages = min(3, max(1, int(math.log2(image_size)) - 1))
        layers, c_in = [], in_channels
        for i in range(stages):
            c_out = width * 2 ** i
            layers += _conv_bn_relu(c_in, c_out) + _conv_bn_relu(c_out, c_out) + [nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.out_dim = c_in

    def forward(self, x):
        return self.features(x).mean(dim=(2, 3))


@register_model("encoder")
def small_cnn(in_channels: int = 3, image_size: int = 32, width: int = 32) -> SmallCNN:
    return SmallCNN(in_channels, image_size, width)


class _ShortcutA(nn.Module):
    """ResNet option-A shortcut: subsample and zero-pad channels (no parameters)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _ShortcutA(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers, 16/32/64 channels, option-A shortcuts), as LDAM-DRW uses it."""

    def __init__(self, depth: int, in_channels: int = 3):
        super().__init__()
        assert (depth - 2) % 6 == 0, "CIFAR ResNet depth must be 6n+2"
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.out_dim = 64
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        return self.layers(F.relu(self.bn1(self.conv1(x)))).mean(dim=(2, 3))


@register_model("encoder")
def resnet32(in_channels: int = 3, image_size: int = 32, width: int = 16) -> CifarResNet:
    return CifarResNet(32, in_channels)
