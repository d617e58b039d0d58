"""A GAN is a generator, a discriminator and the pair of small pure losses that train them."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GAN:
    generator: nn.Module      # G(z, y) -> images in [-1, 1]; has ``z_dim``
    discriminator: nn.Module  # H(x, y, shared_neck) -> one logit per image
    d_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (real logits, fake logits) -> loss
    g_loss: Callable[[torch.Tensor], torch.Tensor]                # fake logits -> loss


def _hinge_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def _hinge_g(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


hinge_loss = SimpleNamespace(discriminator=_hinge_d, generator=_hinge_g)
