"""A GAN is a generator, a discriminator and the objective that trains them (``losses.GANObjective``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from mlo.models.gan.losses import GANObjective


@dataclass
class GAN:
    generator: nn.Module      # G(z, y) -> images in [-1, 1]; has ``z_dim``
    discriminator: nn.Module  # D(x, y, shared_meta) -> scores, or (scores, class logits) for an AC-GAN
    objective: GANObjective
