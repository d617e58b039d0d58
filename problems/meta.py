"""A, the shared meta-parameters, learned on the balanced validation set."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from problems.base import LevelProblem


class MetaProblem(LevelProblem):
    """``min_A L_cls(W2', A, D_val) + γ · L_cls(W1', A, D_val)``; without a W2 (``vanilla_meta``),
    ``γ · L_cls(W1', A, D_val)``. With a second loader (``train.meta_data=val_and_train``, an extension) each
    validation batch is joined by a class-balanced batch of training images."""

    def __init__(self, name, config, module, optimizer, scheduler=None, train_data_loader=None, *,
                 gamma: float, **kwargs):
        super().__init__(name, config, module, optimizer, scheduler, train_data_loader, **kwargs)
        self.gamma = gamma

    def owned_statistics(self):
        # A's only buffers are a neck-form A's per-stream BN statistics; each stream belongs to the
        # level that reads features through it, so validation batches seen here leave them alone.
        return []

    def prepare_batch(self, data):
        if isinstance(data[0], (tuple, list)):  # (validation batch, class-balanced training batch)
            (x_val, y_val), (x_train, y_train) = data
            return {"x": torch.cat([x_val, x_train]), "y": torch.cat([y_val, y_train])}
        return super().prepare_batch(data)

    def training_step(self, batch):
        x, y = batch["x"], batch["y"]
        loss = self.gamma * F.cross_entropy(self.w1(x), y)
        w2 = getattr(self, "w2", None)  # Betty sets levels as attributes, by name
        return loss if w2 is None else F.cross_entropy(w2(x), y) + loss
