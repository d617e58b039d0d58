"""Sampling a trained class-conditional generator: seeded latents, optional truncation."""
from __future__ import annotations

import torch
import torch.nn as nn


def truncate(z: torch.Tensor, tau: float) -> torch.Tensor:
    """``z_τ = sign(z) · min(|z|, τ)``: trades diversity for fidelity as τ shrinks."""
    return z.clamp(-tau, tau)


@torch.no_grad()
def generate(generator: nn.Module, labels: torch.Tensor, seed: int, device, truncation: float | None = None,
             batch_size: int = 500) -> torch.Tensor:
    """``G(z, y)`` for each label in order, in [-1, 1] on the CPU; the caller sets eval mode.

    The latents come from a CPU generator seeded by ``seed``, so the same seed gives the same
    images on any device.
    """
    z = torch.randn(len(labels), generator.z_dim, generator=torch.Generator().manual_seed(seed))
    if truncation is not None:
        z = truncate(z, truncation)
    return torch.cat([generator(z[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(labels), batch_size)])
