"""W1, the initial classifier, and W2, the refined classifier trained on real plus generated images."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from mlo.budget import (Allocator, ValidationMemory, budget_weights, expected_keep, logistic_noise, per_class_val_loss,
                        sample_classes, temperature, uniform_noise)
from mlo.losses import ClassificationLoss, decov
from mlo.models.gan.sampling import truncate
from problems.base import LevelProblem, unwrap


class ClassifierProblem(LevelProblem):
    """W1 (or a vanilla classifier): ``min_W L_cls(W, A, D_tr)``.

    The loss is told the fraction of training done before the step (``batch["progress"]``, for
    schedules such as DRW and ISDA's ramp). A loss with feature statistics (ISDA) takes in the
    real training features of an own step at the start of the next one: the hypergradient hops
    that re-evaluate a step run after it, and must see the statistics the step saw.
    """

    def __init__(self, name, config, module, optimizer, scheduler=None, train_data_loader=None, *,
                 loss_fn: ClassificationLoss, total_steps: int, num_classes: int, sam_rho: float = 0.0, **kwargs):
        super().__init__(name, config, module, optimizer, scheduler, train_data_loader, **kwargs)
        self.loss_fn = loss_fn
        self.total_steps = total_steps
        self.num_classes = num_classes
        self.pending_features = None  # (features, labels) of the last own step, not yet in the loss's statistics
        self.sam_rho = sam_rho
        if sam_rho > 0:  # Betty steps through custom_optimizer_step when a problem has one
            self.custom_optimizer_step = self.sharpness_aware_step

    def sharpness_aware_step(self, *args, **kwargs) -> None:
        """SAM (Foret et al.): the update uses the gradient at ``θ + ρ g/‖g‖``, on the same batch.
        ``training_step`` is a pure function of the batch, so the second evaluation sees the same
        noise; being no own step, it leaves BN statistics alone."""
        params = [p for p in self.trainable_parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        scale = self.sam_rho / (torch.stack(torch._foreach_norm(grads)).norm() + 1e-12)
        shifts = torch._foreach_mul(grads, scale)
        with torch.no_grad():
            torch._foreach_add_(params, shifts)
        sharp = torch.autograd.grad(self.training_step_exec(self.cur_batch), params, allow_unused=True)
        with torch.no_grad():
            torch._foreach_sub_(params, shifts)
        for p, g in zip(params, sharp):
            p.grad = g if g is not None else torch.zeros_like(p)
        self.average_gradients()  # under torchrun: each process's sharp gradient is of its share of the batch
        self.optimizer.step()

    def forward(self, x):
        return self.module(x, self.shared_meta)

    def get_batch(self):
        if self.pending_features is not None:
            self.loss_fn.update_statistics(*self.pending_features)
            self.pending_features = None
        batch = super().get_batch()
        batch["progress"] = (self._count - 1) / max(1, self.total_steps)  # Betty counted this step already
        return batch

    def per_sample_loss(self, x, y, progress: float, real: int, with_features: bool = False, class_counts=None):
        """Losses of images ``x`` against ``y`` (and, ``with_features``, their features before the
        head); the first ``real`` are training images, whose features a loss with statistics takes
        in before the next own step (never from a hop). ``class_counts``: the class distribution of
        this level's training data per epoch, for a loss that corrects for it (default: the real counts)."""
        extra = {"class_counts": class_counts} if class_counts is not None and self.loss_fn.uses_counts else {}
        if not (self.loss_fn.needs_features or with_features):
            return self.loss_fn(self(x), y, progress=progress, **extra)
        logits, features = self.module(x, self.shared_meta, with_features=True)
        if self.loss_fn.needs_features:
            if self._own_step:
                self.pending_features = (features[:real].detach(), y[:real])
            extra["head_weight"] = unwrap(self.module).head_weight(self.shared_meta)
        losses = self.loss_fn(logits, y, progress=progress, **extra)
        return (losses, features) if with_features else losses

    def record_trained_on(self, y: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add the weight of each image of an own step to its class: the class distribution this level
        trained on (the prior of post-hoc logit adjustment), summed over the run by the runner."""
        weights = torch.ones_like(y, dtype=torch.float) if weights is None else weights.detach().float()
        self.record("trained_on", torch.zeros(self.num_classes, device=y.device).index_add_(0, y, weights))

    def weighed(self, batch, losses: torch.Tensor) -> torch.Tensor:
        """The per-sample losses of a training batch as the upper levels that weigh them leave them: every
        upper level with a ``weigh(lower, batch, losses)`` method (a level of one's own, such as learned class
        weights, docs/examples/class_weights.py) reads this level's loss that way, and gets its hypergradient."""
        for upper in self.parents:
            if hasattr(upper, "weigh"):
                losses = upper.weigh(self, batch, losses)
        return losses

    def training_step(self, batch):
        self.record_trained_on(batch["y"])
        losses = self.per_sample_loss(batch["x"], batch["y"], batch["progress"], real=len(batch["y"]))
        loss = self.weighed(batch, losses).mean()
        auxiliary = getattr(unwrap(self.module).encoder, "auxiliary_loss", None)  # a searched network's (DARTS)
        return loss if auxiliary is None else loss + auxiliary(batch["y"])

    def process_state(self):
        # a loss's feature statistics (ISDA) are each process's own, from its share of the batches
        return {**super().process_state(), "loss": self.loss_fn.state_dict(), "pending_features": self.pending_features}

    def load_level_state(self, state):
        super().load_level_state(state)
        self.loss_fn.load_state_dict(state["loss"])
        self.pending_features = state["pending_features"]


class RefinedClassifierProblem(ClassifierProblem):
    """W2: ``L_cls(W2, A, D_tr) + λ · mean_m b_m · L_cls(W2, A, G(o_m, δ_m), o_m)``.

    ``p(s)`` comes from the allocator applied to W1's per-class loss on the validation set: the
    current class-balanced validation batch (differentiable, so b_m carries gradients to W1 and A)
    and the rest of the set as W1 last scored it (``ValidationMemory``, updated after each own step,
    before the next); o_m, δ_m and the Gumbel noise are drawn in ``prepare_batch``. The latents are
    truncated at the τ of a ``trunc`` level (learned) or at ``truncation`` (fixed), if either is given;
    ``keep_form`` is the form of b_m (``mlo.budget.keep_weights``) and ``budget`` whether b_m is divided by
    its expectation (``counted``: class c weighs M p_c, the paper's count) or not (``squared``: M p_c²), or
    replaced by 1 with the score function's gradient (``score``) (``mlo.budget.budget_weights``);
    ``decov_weight`` adds the DeCov penalty of W2's features of the generated images; a count-aware loss
    corrects for the real counts plus the generated weight, or for the real counts alone (``count_generated=False``).
    """

    def __init__(self, name, config, module, optimizer, scheduler=None, train_data_loader=None, *,
                 loss_fn: ClassificationLoss, allocator: Allocator, train_counts, gen_per_step: int,
                 gen_per_epoch: int, lambda_gen: float, temperatures: tuple[float, float], total_steps: int,
                 truncation: float | None = None, decov_weight: float = 0.0, keep_form: str = "relaxed",
                 budget: str = "counted", count_generated: bool = True, **kwargs):
        super().__init__(name, config, module, optimizer, scheduler, train_data_loader, loss_fn=loss_fn,
                         total_steps=total_steps, **kwargs)
        self.allocator = allocator
        self.keep_form = keep_form
        self.budget = budget
        self.val_memory = None   # ValidationMemory of W1's losses, set in initialize
        self.pending_val = None  # (indices, losses, correct) of the last own step, not yet in the memory
        self.train_counts = torch.as_tensor(train_counts, dtype=torch.float)
        self.gen_per_step = gen_per_step
        self.gen_per_epoch = gen_per_epoch
        self.lambda_gen = lambda_gen
        self.temperatures = temperatures
        self.truncation = truncation
        self.decov_weight = decov_weight
        self.count_generated = count_generated

    def initialize(self):
        super().initialize()
        self.train_counts = self.train_counts.to(self.device)  # once, not a copy to the device per step
        self.val_memory = ValidationMemory(self.train_data_loader[1].labels, self.num_classes)

    def get_batch(self):
        if self.pending_val is not None:
            self.val_memory.update(*self.pending_val)
            self.pending_val = None
        return super().get_batch()

    def prepare_batch(self, data):
        (x, y), (x_val, y_val, idx_val) = data
        return {"x": x, "y": y, **self.generation_noise(self.noise, x_val, y_val, idx_val)}

    def generation_noise(self, generator: torch.Generator, x_val, y_val, idx_val) -> dict:
        """The draws behind ``generate`` (latents, class and keep noise), from ``generator``, plus the
        validation batch p(s) is computed on (and its images' indices) and the current temperature."""
        m, dev = self.gen_per_step, self.device
        return {
            "x_val": x_val, "y_val": y_val, "idx_val": idx_val,
            "z": torch.randn(m, unwrap(self.gen.module).z_dim, generator=generator, device=dev),
            "class_uniforms": uniform_noise((m, self.num_classes), generator, dev),
            "logistic": logistic_noise((m,), generator, dev),
            "temperature": temperature(self._count / max(1, self.total_steps), *self.temperatures),
        }

    def allocation(self, x_val, y_val, idx_val):
        """``p(s)`` and W1's per-class statistics on the validation set (differentiable in W1 and A through
        the batch); under several processes, of all their validation shares, so every process draws from
        the same ``p(s)``."""
        stats = per_class_val_loss(self.w1(x_val), y_val, self.num_classes, self.val_memory, idx_val)
        stats.train_counts = self.train_counts
        if self._own_step:
            self.pending_val = (idx_val, stats.batch_losses, stats.batch_correct)
        return self.allocator(stats), stats

    def latents(self, z):
        """The generator's latents δ_m, truncated at the learned or the fixed τ, if any."""
        learned = getattr(self, "trunc", None)  # Betty sets levels as attributes, by name
        if learned is not None:
            return learned.module(z)
        return z if self.truncation is None else truncate(z, self.truncation)

    def generate(self, batch):
        """Classes ``o_m ~ p(s)``, keep-weights ``b_m`` and images ``G(o_m, δ_m)`` for the batch's noise."""
        p, stats = self.allocation(batch["x_val"], batch["y_val"], batch["idx_val"])
        classes = sample_classes(p, batch["class_uniforms"])
        keep = budget_weights(p, classes, batch["logistic"], batch["temperature"], self.keep_form, self.budget)
        return self.gen.module(self.latents(batch["z"]), classes), classes, keep, p, stats

    def training_step(self, batch):
        # W2's own step differentiates W2's weights alone: no graph through G and W1 (hops build theirs)
        with torch.no_grad() if self._own_step else nullcontext():
            generated, classes, keep, p, stats = self.generate(batch)
        n = batch["y"].shape[0]
        losses, features = self.per_sample_loss(torch.cat([batch["x"], generated]), torch.cat([batch["y"], classes]),
                                                batch["progress"], real=n, with_features=True,
                                                class_counts=self.class_counts(p, batch["temperature"]))
        real_loss = losses[:n].mean()
        gen_loss = (keep * losses[n:]).mean()
        self.record("generated", F.one_hot(classes, self.num_classes).float().mul(keep[:, None]).sum(0))
        self.record_trained_on(torch.cat([batch["y"], classes]),
                               torch.cat([torch.ones(n, device=keep.device), self.lambda_gen * keep]))
        self.record("allocation", p)
        self.record("val_loss", stats.val_loss)
        loss = real_loss + self.lambda_gen * gen_loss
        if self.decov_weight:
            loss = loss + self.decov_weight * decov(features[n:])
        return loss

    def class_counts(self, p: torch.Tensor, temperature) -> torch.Tensor | None:
        """W2's class distribution per epoch, in images: the real counts plus λ times the generated weight
        each class gets in expectation from ``p`` (M p_c counted or score, about M p_c² squared); no gradient.
        None (the loss's own real counts) when generated images do not count."""
        if not self.count_generated:
            return None
        share = p.detach() if self.budget != "squared" else p.detach() * expected_keep(p, temperature, self.keep_form)
        return self.train_counts + self.lambda_gen * self.gen_per_epoch * share

    def level_state(self):
        return {**super().level_state(), "val_memory": self.val_memory.state_dict()}  # the same in every process

    def process_state(self):
        return {**super().process_state(), "pending_val": self.pending_val}

    def load_level_state(self, state):
        super().load_level_state(state)
        self.val_memory.load_state_dict(state["val_memory"])
        self.pending_val = state["pending_val"]


class RetrainedHeadProblem(ClassifierProblem):
    """cRT (Kang et al., 2020): a fresh head re-trained on W1's frozen encoder, with class-balanced
    batches. The encoder runs without gradients and in evaluation mode (its BN statistics stay W1's);
    the level's parameters are the head's alone."""

    def trainable_parameters(self):
        return [p for name, p in unwrap(self.module).named_parameters() if not name.startswith("encoder.")]

    def forward(self, x):
        classifier = unwrap(self.module)
        training = classifier.encoder.training
        classifier.encoder.eval()
        with torch.no_grad():
            h = classifier.encoder(x)
        classifier.encoder.train(training)
        features, head = classifier.through_a(h, None)
        return head(features)

    def training_step(self, batch):
        self.record_trained_on(batch["y"])
        return F.cross_entropy(self(batch["x"]), batch["y"])
