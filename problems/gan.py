"""H, the discriminator, and G, the class-conditional generator."""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel

from mlo.models.gan.diffaugment import diffaugment, sample_params
from mlo.models.gan.losses import GANObjective
from problems.base import LevelProblem, unwrap


class DiscriminatorProblem(LevelProblem):
    """H: ``max_H`` of the GAN objective on real training images vs G's images of the same classes."""

    def __init__(self, name, config, module, optimizer, scheduler=None, train_data_loader=None, *,
                 objective: GANObjective, diffaugment_policy: tuple[str, ...], **kwargs):
        super().__init__(name, config, module, optimizer, scheduler, train_data_loader, **kwargs)
        self.objective = objective
        self.policy = diffaugment_policy

    def forward(self, x, y):
        return self.module(x, y, self.shared_neck)

    def prepare_batch(self, data):
        x, y = data
        n, size, dev = x.shape[0], x.shape[-1], self.device
        return {
            "x": x, "y": y,
            "z": torch.randn(n, unwrap(self.gen.module).z_dim, generator=self.noise, device=dev),
            "aug_real": sample_params(self.policy, n, size, self.noise, dev),
            "aug_fake": sample_params(self.policy, n, size, self.noise, dev),
            "loss_noise": self.objective.sample_noise(n, self.noise, dev),
        }

    def training_step(self, batch):
        with torch.no_grad():
            fake = self.gen.module(batch["z"], batch["y"])
        y = batch["y"]
        return self.objective.discriminator_loss(self, diffaugment(batch["x"], batch["aug_real"]), y,
                                                 diffaugment(fake, batch["aug_fake"]), y, batch["loss_noise"]).loss


class GeneratorProblem(LevelProblem):
    """G: ``min_G`` of the GAN objective for uniformly drawn classes; keeps an EMA copy for sampling."""

    def __init__(self, name, config, module, optimizer, scheduler=None, train_data_loader=None, *,
                 objective: GANObjective, diffaugment_policy: tuple[str, ...], batch_size: int, num_classes: int,
                 image_size: int, ema_decay: float, **kwargs):
        super().__init__(name, config, module, optimizer, scheduler, train_data_loader, **kwargs)
        self.objective = objective
        self.policy = diffaugment_policy
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.image_size = image_size
        self.ema_decay = ema_decay
        self.ema = None

    def initialize(self):
        super().initialize()
        self.ema = AveragedModel(unwrap(self.module), multi_avg_fn=self._ema_update, use_buffers=True)

    @torch.no_grad()
    def _ema_update(self, averaged, current, num_averaged):
        if not torch.is_floating_point(averaged[0]):  # integer buffers (BN's batch counter): copy
            torch._foreach_copy_(averaged, current)
            return
        # warm-up as in TF's ExponentialMovingAverage, so early averages are not swamped by the init
        n = float(num_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(self.ema_decay, (1.0 + n) / (10.0 + n)))

    def prepare_batch(self, data):
        n, dev = self.batch_size, self.device
        return {
            "z": torch.randn(n, unwrap(self.module).z_dim, generator=self.noise, device=dev),
            "y": torch.randint(0, self.num_classes, (n,), generator=self.noise, device=dev),
            "aug": sample_params(self.policy, n, self.image_size, self.noise, dev),
        }

    def gan_loss(self, fake, batch):
        """G's per-image GAN loss and D's scores of ``fake`` (augmented as D sees it)."""
        return self.objective.generator_loss(self.disc, diffaugment(fake, batch["aug"]), batch["y"])

    def training_step(self, batch):
        return self.gan_loss(self.module(batch["z"], batch["y"]), batch).per_sample.mean()

    def param_callback(self):
        self.ema.update_parameters(unwrap(self.module))

    def level_state(self):
        return {**super().level_state(), "ema": self.ema.state_dict()}

    def load_level_state(self, state):
        super().load_level_state(state)
        self.ema.load_state_dict(state["ema"])
