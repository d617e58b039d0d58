"""Class-conditional BigGAN: shared class embedding, hierarchical latent, conditional BN, spectral
norm, and a projection discriminator whose last layers are A."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlo.models.gan import GAN
from mlo.models.gan.arch import BOTTOM_WIDTH, D_ARCH, G_ARCH, gan_resolution
from mlo.models.gan.layers import DBlock, GBlock, SelfAttention, snconv2d, snlinear
from mlo.models.gan.losses import HINGE, GANObjective
from mlo.models.heads import ReadsA
from mlo.models.registry import register_model


class Generator(nn.Module):
    """``G(z, y)``: z is split into one chunk for the 4x4 bottom and one per block; each block's
    conditional BN reads ``[shared(y), z_chunk]``. ``z_dim`` is rounded down to a multiple of the
    number of chunks, as in BigGAN-PyTorch."""

    def __init__(self, resolution: int, out_channels: int, num_classes: int, ch: int, z_dim: int, shared_dim: int):
        super().__init__()
        arch = G_ARCH[resolution]
        n_blocks = len(arch["in"])
        self.z_chunk = max(1, z_dim // (n_blocks + 1))
        self.z_dim = self.z_chunk * (n_blocks + 1)
        self.num_classes = num_classes
        self.shared = nn.Embedding(num_classes, shared_dim)
        self.linear = snlinear(self.z_chunk, arch["in"][0] * ch * BOTTOM_WIDTH ** 2)
        cond_dim = shared_dim + self.z_chunk
        self.blocks = nn.ModuleList()
        size = BOTTOM_WIDTH
        for c_in, c_out in zip(arch["in"], arch["out"]):
            size *= 2
            stage = [GBlock(c_in * ch, c_out * ch, cond_dim)]
            if size in arch["attention"]:
                stage.append(SelfAttention(c_out * ch))
            self.blocks.append(nn.ModuleList(stage))
        self.output_bn = nn.BatchNorm2d(arch["out"][-1] * ch)
        self.output_conv = snconv2d(arch["out"][-1] * ch, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        chunks = z.split(self.z_chunk, dim=1)
        shared = self.shared(y)
        h = self.linear(chunks[0]).view(z.shape[0], -1, BOTTOM_WIDTH, BOTTOM_WIDTH)
        for stage, z_i in zip(self.blocks, chunks[1:]):
            cond = torch.cat([shared, z_i], dim=1)
            for layer in stage:
                h = layer(h, cond) if isinstance(layer, GBlock) else layer(h)
        return torch.tanh(self.output_conv(F.relu(self.output_bn(h))))


class DiscriminatorBody(nn.Module):
    """φ: BigGAN D blocks → ReLU → sum-pool → spectral-normed linear to ``out_dim`` features."""

    def __init__(self, resolution: int, in_channels: int, ch: int, out_dim: int):
        super().__init__()
        arch = D_ARCH[resolution]
        c_ins = [in_channels] + [m * ch for m in arch["in"]]
        self.blocks = nn.ModuleList()
        size = resolution
        for i, (c_in, m_out, down) in enumerate(zip(c_ins, arch["out"], arch["down"])):
            stage = [DBlock(c_in, m_out * ch, preactivation=i > 0, downsample=down)]
            size //= 2 if down else 1
            if size in arch["attention"]:
                stage.append(SelfAttention(m_out * ch))
            self.blocks.append(nn.Sequential(*stage))
        self.proj = snlinear(arch["out"][-1] * ch, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.proj(F.relu(x).sum(dim=(2, 3)))


class ProjectionDiscriminator(ReadsA):
    """H: ``ψ(a(φ(x))) + A(φ(x))[y]`` — a projection discriminator whose adversarial term reads A's
    features and whose class term is A's logit of y (head form; with a neck-form A, ψ and H's own class
    head read A's features). A is shared, or owned (``meta``) where the run has no meta level."""

    def __init__(self, body: nn.Module, num_classes: int, stream: str = "disc", meta: nn.Module | None = None,
                 owns_class_head: bool = False, meta_features: int | None = None):
        width = meta_features or body.out_dim  # of A's features
        super().__init__(stream, meta, snlinear(width, num_classes) if owns_class_head else None)
        self.body = body
        self.psi = snlinear(width, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor, shared_meta: nn.Module | None = None) -> torch.Tensor:
        features, head = self.through_a(self.encode(self.body, x, shared_meta), shared_meta)
        return self.psi(features).squeeze(1) + head(features).gather(1, y[:, None]).squeeze(1)


@register_model("gan")
def biggan(image_shape, num_classes: int, feature_dim: int, cfg, encoder: nn.Module | None = None,
           meta: nn.Module | None = None, owns_class_head: bool = False, meta_features: int | None = None) -> GAN:
    """BigGAN at 8/16/32/64/128 with hinge loss; ``encoder`` replaces φ when encoders are tied;
    ``meta_features``: the width of A's features (default: φ's)."""
    channels, size, _ = image_shape
    resolution = gan_resolution(size)
    generator = Generator(resolution, channels, num_classes, cfg.gan_ch, cfg.z_dim, cfg.shared_dim)
    body = encoder if encoder is not None else DiscriminatorBody(resolution, channels, cfg.gan_ch, feature_dim)
    discriminator = ProjectionDiscriminator(body, num_classes, meta=meta, owns_class_head=owns_class_head,
                                            meta_features=meta_features)
    return GAN(generator=generator, discriminator=discriminator, objective=GANObjective(HINGE))
