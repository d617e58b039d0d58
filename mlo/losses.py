"""Classification losses by name: plain CE and the long-tail baselines.

Each loss is built from the training class counts and returns per-sample losses, so callers can
weight samples (generated images carry b_m) and take the mean. Class weights multiply the
per-sample losses, so the caller's mean divides by the batch size (Cui et al.'s convention), not
by the sum of weights as a weighted ``F.cross_entropy`` would.

The call is ``loss(logits, target, progress=p)``, where ``progress`` is the fraction of training
done before the step (from the batch). Losses with ``needs_features`` (ISDA) also get
``head_weight=...`` and keep statistics of training features, which the level feeds them through
``update_statistics`` between its own steps. A loss is a pure function of its arguments and its
state: Betty re-evaluates it with perturbed weights for finite-difference hypergradients.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSSES: dict[str, Callable[..., "ClassificationLoss"]] = {}


def register_loss(name: str):
    def wrap(cls):
        LOSSES[name] = cls
        return cls
    return wrap


class ClassificationLoss(nn.Module):
    """Per-sample loss of ``logits`` (N, C) against ``target`` (N,) at training ``progress`` in [0, 1].

    Losses with ``needs_features = True`` keep statistics of the training features before the
    head: they implement ``update_statistics(features, target)``, which the level calls with the
    (real) training features of its previous own step before the next one, and their forward is
    also given the head's weight (C, D).

    Losses with ``uses_counts = True`` correct for the class distribution of the training data; a
    level whose data is not the real long-tailed set alone (W2: real plus generated images) gives
    them ``class_counts=...``, its own distribution per epoch, in place of the real counts.
    """
    needs_features = False
    uses_counts = False


def class_balanced_weights(class_counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Cui et al.'s ``(1 − β) / (1 − β^n_c)`` (the inverse effective number), normalised to sum to C."""
    weights = (1.0 - beta) / (1.0 - torch.pow(beta, class_counts.double()))
    return (weights / weights.sum() * len(class_counts)).float()


@register_loss("ce")
class CrossEntropy(ClassificationLoss):
    def __init__(self, class_counts):
        super().__init__()

    def forward(self, logits, target, *, progress: float) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, reduction="none")


@register_loss("mwn")
class MetaWeightNetLoss(CrossEntropy):
    """Per-sample cross-entropy, weighted by Meta-Weight-Net's learned weighting network, a level of
    its own in ``train.mode=vanilla`` (problems/mwn.py)."""


@register_loss("focal")
class FocalLoss(ClassificationLoss):
    """Lin et al.'s ``(1 − p_y)^γ · CE`` on the softmax (no α; γ = 0 is CE)."""

    def __init__(self, class_counts, focal_gamma: float = 2.0):
        super().__init__()
        self.gamma = focal_gamma

    def forward(self, logits, target, *, progress: float) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), target, reduction="none")
        return (1.0 - torch.exp(-ce)).clamp(min=0.0).pow(self.gamma) * ce


@register_loss("cb")
class ClassBalancedLoss(ClassificationLoss):
    """Cui et al.'s class-balanced softmax CE: CE of sample i times ``class_balanced_weights[y_i]``."""

    uses_counts = True

    def __init__(self, class_counts, cb_beta: float = 0.9999):
        super().__init__()
        self.beta = cb_beta
        self.register_buffer("weights", class_balanced_weights(class_counts, cb_beta), persistent=False)

    def forward(self, logits, target, *, progress: float, class_counts=None) -> torch.Tensor:
        weights = self.weights if class_counts is None else class_balanced_weights(class_counts, self.beta)
        return weights[target] * F.cross_entropy(logits.float(), target, reduction="none")


@register_loss("balanced_softmax")
class BalancedSoftmax(ClassificationLoss):
    """Ren et al.'s balanced softmax: CE of ``logits + τ · log(n_c / N)`` during training (logit
    adjustment; τ = 1 is balanced softmax). Predictions use the plain logits."""

    uses_counts = True

    def __init__(self, class_counts, logit_adjust_tau: float = 1.0):
        super().__init__()
        self.tau = logit_adjust_tau
        self.register_buffer("log_prior", self.tau * torch.log(class_counts / class_counts.sum()), persistent=False)

    def forward(self, logits, target, *, progress: float, class_counts=None) -> torch.Tensor:
        log_prior = self.log_prior if class_counts is None else self.tau * torch.log(class_counts / class_counts.sum())
        return F.cross_entropy(logits.float() + log_prior, target, reduction="none")


