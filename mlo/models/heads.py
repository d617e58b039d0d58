"""The meta block A and the classifier built around it: ``encoder → A → linear head``."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class MetaBlock(nn.Module):
    """A: ``Linear–BN–activation–Linear`` (feature → feature), shared by W1, W2 and the discriminator H.

    The BN affine weights belong to A; the running statistics are kept per *stream* (one per
    network that reads features through A), because each encoder has its own feature
    distribution and mixing them would corrupt evaluation-mode statistics. The activation is
    ReLU as in the paper; a smooth one keeps the finite-difference hypergradients off ReLU's kink.
    """

    def __init__(self, dim: int, streams: tuple[str, ...], activation: str = "relu"):
        super().__init__()
        self.activation = ACTIVATIONS[activation]
        self.fc1 = nn.Linear(dim, dim, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(dim))
        self.norm_bias = nn.Parameter(torch.zeros(dim))
        self.norms = nn.ModuleDict({s: nn.BatchNorm1d(dim, affine=False) for s in streams})
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, stream: str) -> torch.Tensor:
        h = self.norms[stream](self.fc1(h)) * self.norm_weight + self.norm_bias
        return self.fc2(self.activation(h))


class Classifier(nn.Module):
    """``head(A(encoder(x)))``. A is either shared (passed in by the problem) or owned (``neck``)
    when the run has no meta level, so every classifier has the same capacity."""

    def __init__(self, encoder: nn.Module, num_classes: int, stream: str, neck: MetaBlock | None = None):
        super().__init__()
        self.encoder = encoder
        self.neck = neck
        self.head = nn.Linear(encoder.out_dim, num_classes)
        self.stream = stream

    def features(self, x: torch.Tensor, shared_neck: MetaBlock | None = None) -> torch.Tensor:
        neck = self.neck if self.neck is not None else shared_neck
        h = self.encoder(x)
        return neck(h, self.stream) if neck is not None else h

    def forward(self, x: torch.Tensor, shared_neck: MetaBlock | None = None, with_features: bool = False):
        """Logits, or ``(logits, features before the head)`` for losses that read features (ISDA)."""
        features = self.features(x, shared_neck)
        logits = self.head(features)
        return (logits, features) if with_features else logits


class WeightingNet(nn.Module):
    """Meta-Weight-Net's weighting function: a per-sample loss → a weight in (0, 1), an MLP 1→h→1."""

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(losses[:, None])).squeeze(1)
