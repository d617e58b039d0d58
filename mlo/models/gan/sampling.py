"""Sampling a trained class-conditional generator: seeded latents, optional truncation (fixed or learned)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def truncate(z: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """``z_τ = sign(z) · min(|z|, τ)``: trades diversity for fidelity as τ shrinks; differentiable
    in a tensor τ (through the clipped entries)."""
    return z.clamp(-tau, tau)


class LearnedTruncation(nn.Module):
    """``truncate(z, τ)`` with ``τ = softplus(ρ)``, so τ stays positive while ρ is learned."""

    def __init__(self, tau: float):
        super().__init__()
        self.rho = nn.Parameter(torch.tensor(tau + math.log(-math.expm1(-tau))))  # softplus⁻¹(τ)

    @property
    def tau(self) -> torch.Tensor:
        return F.softplus(self.rho)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return truncate(z, self.tau)


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