@register_loss("ldam_drw")
class LDAMDRW(ClassificationLoss):
    """Cao et al.'s LDAM with Deferred Re-Weighting.

    Margins ``m_c ∝ n_c^(−1/4)``, the largest ``ldam_margin``; the loss is
    ``w_y · CE(s · (z − m_y · 1_y), y)``, with ``w = 1`` until ``progress`` reaches ``drw_start``
    and the class-balanced weights (β = ``cb_beta``) from then on.

    The paper uses a cosine (normed) head, whose logits are bounded by 1 and scaled by s. Our head
    is a plain ``nn.Linear`` (the one every loss shares, and the one ISDA's formula assumes), and
    s multiplies its logits, as many re-implementations on plain heads do: the margins are then
    relative to unbounded logits, so s trades margin strength against logit growth.
    """

    def __init__(self, class_counts, ldam_margin: float = 0.5, ldam_scale: float = 30.0,
                 drw_start: float = 0.8, cb_beta: float = 0.9999):
        super().__init__()
        self.largest_margin, self.beta = ldam_margin, cb_beta
        self.register_buffer("margins", self.class_margins(class_counts), persistent=False)
        self.register_buffer("drw_weights", class_balanced_weights(class_counts, cb_beta), persistent=False)
        self.scale = ldam_scale
        self.drw_start = drw_start

    uses_counts = True

    def class_margins(self, class_counts: torch.Tensor) -> torch.Tensor:
        margins = class_counts.pow(-0.25)
        return margins * (self.largest_margin / margins.max())

    def forward(self, logits, target, *, progress: float, class_counts=None) -> torch.Tensor:
        margins, drw = self.margins, self.drw_weights
        if class_counts is not None:
            margins, drw = self.class_margins(class_counts), class_balanced_weights(class_counts, self.beta)
        margin = F.one_hot(target, logits.shape[1]) * margins[target, None]
        ce = F.cross_entropy(self.scale * (logits.float() - margin), target, reduction="none")
        return drw[target] * ce if progress >= self.drw_start else ce


@register_loss("isda")
class ISDALoss(ClassificationLoss):
    """Wang et al.'s Implicit Semantic Data Augmentation.

    CE of ``z_j + ½ λ (w_j − w_y)ᵀ Σ_y (w_j − w_y)``, the closed-form upper bound of the expected
    CE over features drawn from ``N(a, λ Σ_y)``; ``λ = isda_lambda · progress`` ramps up over
    training, ``Σ_y`` is the covariance of class y's training features before the head.

    The per-class mean and covariance (biased, divided by the count) are buffers merged batch by
    batch with Chan et al.'s parallel update, which adds the between-batch term, so after any
    sequence of batches they equal the statistics of all samples seen. They are updated only by
    ``update_statistics``, between the level's own steps: a step, and every hypergradient hop
    that re-evaluates it, see the statistics of the batches before it (the paper folds the current
    batch in first; one batch of lag is the price of a pure loss).
    """
    needs_features = True

    def __init__(self, class_counts, feature_dim: int, isda_lambda: float = 0.5):
        super().__init__()
        c = len(class_counts)
        self.strength = isda_lambda
        self.register_buffer("count", torch.zeros(c))
        self.register_buffer("mean", torch.zeros(c, feature_dim))
        self.register_buffer("covariance", torch.zeros(c, feature_dim, feature_dim))

    def forward(self, logits, target, *, progress: float, head_weight) -> torch.Tensor:
        w = head_weight.float()
        diff = w[None, :, :] - w[:, None, :]                              # [y, j] = w_j − w_y
        quadratic = ((diff @ self.covariance) * diff).sum(-1)             # [y, j] = diffᵀ Σ_y diff
        augmented = logits.float() + 0.5 * self.strength * progress * quadratic[target]
        return F.cross_entropy(augmented, target, reduction="none")

    @torch.no_grad()
    def update_statistics(self, features: torch.Tensor, target: torch.Tensor) -> None:
        f = features.float()
        one_hot = F.one_hot(target, len(self.count)).float()                # (N, C)
        n_batch = one_hot.sum(0)
        mean_batch = (one_hot.T @ f) / n_batch.clamp(min=1)[:, None]
        centred = f - mean_batch[target]
        scatter_batch = torch.einsum("nc,nd,ne->cde", one_hot, centred, centred)  # n_b Σ_b per class
        n_old, n = self.count, self.count + n_batch
        share_old, share_batch = n_old / n.clamp(min=1), n_batch / n.clamp(min=1)
        delta = self.mean - mean_batch
        self.covariance = (n_old[:, None, None] * self.covariance + scatter_batch) / n.clamp(min=1)[:, None, None] \
            + (share_old * share_batch)[:, None, None] * delta[:, :, None] * delta[:, None, :]
        self.mean = share_old[:, None] * self.mean + share_batch[:, None] * mean_batch
        self.count = n


def create_loss(name: str, class_counts, **options) -> ClassificationLoss:
    """The loss ``name``; ``options`` are loss hyper-parameters named as in ``TrainConfig`` (and
    ``feature_dim``), of which each loss takes those its constructor names."""
    cls = LOSSES[name]
    accepted = inspect.signature(cls).parameters
    return cls(torch.as_tensor(class_counts, dtype=torch.float), **{k: v for k, v in options.items() if k in accepted})


def decov(features: torch.Tensor) -> torch.Tensor:
    """DeCov (Cogswell et al., 2016): ``½ (‖C‖²_F − ‖diag C‖²)`` of the batch covariance ``C`` of
    ``features`` (N, D): penalises correlations between feature dimensions, not their variances."""
    centred = features.float() - features.float().mean(dim=0)
    cov = centred.T @ centred / features.shape[0]
    return 0.5 * (cov.pow(2).sum() - cov.diagonal().pow(2).sum())
