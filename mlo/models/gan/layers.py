"""GAN building blocks in the BigGAN-PyTorch style: layer factories, conditional BN, G/D blocks."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm


def sn(module: nn.Module, eps: float = 1e-6) -> nn.Module:
    return spectral_norm(module, eps=eps)


def snconv2d(*args, **kwargs) -> nn.Module:
    return sn(nn.Conv2d(*args, **kwargs))


def snlinear(*args, **kwargs) -> nn.Module:
    return sn(nn.Linear(*args, **kwargs))


which_conv3 = partial(snconv2d, kernel_size=3, padding=1)
which_conv1 = partial(snconv2d, kernel_size=1, padding=0)


class ConditionalBatchNorm2d(nn.Module):
    """BN whose gain and bias are linear functions of a conditioning vector (class embedding + z chunk)."""

    def __init__(self, num_features: int, cond_dim: int, which_linear=snlinear):
        super().__init__()
        self.gain = which_linear(cond_dim, num_features, bias=False)
        self.bias = which_linear(cond_dim, num_features, bias=False)
        self.bn = nn.BatchNorm2d(num_features, affine=False)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gain = (1 + self.gain(cond))[:, :, None, None]
        return self.bn(x) * gain + self.bias(cond)[:, :, None, None]


class SelfAttention(nn.Module):
    """SAGAN/BigGAN self-attention with pooled keys and values."""

    def __init__(self, ch: int, which_conv=which_conv1):
        super().__init__()
        self.theta = which_conv(ch, ch // 8, bias=False)
        self.phi = which_conv(ch, ch // 8, bias=False)
        self.g = which_conv(ch, ch // 2, bias=False)
        self.o = which_conv(ch // 2, ch, bias=False)
        self.gamma = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        theta = self.theta(x).view(n, c // 8, h * w)
        phi = F.max_pool2d(self.phi(x), 2).view(n, c // 8, h * w // 4)
        g = F.max_pool2d(self.g(x), 2).view(n, c // 2, h * w // 4)
        beta = F.softmax(torch.bmm(theta.transpose(1, 2), phi), -1)
        o = self.o(torch.bmm(g, beta.transpose(1, 2)).view(n, c // 2, h, w))
        return x + self.gamma * o


class GBlock(nn.Module):
    """Pre-activation up-block: CBN–ReLU–up–conv–CBN–ReLU–conv, with a 1x1 conv shortcut."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, upsample: bool = True):
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(c_in, cond_dim)
        self.conv1 = which_conv3(c_in, c_out)
        self.bn2 = ConditionalBatchNorm2d(c_out, cond_dim)
        self.conv2 = which_conv3(c_out, c_out)
        self.shortcut = which_conv1(c_in, c_out)
        self.upsample = upsample

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(x, cond))
        if self.upsample:
            h, x = F.interpolate(h, scale_factor=2), F.interpolate(x, scale_factor=2)
        h = self.conv2(F.relu(self.bn2(self.conv1(h), cond)))
        return h + self.shortcut(x)


class DBlock(nn.Module):
    """Down-block: (ReLU)–conv–ReLU–conv–avgpool, with a 1x1 conv shortcut where shapes change."""

    def __init__(self, c_in: int, c_out: int, preactivation: bool, downsample: bool):
        super().__init__()
        self.conv1 = which_conv3(c_in, c_out)
        self.conv2 = which_conv3(c_out, c_out)
        self.shortcut = which_conv1(c_in, c_out) if (c_in != c_out or downsample) else None
        self.preactivation = preactivation
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(x) if self.preactivation else x
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.preactivation:
            s = self.shortcut(s) if self.shortcut is not None else s
            s = F.avg_pool2d(s, 2) if self.downsample else s
        else:
            s = F.avg_pool2d(s, 2) if self.downsample else s
            s = self.shortcut(s) if self.shortcut is not None else s
        return h + s


def up_block(c_in: int, c_out: int) -> nn.Module:
    """DCGAN generator block: a transposed 4x4 convolution that doubles the size, BN, ReLU."""
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU())


def down_block(c_in: int, c_out: int, which_conv=snconv2d) -> nn.Module:
    """DCGAN discriminator block: a 4x4 convolution of stride 2 that halves the size, LeakyReLU(0.2)."""
    return nn.Sequential(which_conv(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2))
