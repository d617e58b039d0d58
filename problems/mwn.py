"""Meta-Weight-Net (Shu et al., 2019) as a two-level Betty program: the classifier's per-sample
losses are weighted by a small network V, and V is learned so the classifier does well on the
balanced validation set."""
from __future__ import annotations

import torch.nn.functional as F

from problems.base import LevelProblem
from problems.classifier import ClassifierProblem


class MetaWeightedClassifierProblem(ClassifierProblem):
    """``min_W Σ_i V(ℓ_i) ℓ_i / Σ_i V(ℓ_i)``: V reads each loss value detached, as in the paper, so
    W's training gradient holds the weights fixed. A finite difference in W would also move V's
    inputs and measure another derivative, so this level's hops are ``exact`` (mlo/hypergradient.py)."""

    def training_step(self, batch):
        losses = self.per_sample_loss(batch["x"], batch["y"], batch["progress"], real=len(batch["y"]))
        weights = self.mwn.module(losses.detach())
        share = weights / weights.sum().clamp(min=1e-8)
        self.record_trained_on(batch["y"], share * len(share))
        return (share * losses).sum()


class WeightingNetProblem(LevelProblem):
    """V: ``min_V L_CE(W'(V), D_val)`` on class-balanced validation batches."""

    def training_step(self, batch):
        return F.cross_entropy(self.w1(batch["x"]), batch["y"])
