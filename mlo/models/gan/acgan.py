"""Auxiliary-classifier GANs on the DCGAN-style tables: AC-GAN (JS loss, spectral norm) and
WAC-GAN-GP (Wasserstein loss with gradient penalty). D has an adversarial head and a class head,
both reading features through the meta block A."""
from __future__ import annotations

import torch
import torch.nn as nn

from mlo.models.gan import GAN
from mlo.models.gan.arch import dcgan_resolution
from mlo.models.gan.dcgan import DCDiscriminatorBody, DCGenerator, LabelEmbedding, NeckDiscriminator
from mlo.models.gan.layers import snconv2d, snlinear
from mlo.models.gan.losses import JS, WASSERSTEIN, GANObjective
from mlo.models.heads import MetaBlock
from mlo.models.registry import register_model


class ACDiscriminator(NeckDiscriminator):
    """``(ψ(A(φ(x))), head(A(φ(x))))``: adversarial scores and class logits. ``y`` is not an input:
    the class enters through the class head's cross-entropy."""

    def __init__(self, body: nn.Module, num_classes: int, stream: str = "disc", neck: MetaBlock | None = None,
                 which_linear=snlinear):
        super().__init__(body, stream, neck)
        self.psi = which_linear(body.out_dim, 1)
        self.class_head = which_linear(body.out_dim, num_classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor, shared_neck: MetaBlock | None = None):
        h = self.features(x, shared_neck)
        return self.psi(h).squeeze(1), self.class_head(h)


def _auxiliary_classifier_gan(name: str, image_shape, num_classes: int, feature_dim: int, cfg, encoder, neck,
                              objective: GANObjective, spectral_norm: bool) -> GAN:
    channels, size, _ = image_shape
    resolution = dcgan_resolution(name, size)
    generator = DCGenerator(resolution, channels, cfg.gan_ch, cfg.z_dim, LabelEmbedding(num_classes, cfg.shared_dim))
    which_conv, which_linear = (snconv2d, snlinear) if spectral_norm else (nn.Conv2d, nn.Linear)
    body = encoder if encoder is not None else DCDiscriminatorBody(resolution, channels, cfg.gan_ch, feature_dim,
                                                                   which_conv, which_linear)
    discriminator = ACDiscriminator(body, num_classes, neck=neck, which_linear=which_linear)
    return GAN(generator=generator, discriminator=discriminator, objective=objective)


@register_model("gan")
def acgan(image_shape, num_classes: int, feature_dim: int, cfg, encoder: nn.Module | None = None,
          neck: MetaBlock | None = None) -> GAN:
    """AC-GAN at 8/16/32: JS loss plus the class cross-entropy of real and fake images; spectral-normed D."""
    return _auxiliary_classifier_gan("acgan", image_shape, num_classes, feature_dim, cfg, encoder, neck,
                                     GANObjective(JS, auxiliary_classifier=True), spectral_norm=True)


@register_model("gan")
def wacgan_gp(image_shape, num_classes: int, feature_dim: int, cfg, encoder: nn.Module | None = None,
              neck: MetaBlock | None = None) -> GAN:
    """WAC-GAN-GP at 8/16/32: AC-GAN with the Wasserstein loss and a gradient penalty of weight
    ``gan.gp_weight``, which keeps the critic Lipschitz instead of spectral norm."""
    objective = GANObjective(WASSERSTEIN, auxiliary_classifier=True, gp_weight=cfg.gp_weight)
    return _auxiliary_classifier_gan("wacgan_gp", image_shape, num_classes, feature_dim, cfg, encoder, neck,
                                     objective, spectral_norm=False)
