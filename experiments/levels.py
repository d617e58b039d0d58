"""Build a mode's levels from the config: modules, optimizers, loaders, then the Betty problems.

``LEVEL_BUILDERS`` maps a level name to a function of the ``BuildContext``; a mode lists names.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn as nn

from mlo.budget import create_allocator
from mlo.config import Config
from mlo.data import LongTailData
from mlo.data.loaders import derive_seed, make_loader
from mlo.distributed import Processes
from mlo.errors import ConfigError
from mlo.losses import ClassificationLoss, create_loss
from mlo.models import Classifier, MetaBlock, create_model
from mlo.models.encoders import load_encoder_weights
from mlo.models.gan import GAN
from mlo.models.gan.diffaugment import parse_policy
from problems import (ClassifierProblem, DiscriminatorProblem, GeneratorProblem, MetaProblem,
                      RefinedClassifierProblem, level_config)
from experiments.modes import Mode

STREAMS = ("w1", "w2", "disc")  # networks that read features through A


@dataclass
class BuildContext:
    cfg: Config
    data: LongTailData
    mode: Mode
    device: torch.device
    processes: Processes = Processes()  # under torchrun, each process trains on its share of every batch

    # ----- sizes -------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.data.train_labels) // min(self.cfg.train.batch_size, len(self.data.train_labels)))

    @property
    def total_steps(self) -> int:
        return self.cfg.train.epochs * self.steps_per_epoch

    def seed(self, *keys: int) -> int:
        return derive_seed(self.cfg.run.seed, *keys)

    # ----- shared modules ----------------------------------------------------------------------
    def encoder(self) -> nn.Module:
        m = self.cfg.model
        channels, size, _ = self.data.image_shape
        encoder = create_model("encoder", m.encoder, in_channels=channels, image_size=size, width=m.width)
        if m.pretrained_path:
            load_encoder_weights(encoder, m.pretrained_path)
        return encoder

    @cached_property
    def w1_encoder(self) -> nn.Module:
        """W1's encoder; with tied encoders also W2's and H's."""
        return self.encoder()

    @property
    def feature_dim(self) -> int:
        return self.w1_encoder.out_dim

    @property
    def has_meta(self) -> bool:
        return "meta" in self.mode.levels

    @cached_property
    def meta_block(self) -> MetaBlock:
        return MetaBlock(self.feature_dim, STREAMS)

    def own_neck(self, stream: str) -> MetaBlock | None:
        """Without a meta level every network owns an A-shaped block, so capacities match."""
        return None if self.has_meta else MetaBlock(self.feature_dim, (stream,))

    def classifier(self, stream: str) -> Classifier:
        encoder = self.w1_encoder if (self.cfg.model.encoders_tied or stream == "w1") else self.encoder()
        return Classifier(encoder, self.num_classes, stream, neck=self.own_neck(stream))

    @cached_property
    def gan(self) -> GAN:
        tied = self.w1_encoder if self.cfg.model.encoders_tied else None
        return create_model("gan", self.cfg.gan.generator, image_shape=self.data.image_shape,
                            num_classes=self.num_classes, feature_dim=self.feature_dim, cfg=self.cfg.gan,
                            encoder=tied, neck=self.own_neck("disc"))

    def loss_fn(self) -> ClassificationLoss:
        """A fresh loss for each level: a loss's statistics (ISDA) belong to one classifier."""
        t = self.cfg.train
        return create_loss(t.loss, self.data.train_counts, focal_gamma=t.focal_gamma, cb_beta=t.cb_beta,
                           logit_adjust_tau=t.logit_adjust_tau, ldam_margin=t.ldam_margin, ldam_scale=t.ldam_scale,
                           drw_start=t.drw_start, isda_lambda=t.isda_lambda, feature_dim=self.feature_dim).to(self.device)

    # ----- optimisation ------------------------------------------------------------------------
    # fused optimizers: one kernel per step, and a non-finite step is skipped on the device (no host sync)
    def classifier_optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        t = self.cfg.train
        if t.optimizer == "sgd":
            return torch.optim.SGD(module.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                                   fused=True)
        return torch.optim.Adam(module.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=True)

    def classifier_scheduler(self, optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        milestones = [m * self.steps_per_epoch for m in self.cfg.train.lr_milestones]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=self.cfg.train.lr_decay)

    def gan_optimizer(self, module: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(module.parameters(), lr=lr, betas=tuple(self.cfg.gan.gan_betas), fused=True)

    def level_config(self, name: str, retain_graph: bool = False):
        t = self.cfg.train
        unroll = t.meta_every if name in self.mode.every_meta else 1
        return level_config(unroll_steps=unroll, hypergradient=t.hypergradient, darts_alpha=t.darts_alpha,
                            precision=t.precision, retain_graph=retain_graph)

    def common(self, name: str) -> dict:
        return {"seed": self.cfg.run.seed, "ready_on": list(self.mode.ready_on[name]) if name in self.mode.ready_on else None}

    # ----- data --------------------------------------------------------------------------------
    def shared(self, loader, key: str):
        """``loader`` after checking that every process gets an equal share of its batches (so the
        average of the processes' gradients is the gradient of the whole batch)."""
        n = self.processes.world_size
        if loader.batch_size % n:
            raise ConfigError(f"{key}: batches of {loader.batch_size} images cannot be split evenly between {n} "
                              f"processes; choose a size that makes them a multiple of {n}")
        return loader

    def train_loader(self, key: int):
        d, p = self.data, self.processes
        return self.shared(make_loader("shuffle", d.train_images, d.train_labels, self.cfg.train.batch_size,
                                       seed=self.seed(key), augment=self.cfg.data.augment, device=self.device,
                                       workers=self.cfg.data.num_workers, rank=p.rank, world_size=p.world_size,
                                       channels_last=self.cfg.run.channels_last),
                           "train.batch_size")

    def val_loader(self, key: int):
        d, p = self.data, self.processes
        return self.shared(make_loader("balanced", d.val_images, d.val_labels, self.cfg.data.val_batch_size,
                                       seed=self.seed(key), device=self.device, workers=self.cfg.data.num_workers,
                                       rank=p.rank, world_size=p.world_size, channels_last=self.cfg.run.channels_last),
                           "data.val_batch_size")


def build_w1(ctx: BuildContext) -> ClassifierProblem:
    module = ctx.classifier("w1")
    optimizer = ctx.classifier_optimizer(module)
    return ClassifierProblem("w1", ctx.level_config("w1"), module, optimizer, ctx.classifier_scheduler(optimizer),
                             ctx.train_loader(1), loss_fn=ctx.loss_fn(), total_steps=ctx.total_steps, **ctx.common("w1"))


def build_w2(ctx: BuildContext) -> RefinedClassifierProblem:
    t = ctx.cfg.train
    module = ctx.classifier("w2")
    optimizer = ctx.classifier_optimizer(module)
    return RefinedClassifierProblem(
        "w2", ctx.level_config("w2"), module, optimizer, ctx.classifier_scheduler(optimizer),
        (ctx.train_loader(2), ctx.val_loader(3)), loss_fn=ctx.loss_fn(), allocator=create_allocator(t.allocator),
        train_counts=ctx.data.train_counts,
        # M per step, split between the processes (each generates ⌈M / N⌉ from its own noise)
        gen_per_step=-(-max(1, round(t.batch_size * t.gen_per_real)) // ctx.processes.world_size),
        lambda_gen=t.lambda_gen, temperatures=(t.temperature_start, t.temperature_end),
        total_steps=ctx.total_steps, **ctx.common("w2"))


def build_disc(ctx: BuildContext) -> DiscriminatorProblem:
    module = ctx.gan.discriminator
    return DiscriminatorProblem(
        "disc", ctx.level_config("disc"), module, ctx.gan_optimizer(module, ctx.cfg.gan.d_lr),
        train_data_loader=ctx.train_loader(4), d_loss=ctx.gan.d_loss,
        diffaugment_policy=parse_policy(ctx.cfg.gan.diffaugment), **ctx.common("disc"))


def build_gen(ctx: BuildContext) -> GeneratorProblem:
    module = ctx.gan.generator
    return GeneratorProblem(
        "gen", ctx.level_config("gen"), module, ctx.gan_optimizer(module, ctx.cfg.gan.g_lr),
        g_loss=ctx.gan.g_loss, diffaugment_policy=parse_policy(ctx.cfg.gan.diffaugment),
        batch_size=ctx.cfg.train.batch_size // ctx.processes.world_size, num_classes=ctx.num_classes, image_size=ctx.data.image_shape[-1],
        ema_decay=ctx.cfg.gan.ema_decay, **ctx.common("gen"))


def build_meta(ctx: BuildContext) -> MetaProblem:
    module = ctx.meta_block
    optimizer = torch.optim.Adam(module.parameters(), lr=ctx.cfg.train.meta_lr, fused=True)
    return MetaProblem("meta", ctx.level_config("meta", retain_graph=True), module, optimizer,
                       train_data_loader=ctx.val_loader(5), gamma=ctx.cfg.train.gamma, **ctx.common("meta"))


LEVEL_BUILDERS = {"w1": build_w1, "w2": build_w2, "disc": build_disc, "gen": build_gen, "meta": build_meta}


def build_levels(ctx: BuildContext) -> list:
    """The mode's problems in stepping order; module initialisation is seeded by ``run.seed``."""
    torch.manual_seed(ctx.cfg.run.seed)
    return [LEVEL_BUILDERS[name](ctx) for name in ctx.mode.levels]
