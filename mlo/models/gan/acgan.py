"""Auxiliary-classifier GANs on the DCGAN-style tables: AC-GAN (JS loss, spectral norm) and
WAC-GAN-GP (Wasserstein loss with gradient penalty). D's adversarial head reads A's features and
its class head is A."""
from __future__ import annotations

import torch
import torch.nn as nn

from mlo.models.gan import GAN
from mlo.models.gan.arch import dcgan_resolution
from mlo.models.gan.dcgan import DCDiscriminatorBody, DCGenerator, LabelEmbedding
from mlo.models.gan.layers import snconv2d, snlinear
from mlo.models.gan.losses import JS, WASSERSTEIN, GANObjective
from mlo.models.heads import ReadsA
from mlo.models.registry import register_model


class ACDiscriminator(ReadsA):
    """``(ψ(a(φ(x))), A(φ(x)))``: adversarial scores and class logits, the class head being A's (head
    form) or D's own after A's features (neck form). ``y`` is not an input: the class enters through
    the class head's cross-entropy."""

    def __init__(self, body: nn.Module, num_classes: int, stream: str = "disc", meta: nn.Module | None = None,
                 owns_class_head: bool = False, which_linear=snlinear, meta_features: int | None = None):
        width = meta_features or body.out_dim  # of A's features
        super().__init__(stream, meta, which_linear(width, num_classes) if owns_class_head else None)
        self.body = body
        self.psi = which_linear(width, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor, shared_meta: nn.Module | None = None):
        features, head = self.through_a(self.encode(self.body, x, shared_meta), shared_meta)
        return self.psi(features).squeeze(1), head(features)


def _auxiliary_classifier_gan(name: str, image_shape, num_classes: int, feature_dim: int, cfg, encoder, meta,
                              owns_class_head, meta_features, objective: GANObjective, spectral_norm: bool) -> GAN:
    channels, size, _ = image_shape
    resolution = dcgan_resolution(name, size)
    generator = DCGenerator(resolution, channels, cfg.gan_ch, cfg.z_dim, LabelEmbedding(num_classes, cfg.shared_dim))
    which_conv, which_linear = (snconv2d, snlinear) if spectral_norm else (nn.Conv2d, nn.Linear)
    body = encoder if encoder is not None else DCDiscriminatorBody(resolution, channels, cfg.gan_ch, feature_dim,
                                                                   which_conv, which_linear)
    discriminator = ACDiscriminator(body, num_classes, meta=meta, owns_class_head=owns_class_head,
                                    which_linear=which_linear, meta_features=meta_features)
    return GAN(generator=generator, discriminator=discriminator, objective=objective)


@register_model("gan")
def acgan(image_shape, num_classes: int, feature_dim: int, cfg, encoder: nn.Module | None = None,
          meta: nn.Module | None = None, owns_class_head: bool = False, meta_features: int | None = None) -> GAN:
    """AC-GAN at 8/16/32: JS loss plus the class cross-entropy of real and fake images; spectral-normed D."""
    return _auxiliary_classifier_gan("acgan", image_shape, num_classes, feature_dim, cfg, encoder, meta,
                                     owns_class_head, meta_features, GANObjective(JS, auxiliary_classifier=True),
                                     spectral_norm=True)


@register_model("gan")
def wacgan_gp(image_shape, num_classes: int, feature_dim: int, cfg, encoder: nn.Module | None = None,
              meta: nn.Module | None = None, owns_class_head: bool = False, meta_features: int | None = None) -> GAN:
    """WAC-GAN-GP at 8/16/32: AC-GAN with the Wasserstein loss and a gradient penalty of weight
    ``gan.gp_weight``, which keeps the critic Lipschitz instead of spectral norm."""
    objective = GANObjective(WASSERSTEIN, auxiliary_classifier=True, gp_weight=cfg.gp_weight)
    return _auxiliary_classifier_gan("wacgan_gp", image_shape, num_classes, feature_dim, cfg, encoder, meta,
                                     owns_class_head, meta_features, objective, spectral_norm=False)
