"""Classification losses by name. Each is built from the training class counts and returns
per-sample losses, so callers can weight samples (generated images carry b_m)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSSES: dict[str, Callable[..., nn.Module]] = {}


def register_loss(name: str):
    def wrap(cls):
        LOSSES[name] = cls
        return cls
    return wrap


@register_loss("ce")
class CrossEntropy(nn.Module):
    def __init__(self, class_counts):
        super().__init__()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, reduction="none")


def create_loss(name: str, class_counts) -> nn.Module:
    return LOSSES[name](torch.as_tensor(class_counts, dtype=torch.float))
