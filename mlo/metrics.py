"""Classification metrics: top-1, per-class accuracy, Many/Medium/Few, ECE (15 bins), per-class std."""
from __future__ import annotations

import numpy as np
import torch

from mlo.data.longtail import shot_groups


@torch.no_grad()
def predict(forward, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels over an iterable of (x, y) batches, gathered on the CPU."""
    logits, labels = [], []
    for x, y in batches:
        logits.append(forward(x).float().cpu())
        labels.append(y.cpu())
    return torch.cat(logits), torch.cat(labels)


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    correct = (logits.argmax(1) == labels).double()
    counts = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.zeros(num_classes, dtype=torch.double).index_add_(0, labels, correct)
    return (hits / counts.clamp(min=1)).numpy()


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: Σ_b |B|/N · |acc(B) − conf(B)|."""
    probs = torch.softmax(logits.double(), dim=1)
    confidence, prediction = probs.max(1)
    correct = (prediction == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.double)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.double().mean().item() * abs(correct[in_bin].mean().item() - confidence[in_bin].mean().item())
    return ece


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, train_counts) -> dict:
    """Top-1, top-5 (None under six classes) and per-class accuracy (as fractions), shot-group means, ECE
    and per-class std."""
    num_classes = len(train_counts)
    per_class = per_class_accuracy(logits, labels, num_classes)
    groups = shot_groups(train_counts)
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).double().mean() if num_classes > 5 else None
    return {
        "top1": float((logits.argmax(1) == labels).double().mean()),
        "top5": None if top5 is None else float(top5),
        "per_class_acc": per_class.tolist(),
        **{name: (float(per_class[idx].mean()) if idx else None) for name, idx in groups.items()},
        "ece": expected_calibration_error(logits, labels),
        "per_class_std": float(per_class.std()),
    }
