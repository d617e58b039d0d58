"""Build a mode's levels from the config: modules, optimizers, loaders, then the Betty problems.

Every built-in level kind registers its builder here with ``register_level`` (``experiments.registry``), the
way a user's plugin registers its own: ``builder(ctx, name)`` gets the ``BuildContext`` and the level's name.
A mode lists its levels and, where a level is not of the kind of its name, which kind it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
import torch.nn as nn

from mlo.budget import Allocator, create_allocator
from mlo.config import Config, GANConfig
from mlo.data import LongTailData
from mlo.data.loaders import make_loader, stream_seed
from mlo.distributed import Processes
from mlo.errors import ConfigError
from mlo.losses import ClassificationLoss, create_loss
from mlo.models import Classifier, create_head, create_meta, create_model, has_batch_norm
from mlo.models.heads import TiedEncoder, WeightingNet
from mlo.models.encoders import load_encoder_weights
from mlo.models.gan import GAN
from mlo.models.gan.diffaugment import parse_policy
from mlo.models.gan.losses import ADVERSARIAL_LOSSES, GANObjective
from mlo.models.gan.sampling import LearnedTruncation
from problems import (AdversarialClassifierProblem, AdversarialGeneratorProblem, AllocationProblem, ClassifierProblem,
                      DiscriminatorProblem, GeneratorProblem, LevelProblem, MetaProblem, RefinedClassifierProblem,
                      RetrainedHeadProblem, TruncationProblem, level_config)
from problems.base import unwrap
from problems.multitask import MultiTaskGeneratorProblem
from problems.mwn import MetaWeightedClassifierProblem, WeightingNetProblem
from problems.sequential import PregeneratedClassifierProblem
from experiments.modes import Mode
from experiments.registry import level_builder, register_level

STREAMS = ("w1", "w2", "disc")  # networks that read A (a neck-form A keeps BN statistics per stream)
ARCH_DISCRIMINATORS = ("biggan", "acgan", "wacgan_gp")  # discriminators whose body can be a supernet

@dataclass
class BuildContext:
    cfg: Config
    data: LongTailData
    mode: Mode
    device: torch.device
    processes: Processes = Processes()  # under torchrun, each process trains on its share of every batch
    levels: dict = field(default_factory=dict)  # the problems built so far, by name (build_levels fills it)
    streams: dict = field(default_factory=dict)  # the random streams asked for (seed), by name

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

    def seed(self, stream: str) -> int:
        """The seed of the random stream named ``stream`` (any name: "w1 batches", "my level's noise"), derived
        from the run's seed and the name; every stream asked for is listed in the run's seeds.json."""
        self.streams[stream] = stream_seed(self.cfg.run.seed, stream)
        return self.streams[stream]

    @cached_property
    def allocator(self) -> Allocator:
        t = self.cfg.train
        return create_allocator(t.allocator, gen_per_real=t.gen_per_real, k=t.worstk_k, fraction=t.worstk_fraction,
                                num_classes=self.num_classes)

    @property
    def gen_per_epoch(self) -> int:
        """The budget M: the allocator's generated images per epoch."""
        return self.allocator.images_per_epoch(self.data.train_counts)

    @property
    def gen_per_step(self) -> int:
        """Generated images per W2 step: the budget M spread over an epoch's steps; under torchrun split
        between the processes (each generates ⌈M / N⌉ from its own noise)."""
        m = max(1, round(self.gen_per_epoch / self.steps_per_epoch))
        return -(-m // self.processes.world_size)

    @property
    def batch_share(self) -> int:
        """Images of a training batch each process takes (``shared`` checks that they divide evenly)."""
        return self.cfg.train.batch_size // self.processes.world_size

    # ----- shared modules ----------------------------------------------------------------------
    def encoder(self) -> nn.Module:
        m = self.cfg.model
        channels, size, _ = self.data.image_shape
        # the activation is passed only where one is asked for: encoders without a choice need not take it
        extra = {} if m.activation == "relu" else {"activation": m.activation}
        a = self.cfg.arch
        if m.encoder == "pc_darts":
            extra.update(cells=a.cells, steps=a.nodes, partial=a.partial, stem=a.stem)
        if m.encoder == "darts":
            extra.update(cells=a.cells, genotype=a.genotype, num_classes=self.num_classes,
                         drop_path=a.drop_path, auxiliary_weight=a.auxiliary_weight, stem=a.stem)
        try:
            encoder = create_model("encoder", m.encoder, in_channels=channels, image_size=size, width=m.width,
                                   **extra)
        except TypeError as exc:
            if "activation" not in extra or "activation" not in str(exc):
                raise
            raise ConfigError(f"model.activation={m.activation}: encoder {m.encoder} has no choice of activation; "
                              f"use model.activation=relu") from None
        if m.pretrained_path:
            load_encoder_weights(encoder, m.pretrained_path)
        return encoder

    @cached_property
    def w1_encoder(self) -> nn.Module:
        """W1's encoder; with tied encoders the one W1, W2 and H share (W1 steps it)."""
        return self.encoder()

    def tied_encoder(self, stream: str) -> nn.Module:
        """The encoder of ``stream`` when encoders are tied: the shared one; with A as the shared head, followed
        by a layer of the network's own (``TiedEncoder``), so that W1, W2 and H stay distinct networks."""
        if self.meta_form != "head":
            return self.w1_encoder  # a neck- or arch-form A leaves each network a class head of its own
        return TiedEncoder(self.w1_encoder, self.cfg.model.meta_activation)

    @property
    def feature_dim(self) -> int:
        return self.w1_encoder.out_dim

    @property
    def has_meta(self) -> bool:
        return "meta" in self.mode.levels

    @property
    def meta_form(self) -> str:
        """The shape of A (and of the A-shaped modules networks own without a meta level): head, neck or
        arch (a supernet's architecture, also without a meta level when the encoder is a supernet)."""
        m = self.cfg.model
        return "arch" if m.encoder == "pc_darts" else "neck" if m.meta == "neck" else "head"

    def create_meta(self, streams: tuple[str, ...]) -> nn.Module:
        m = self.cfg.model
        return create_meta(self.meta_form, self.feature_dim, self.num_classes, streams, m.meta_activation, m.head,
                           (m.spinal_width, m.spinal_depth), self.cfg.arch.nodes)

    def own_head(self) -> nn.Module | None:
        """The class head of a classifier after a neck- or arch-form A (a head-form A is the head itself)."""
        m = self.cfg.model
        if self.meta_form == "head":
            return None
        return create_head(m.head, self.feature_dim, self.num_classes, m.meta_activation, (m.spinal_width, m.spinal_depth))

    @property
    def meta_features(self) -> int:
        """The width of A's features (what H's ψ reads); None: its body's (A is inside the body)."""
        m = self.cfg.model
        if self.meta_form == "arch":
            return None
        return m.spinal_width * m.spinal_depth if (self.meta_form, m.head) == ("head", "spinal") else self.feature_dim

    @cached_property
    def meta_module(self) -> nn.Module:
        """A, shared by W1, W2 and H."""
        return self.create_meta(STREAMS)

    def own_meta(self, stream: str) -> nn.Module | None:
        """Without a meta level every network owns an A-shaped module, so capacities match."""
        return None if self.has_meta else self.create_meta((stream,))

    def classifier(self, stream: str, standalone: bool = False) -> Classifier:
        """The classifier of level ``stream``; ``standalone``: a fresh one of the same architecture with a
        head of its own, outside the run (e.g. GAN-train's classifier)."""
        if standalone:
            encoder, meta = self.encoder(), self.create_meta((stream,))
        else:
            tied = self.cfg.model.encoders_tied
            encoder = self.tied_encoder(stream) if tied else self.w1_encoder if stream == "w1" else self.encoder()
            meta = self.own_meta(stream)
        return Classifier(encoder, stream, meta=meta, own_head=self.own_head())

    @cached_property
    def gan(self) -> GAN:
        g = self.cfg.gan
        body = self.tied_encoder("disc") if self.cfg.model.encoders_tied else None
        if self.meta_form == "arch":
            if g.generator not in ARCH_DISCRIMINATORS:
                raise ConfigError(f"model.meta=arch: H reads A through a supernet of its own, which gan.generator="
                                  f"{g.generator}'s discriminator cannot take; use {', '.join(ARCH_DISCRIMINATORS)}")
            body = body or self.encoder()  # H's own supernet, of the classifiers' shape
        gan = create_model("gan", g.generator, image_shape=self.data.image_shape, num_classes=self.num_classes,
                           feature_dim=self.feature_dim, cfg=g, encoder=body, meta=self.own_meta("disc"),
                           owns_class_head=self.meta_form != "head", meta_features=self.meta_features)
        if g.gp_weight != GANConfig().gp_weight and gan.objective.gp_weight != g.gp_weight:
            raise ConfigError(f"gan.gp_weight: gan.generator={g.generator} has no gradient penalty; drop it")
        return gan

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

    def level_config(self, name: str, retain_graph: bool = False, hypergradient: str | None = None):
        t = self.cfg.train
        unroll = t.meta_every if name in self.mode.every_meta else 1
        return level_config(unroll_steps=unroll, hypergradient=hypergradient or t.hypergradient,
                            darts_alpha=t.darts_alpha, precision=t.precision, retain_graph=retain_graph)

    def classifier_settings(self, name: str) -> dict:
        """What every classifier level takes: its own loss (statistics are per level), the schedule
        length, the SAM radius, and the common settings."""
        return {"loss_fn": self.loss_fn(), "total_steps": self.total_steps, "sam_rho": self.cfg.train.sam_rho,
                "num_classes": self.num_classes, **self.common(name)}

    def common(self, name: str) -> dict:
        """What every level's problem takes (``LevelProblem``): the run's seed (its noise stream is named after
        the level), the lower levels it waits for, how often it steps, and, with tied encoders, what it borrows."""
        ready_on = list(self.mode.ready_on[name]) if name in self.mode.ready_on else None
        return {"seed": self.cfg.run.seed, "ready_on": ready_on, "every": self.mode.every.get(name, 1),
                **self.tying(name)}

    def settings(self, kind: str):
        """The settings of level kind ``kind`` (the config section ``levels.<kind>``)."""
        return self.cfg.levels[kind]

    def tying(self, name: str) -> dict:
        """With tied encoders, the level that owns the shared encoder (W1, or W2 in a mode without W1) steps
        it; the others borrow it and lend it their gradients (``problems.base``)."""
        if not self.cfg.model.encoders_tied:
            return {}
        owner = "w1" if "w1" in self.mode.levels else "w2"
        if name == owner or name not in ("w1", "w2", "disc"):
            return {}
        return {"borrows": self.w1_encoder, "lender": owner}

    # ----- data --------------------------------------------------------------------------------
    def shared(self, loader, key: str):
        """``loader`` after checking that every process gets an equal share of its batches (so the
        average of the processes' gradients is the gradient of the whole batch)."""
        n = self.processes.world_size
        if loader.batch_size % n:
            raise ConfigError(f"{key}: batches of {loader.batch_size} images cannot be split evenly between {n} "
                              f"processes; choose a size that makes them a multiple of {n}")
        return loader

    def train_loader(self, stream: str, batch_size: int | None = None, order: str = "shuffle"):
        d, p = self.data, self.processes
        return self.shared(make_loader(order, d.train_images, d.train_labels, batch_size or self.cfg.train.batch_size,
                                       seed=self.seed(stream), augment=self.cfg.data.augment, device=self.device,
                                       workers=self.cfg.data.num_workers, rank=p.rank, world_size=p.world_size,
                                       channels_last=self.cfg.run.channels_last),
                           "train.batch_size")

    def class_balanced_batches(self, stream: str, batch_size: int):
        """Training images drawn class-balanced (each class equally often), ``batch_size`` at a time."""
        return self.train_loader(stream, batch_size=batch_size, order="class_balanced")

    def val_loader(self, stream: str, with_indices: bool = False):
        d, p = self.data, self.processes
        return self.shared(make_loader("balanced", d.val_images, d.val_labels, self.cfg.data.val_batch_size,
                                       seed=self.seed(stream), device=self.device, workers=self.cfg.data.num_workers,
                                       rank=p.rank, world_size=p.world_size, channels_last=self.cfg.run.channels_last,
                                       with_indices=with_indices),
                           "data.val_batch_size")


@register_level("w1")
def build_w1(ctx: BuildContext, name: str) -> ClassifierProblem:
    module = ctx.classifier(name)
    optimizer = ctx.classifier_optimizer(module)
    return ClassifierProblem(name, ctx.level_config(name), module, optimizer, ctx.classifier_scheduler(optimizer),
                             ctx.train_loader(f"{name} batches"), **ctx.classifier_settings(name))


@register_level("w2")
def build_w2(ctx: BuildContext, name: str) -> RefinedClassifierProblem:
    t = ctx.cfg.train
    module = ctx.classifier(name)
    optimizer = ctx.classifier_optimizer(module)
    return RefinedClassifierProblem(
        name, ctx.level_config(name), module, optimizer, ctx.classifier_scheduler(optimizer),
        (ctx.train_loader(f"{name} batches"), ctx.val_loader(f"{name} validation batches", with_indices=True)),
        allocator=ctx.allocator, keep_form=t.keep_weights, budget=t.gen_budget,
        train_counts=ctx.data.train_counts, gen_per_step=ctx.gen_per_step, gen_per_epoch=ctx.gen_per_epoch,
        lambda_gen=t.lambda_gen, temperatures=(t.temperature_start, t.temperature_end),
        truncation=None if ctx.cfg.gan.learn_truncation else ctx.cfg.gan.truncation,
        decov_weight=t.decov_weight, count_generated=t.class_prior == "trained_on", **ctx.classifier_settings(name))


@register_level("w2_pregenerated")
def build_w2_pregenerated(ctx: BuildContext, name: str) -> PregeneratedClassifierProblem:
    module = ctx.classifier(name)
    optimizer = ctx.classifier_optimizer(module)
    # the second loader is replaced by the generated set when W2's phase starts
    return PregeneratedClassifierProblem(
        name, ctx.level_config(name), module, optimizer, ctx.classifier_scheduler(optimizer),
        (ctx.train_loader(f"{name} batches"), ctx.train_loader("sequential generated batches")),
        lambda_gen=ctx.cfg.train.lambda_gen, gen_per_step=ctx.gen_per_step, train_counts=ctx.data.train_counts,
        count_generated=ctx.cfg.train.class_prior == "trained_on", **ctx.classifier_settings(name))


@register_level("crt")
def build_crt(ctx: BuildContext, name: str) -> RetrainedHeadProblem:
    """cRT: the encoder of the classifier the mode reports (frozen) under a fresh A-shaped head, trained
    on the real training images with class-balanced sampling."""
    encoder = unwrap(ctx.levels[ctx.mode.retrains].module).encoder
    module = Classifier(encoder, name, meta=ctx.create_meta((name,)), own_head=ctx.own_head())
    head = [p for key, p in module.named_parameters() if not key.startswith("encoder.")]
    optimizer = ctx.classifier_optimizer(nn.ParameterList(head))
    return RetrainedHeadProblem(name, ctx.level_config(name), module, optimizer, ctx.classifier_scheduler(optimizer),
                                ctx.class_balanced_batches(f"{name} batches", ctx.cfg.train.batch_size),
                                **ctx.classifier_settings(name))


@register_level("disc")
def build_disc(ctx: BuildContext, name: str, objective: GANObjective | None = None) -> DiscriminatorProblem:
    objective = objective or ctx.gan.objective
    if objective.gp_weight and ctx.cfg.train.hypergradient == "exact" and any(
            name in lowers for lowers in ctx.mode.u2l.values()) and has_batch_norm(
            ctx.gan.discriminator, ctx.meta_module):
        raise ConfigError(f"train.hypergradient=exact: the exact hop through H would differentiate the gradient "
                          f"penalty of gan.generator={ctx.cfg.gan.generator} three times, and torch has no third "
                          f"derivative of batch norm (in A's neck or the tied encoder); use train.hypergradient=darts")
    g, batch = ctx.cfg.gan, ctx.cfg.train.batch_size
    module = ctx.gan.discriminator
    return DiscriminatorProblem(
        name, ctx.level_config(name), module, ctx.gan_optimizer(module, g.d_lr),
        train_data_loader=ctx.train_loader(f"{name} batches", batch_size=batch * g.coreset_factor,
                                           order="class_balanced" if g.real_batches == "class_balanced" else "shuffle"),
        objective=objective,
        diffaugment_policy=parse_policy(g.diffaugment), batch_size=ctx.batch_share, lecam_weight=g.lecam_weight,
        lecam_decay=g.lecam_decay, **ctx.common(name))


def _generator_settings(ctx: BuildContext, name: str) -> dict:
    g = ctx.cfg.gan
    return {"objective": ctx.gan.objective, "diffaugment_policy": parse_policy(g.diffaugment),
            "batch_size": ctx.batch_share, "num_classes": ctx.num_classes,
            "image_size": ctx.data.image_shape[-1], "ema_decay": g.ema_decay, "topk_min_fraction": g.topk_min_fraction,
            "topk_decay": g.topk_decay, **ctx.common(name)}


@register_level("gen")
def build_gen(ctx: BuildContext, name: str) -> GeneratorProblem:
    module = ctx.gan.generator
    return GeneratorProblem(name, ctx.level_config(name), module, ctx.gan_optimizer(module, ctx.cfg.gan.g_lr),
                            **_generator_settings(ctx, name))


@register_level("gen_mtl")
def build_gen_mtl(ctx: BuildContext, name: str) -> MultiTaskGeneratorProblem:
    module = ctx.gan.generator
    return MultiTaskGeneratorProblem(
        name, ctx.level_config(name), module, ctx.gan_optimizer(module, ctx.cfg.gan.g_lr),
        train_data_loader=ctx.val_loader("mtl validation batches", with_indices=True),
        classifier_weight=ctx.cfg.train.mtl_weight, **_generator_settings(ctx, name))


@register_level("trunc")
def build_trunc(ctx: BuildContext, name: str) -> TruncationProblem:
    g = ctx.cfg.gan
    module = LearnedTruncation(g.truncation)
    return TruncationProblem(name, ctx.level_config(name, retain_graph=True), module,
                             torch.optim.Adam(module.parameters(), lr=g.truncation_lr, fused=True),
                             batch_size=ctx.gen_per_step, num_classes=ctx.num_classes, **ctx.common(name))


@register_level("meta")
def build_meta(ctx: BuildContext, name: str) -> MetaProblem:
    t = ctx.cfg.train
    module = ctx.meta_module
    optimizer = torch.optim.Adam(module.parameters(), lr=t.meta_lr, weight_decay=t.meta_weight_decay, fused=True)
    loaders = [ctx.val_loader(f"{name} validation batches")]
    if t.meta_data == "val_and_train":  # as many class-balanced training images as validation images per batch
        loaders.append(ctx.class_balanced_batches(f"{name} training batches", ctx.cfg.data.val_batch_size))
    meta = MetaProblem(name, ctx.level_config(name, retain_graph=True), module, optimizer,
                       train_data_loader=tuple(loaders) if len(loaders) > 1 else loaders[0], gamma=t.gamma,
                       **ctx.common(name))
    meta.chunk_size = t.meta_chunk
    return meta


@register_level("alloc")
def build_alloc(ctx: BuildContext, name: str) -> AllocationProblem:
    """The learned allocation (``train.allocator=learned``): p(s)'s logits, an upper level of W2."""
    module = ctx.allocator.module
    optimizer = torch.optim.Adam(module.parameters(), lr=ctx.cfg.train.alloc_lr, fused=True)
    return AllocationProblem(name, ctx.level_config(name, retain_graph=True), module, optimizer,
                             train_data_loader=ctx.val_loader(f"{name} validation batches"), **ctx.common(name))


# ----- adversarial (worst-case) generation ----------------------------------------------------------
def adversarial_objective(ctx: BuildContext) -> GANObjective:
    """The GAN's objective with the critic game in ``train.adversarial_form``."""
    return replace(ctx.gan.objective, adversarial=ADVERSARIAL_LOSSES[ctx.cfg.train.adversarial_form])


@register_level("adversarial_classifier")
def build_adversarial_classifier(ctx: BuildContext, name: str) -> AdversarialClassifierProblem:
    t = ctx.cfg.train
    module = ctx.classifier(name)
    optimizer = ctx.classifier_optimizer(module)
    return AdversarialClassifierProblem(
        name, ctx.level_config(name), module, optimizer, ctx.classifier_scheduler(optimizer),
        ctx.train_loader(f"{name} batches"), gen_per_step=ctx.gen_per_step, lambda_gen=t.lambda_gen,
        decov_weight=t.decov_weight, **ctx.classifier_settings(name))


@register_level("adversarial_critic")
def build_adversarial_critic(ctx: BuildContext, name: str) -> DiscriminatorProblem:
    return build_disc(ctx, name, objective=adversarial_objective(ctx))


@register_level("adversarial_generator")
def build_adversarial_generator(ctx: BuildContext, name: str) -> AdversarialGeneratorProblem:
    module = ctx.gan.generator
    return AdversarialGeneratorProblem(
        name, ctx.level_config(name), module, ctx.gan_optimizer(module, ctx.cfg.gan.g_lr),
        adversarial_lambda=ctx.cfg.train.adversarial_lambda,
        **{**_generator_settings(ctx, name), "objective": adversarial_objective(ctx)})


@register_level("w1_mwn")
def build_w1_mwn(ctx: BuildContext, name: str) -> MetaWeightedClassifierProblem:
    module = ctx.classifier(name)
    optimizer = ctx.classifier_optimizer(module)
    # exact hops: W's loss feeds V the detached loss values, which finite differences of W would move
    return MetaWeightedClassifierProblem(name, ctx.level_config(name, hypergradient="exact"), module, optimizer,
                                         ctx.classifier_scheduler(optimizer), ctx.train_loader(f"{name} batches"),
                                         **ctx.classifier_settings(name))


@register_level("mwn")
def build_mwn(ctx: BuildContext, name: str) -> WeightingNetProblem:
    module = WeightingNet(ctx.cfg.train.mwn_hidden)
    optimizer = torch.optim.Adam(module.parameters(), lr=ctx.cfg.train.mwn_lr, fused=True)
    return WeightingNetProblem(name, ctx.level_config(name, retain_graph=True), module, optimizer,
                               train_data_loader=ctx.val_loader(f"{name} validation batches"), **ctx.common(name))


def build_levels(ctx: BuildContext) -> list:
    """The mode's problems in stepping order; module initialisation is seeded by ``run.seed``."""
    if ctx.cfg.train.allocator == "worstk" and ctx.cfg.train.worstk_k > ctx.num_classes:
        raise ConfigError(f"train.worstk_k={ctx.cfg.train.worstk_k} exceeds the {ctx.num_classes} classes of "
                          f"{ctx.cfg.data.dataset}; lower it")
    torch.manual_seed(ctx.cfg.run.seed)
    for name in ctx.mode.levels:
        kind = ctx.mode.kind(name)
        problem = level_builder(kind, ctx.mode.name)(ctx, name)
        if not isinstance(problem, LevelProblem) or problem.name != name:
            what = f"a {type(problem).__name__}" if not isinstance(problem, LevelProblem) else f"level '{problem.name}'"
            raise ConfigError(f"the builder of level kind '{kind}' returned {what} for level '{name}'; it must return a "
                              f"LevelProblem (problems.base) named by the name it is given")
        ctx.levels[name] = problem
    return list(ctx.levels.values())
