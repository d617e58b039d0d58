"""Smooth tiny models (tanh MLPs), registered under the public registry for hypergradient checks.

Finite differences of a gradient are only comparable to an exact Hessian-vector product where
the loss is smooth at the scale of the perturbation; ReLU and max-pool networks have kinks
everywhere (the FD then measures a smoothed Hessian). These models keep the real problems,
graph, A and the discriminators, and swap only the encoder and generator networks.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlo.models import register_model
from mlo.models.gan import GAN
from mlo.models.gan.acgan import ACDiscriminator
from mlo.models.gan.biggan import ProjectionDiscriminator
from mlo.models.gan.layers import snlinear
from mlo.models.gan.losses import HINGE, WASSERSTEIN, GANObjective


class TanhEncoder(nn.Module):
    def __init__(self, in_features: int, out_dim: int, linear=nn.Linear):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), linear(in_features, out_dim), nn.Tanh())
        self.out_dim = out_dim

    def forward(self, x):
        return self.net(x)


class TanhGenerator(nn.Module):
    def __init__(self, image_shape, num_classes: int, z_dim: int, hidden: int):
        super().__init__()
        self.image_shape, self.num_classes, self.z_dim = tuple(image_shape), num_classes, z_dim
        self.net = nn.Sequential(nn.Linear(z_dim + num_classes, hidden), nn.Tanh(),
                                 nn.Linear(hidden, int(torch.tensor(image_shape).prod())), nn.Tanh())

    def forward(self, z, y):
        out = self.net(torch.cat([z, F.one_hot(y, self.num_classes).to(z.dtype)], 1))
        return out.view(-1, *self.image_shape)


@register_model("encoder")
def tiny_tanh(in_channels: int = 1, image_size: int = 8, width: int = 8):
    return TanhEncoder(in_channels * image_size ** 2, width)


@register_model("gan")
def tiny_tanh_gan(image_shape, num_classes, feature_dim, cfg, encoder=None, meta=None, owns_class_head=False,
                  meta_features=None) -> GAN:
    c, h, w = image_shape
    body = encoder if encoder is not None else TanhEncoder(c * h * w, feature_dim, linear=snlinear)
    return GAN(generator=TanhGenerator(image_shape, num_classes, cfg.z_dim, cfg.gan_ch),
               discriminator=ProjectionDiscriminator(body, num_classes, meta=meta, owns_class_head=owns_class_head,
                                                     meta_features=meta_features),
               objective=GANObjective(HINGE))


@register_model("gan")
def tiny_tanh_wacgan_gp(image_shape, num_classes, feature_dim, cfg, encoder=None, meta=None,
                        owns_class_head=False, meta_features=None) -> GAN:
    """WAC-GAN-GP's objective (Wasserstein, auxiliary classifier, gradient penalty) on tanh networks."""
    c, h, w = image_shape
    body = encoder if encoder is not None else TanhEncoder(c * h * w, feature_dim)
    return GAN(generator=TanhGenerator(image_shape, num_classes, cfg.z_dim, cfg.gan_ch),
               discriminator=ACDiscriminator(body, num_classes, meta=meta, owns_class_head=owns_class_head,
                                             which_linear=nn.Linear, meta_features=meta_features),
               objective=GANObjective(WASSERSTEIN, auxiliary_classifier=True, gp_weight=cfg.gp_weight))
