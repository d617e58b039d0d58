"""Adversarial worst-case generation: a generator that plays against a critic D and the classifier C
at once, ``min_G max_{D,C} λ (E_real D − E_gen D) − E_gen ℓ(C(x), y)`` (λ = 1/ε).

D is the ordinary discriminator level (``problems.gan.DiscriminatorProblem``) with the critic game
in the Wasserstein or JS form; C, the reported classifier, trains on real plus generated images;
G makes images that D takes for real and C gets wrong.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mlo.losses import ClassificationLoss, decov
from mlo.models.gan.losses import top_k_mean
from problems.base import unwrap
from problems.classifier import ClassifierProblem
from problems.gan import GeneratorProblem


class AdversarialClassifierProblem(ClassifierProblem):
    """C: ``L_cls(C, D_tr) + λ_gen · mean_m ℓ(C(G(z_m, y_m)), y_m)`` for uniformly drawn classes
    ``y_m``, plus ``decov_weight`` times the DeCov penalty of C's features of the generated images."""

    def __init__(self, name, config, module, optimizer, scheduler=None, train_data_loader=None, *,
                 loss_fn: ClassificationLoss, total_steps: int, gen_per_step: int,
                 lambda_gen: float, decov_weight: float = 0.0, **kwargs):
        super().__init__(name, config, module, optimizer, scheduler, train_data_loader, loss_fn=loss_fn,
                         total_steps=total_steps, **kwargs)
        self.gen_per_step = gen_per_step
        self.lambda_gen = lambda_gen
        self.decov_weight = decov_weight

    def prepare_batch(self, data):
        x, y = data
        m, dev = self.gen_per_step, self.device
        return {
            "x": x, "y": y,
            "z": torch.randn(m, unwrap(self.gen.module).z_dim, generator=self.noise, device=dev),
            "y_gen": torch.randint(0, self.num_classes, (m,), generator=self.noise, device=dev),
        }

    def training_step(self, batch):
        with torch.no_grad():  # no level of this mode differentiates C's loss through G
            generated = self.gen.module(batch["z"], batch["y_gen"])
        n = batch["y"].shape[0]
        self.record_trained_on(torch.cat([batch["y"], batch["y_gen"]]),
                               torch.cat([torch.ones(n, device=generated.device),
                                          torch.full_like(batch["y_gen"], self.lambda_gen, dtype=torch.float)]))
        losses, features = self.per_sample_loss(torch.cat([batch["x"], generated]),
                                                torch.cat([batch["y"], batch["y_gen"]]), batch["progress"],
                                                real=n, with_features=True)
        loss = losses[:n].mean() + self.lambda_gen * losses[n:].mean()
        if self.decov_weight:
            loss = loss + self.decov_weight * decov(features[n:])
        return loss


class AdversarialGeneratorProblem(GeneratorProblem):
    """G: ``min_G λ · L_G(D) − ℓ(C(G(z, y)), y)`` per image, where ``L_G`` is G's loss in the
    objective's critic game (``−D`` in the Wasserstein form, so the λ term is ``−λ E_gen D``, plus
    the class cross-entropy of an auxiliary-classifier D) and ``ℓ`` C's cross-entropy, which G
    maximises. Top-k updates, when on, keep the images D scores highest."""

    def __init__(self, name, config, module, optimizer, scheduler=None, train_data_loader=None, *,
                 adversarial_lambda: float, **kwargs):
        super().__init__(name, config, module, optimizer, scheduler, train_data_loader, **kwargs)
        self.adversarial_lambda = adversarial_lambda

    def training_step(self, batch):
        fake = self.module(batch["z"], batch["y"])
        gan = self.gan_loss(fake, batch)
        classifier_loss = F.cross_entropy(self.w2(fake), batch["y"], reduction="none")
        per_sample = self.adversarial_lambda * gan.per_sample - classifier_loss
        return top_k_mean(per_sample, gan.score, batch["topk_fraction"])
