"""The learned allocation (``train.allocator=learned``, beyond the paper): p(s) as a level of its own."""
from __future__ import annotations

import torch.nn.functional as F

from problems.base import LevelProblem


class AllocationProblem(LevelProblem):
    """p(s) = softmax(logits), an upper level of W2: ``min_logits L_cls(W2', D_val)``.

    W2's loss reads p through the classes it draws and the keep-weights b_m, so the logits' gradient
    is the hypergradient through W2's step (their direct gradient is zero): the budget moves to the
    classes whose generated images lower W2's validation loss, not to those whose loss is high."""

    def training_step(self, batch):
        return F.cross_entropy(self.w2(batch["x"]), batch["y"])
