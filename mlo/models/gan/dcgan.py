"""DCGAN-style class-conditional networks built from the per-resolution tables ``arch.DC_G_ARCH`` /
``arch.DC_D_ARCH``, and the vanilla conditional GAN (VCGAN): the label concatenated to z and to
D's input, trained with the non-saturating (JS) loss."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlo.errors import ConfigError
from mlo.models.gan import GAN
from mlo.models.gan.arch import DC_BOTTOM_WIDTH, DC_D_ARCH, DC_G_ARCH, DC_TOP_WIDTH, dcgan_resolution
from mlo.models.gan.layers import down_block, snconv2d, snlinear, up_block
from mlo.models.gan.losses import JS, GANObjective
from mlo.models.heads import ReadsA
from mlo.models.registry import register_model


class OneHot(nn.Module):
    """A label as a one-hot vector."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.out_dim = num_classes

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y, self.out_dim).float()


class LabelEmbedding(nn.Embedding):
    """A label as a learned vector."""

    @property
    def out_dim(self) -> int:
        return self.embedding_dim


class DCGenerator(nn.Module):
    """``G(z, y)``: ``[z, label(y)]`` → linear → 4x4 map → BN–ReLU → up-blocks → conv → tanh."""

    def __init__(self, resolution: int, out_channels: int, ch: int, z_dim: int, label: nn.Module):
        super().__init__()
        arch = DC_G_ARCH[resolution]
        self.z_dim = z_dim
        self.label = label
        self.linear = nn.Linear(z_dim + label.out_dim, arch[0] * ch * DC_BOTTOM_WIDTH ** 2)
        self.bottom = nn.Sequential(nn.BatchNorm2d(arch[0] * ch), nn.ReLU())
        self.blocks = nn.Sequential(*(up_block(a * ch, b * ch) for a, b in zip(arch, arch[1:])))
        self.output_conv = nn.Conv2d(arch[-1] * ch, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.linear(torch.cat([z, self.label(y).to(z.dtype)], dim=1))
        h = self.bottom(h.view(z.shape[0], -1, DC_BOTTOM_WIDTH, DC_BOTTOM_WIDTH))
        return torch.tanh(self.output_conv(self.blocks(h)))


class DCDiscriminatorBody(nn.Module):
    """φ: down-blocks to a 2x2 map → flatten → linear to ``out_dim`` features."""

    def __init__(self, resolution: int, in_channels: int, ch: int, out_dim: int, which_conv=snconv2d,
                 which_linear=snlinear):
        super().__init__()
        arch = DC_D_ARCH[resolution]
        c_ins = [in_channels] + [m * ch for m in arch[:-1]]
        self.blocks = nn.Sequential(*(down_block(c_in, m * ch, which_conv) for c_in, m in zip(c_ins, arch)))
        self.proj = which_linear(arch[-1] * ch * DC_TOP_WIDTH ** 2, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.blocks(x).flatten(1))


class ConcatDiscriminator(ReadsA):
    """VCGAN's D: ``ψ(a(φ([x, one-hot maps of y])))``: the label enters with the image; the score reads
    A's features (it has no class term)."""

    def __init__(self, body: nn.Module, num_classes: int, stream: str = "disc", meta: nn.Module | None = None,
                 meta_features: int | None = None):
        super().__init__(stream, meta)
        self.body = body
        self.label = OneHot(num_classes)
        self.psi = snlinear(meta_features or body.out_dim, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor, shared_meta: nn.Module | None = None) -> torch.Tensor:
        maps = self.label(y).to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[2:])
        features, _ = self.through_a(self.body(torch.cat([x, maps], dim=1)), shared_meta)
        return self.psi(features).squeeze(1)


@register_model("gan")
def vcgan(image_shape, num_classes: int, feature_dim: int, cfg, encoder: nn.Module | None = None,
          meta: nn.Module | None = None, owns_class_head: bool = False, meta_features: int | None = None) -> GAN:
    """Vanilla conditional GAN at 8/16/32: one-hot labels concatenated to z and to D's input, JS loss."""
    if encoder is not None:
        raise ConfigError("model.tie_encoders: gan.generator=vcgan feeds the label to D's input with the image, "
                          "which a classifier's encoder cannot take; set model.tie_encoders=false")
    channels, size, _ = image_shape
    resolution = dcgan_resolution("vcgan", size)
    generator = DCGenerator(resolution, channels, cfg.gan_ch, cfg.z_dim, OneHot(num_classes))
    body = DCDiscriminatorBody(resolution, channels + num_classes, cfg.gan_ch, feature_dim)
    discriminator = ConcatDiscriminator(body, num_classes, meta=meta, meta_features=meta_features)
    return GAN(generator=generator, discriminator=discriminator, objective=GANObjective(JS))
