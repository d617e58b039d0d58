"""G of the multi-task (mtl) baseline: one objective for the GAN and the classifier, first order."""
from __future__ import annotations

from problems.gan import GeneratorProblem


class MultiTaskGeneratorProblem(GeneratorProblem):
    """G minimises its GAN objective plus ``classifier_weight`` × W2's loss on G's images (classes
    from p(s), weighted by b_m, as W2 sees them). With W2 minimising its own loss, this is gradient
    descent on the weighted sum of the GAN's and W2's losses — no hypergradient: G follows W2's
    current loss, not W2's response to G."""

    def __init__(self, name, config, module, optimizer, scheduler=None, train_data_loader=None, *,
                 classifier_weight: float, **kwargs):
        super().__init__(name, config, module, optimizer, scheduler, train_data_loader, **kwargs)
        self.classifier_weight = classifier_weight

    def prepare_batch(self, data):
        x_val, y_val, idx_val = data  # p(s) is computed on the validation set, as in W2
        return {**super().prepare_batch(None), "for_w2": self.w2.generation_noise(self.noise, x_val, y_val, idx_val)}

    def training_step(self, batch):
        images, classes, keep, p, _ = self.w2.generate(batch["for_w2"])
        progress = self.w2.count / max(1, self.w2.total_steps)
        losses = self.w2.per_sample_loss(images, classes, progress, real=0,
                                         class_counts=self.w2.class_counts(p, batch["for_w2"]["temperature"]))
        classifier_loss = (keep * losses).mean()
        return super().training_step(batch) + self.classifier_weight * classifier_loss
