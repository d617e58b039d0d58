"""Learned per-class loss weights: an upper level of W1, learned on the validation set (a level of your own).

    needsgen run run.plugins=docs/examples/class_weights.py train.mode=class_weights levels.cw.lr=0.05

W1 trains on ``Σ_i w_{y_i} ℓ_i`` with ``w = C · softmax(logits)`` (the weights average 1); the logits minimise W1's
loss on the balanced validation set. Their loss does not read them, so their whole gradient is the
hypergradient through W1's step, which the engine computes for any level: nothing else to write.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from experiments.api import BuildContext, get_mode, register_level, register_mode, setting
from problems import LevelProblem


@dataclass
class ClassWeightSettings:
    lr: float = setting(0.05, "learning rate (Adam) of the class weights' logits", min=0.0)


class ClassWeights(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_classes))

    def forward(self) -> torch.Tensor:
        return len(self.logits) * torch.softmax(self.logits, dim=0)


class ClassWeightsProblem(LevelProblem):
    def weigh(self, lower, batch, losses):  # how W1's training loss reads this level
        return losses * self.module()[batch["y"]]

    def training_step(self, batch):
        self.record("weights", self.module().detach())
        return F.cross_entropy(self.w1(batch["x"]), batch["y"])


@register_level("cw", settings=ClassWeightSettings)
def build_class_weights(ctx: BuildContext, name: str) -> ClassWeightsProblem:
    module = ClassWeights(ctx.num_classes)
    return ClassWeightsProblem(name, ctx.level_config(name, retain_graph=True), module,
                               torch.optim.Adam(module.parameters(), lr=ctx.settings(name).lr),
                               train_data_loader=ctx.val_loader(f"{name} validation batches"), **ctx.common(name))


register_mode(get_mode("vanilla").with_upper("cw", "w1").named(
    "class_weights", "one classifier whose per-class loss weights are learned on the validation set"))
# the same level above the W1 of the method itself (a mode with a generator: sample and gan-metrics apply)
register_mode(get_mode("end2end").with_upper("cw", "w1").named(
    "end2end_class_weights", "the end-to-end method, W1's per-class loss weights learned on the validation set"))
