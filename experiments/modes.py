"""Modes are data: which levels exist (and which kind of problem each is), how they are wired, which
phases train them, and what they accept. Each registers by name through ``register_mode``
(``experiments.registry``), the built-in ones below as a user's own does.

The levels are built by kind (``register_level``, ``experiments.levels``); ``mlo.graph`` turns the edges into
a Betty engine; ``experiments.phases`` turns phase names into ``mlo.trainer.Phase`` objects. A mode of your
own is most often a built-in one changed: ``get_mode("vanilla").with_upper("cw", "w1").named("class_weights",
"...")`` (docs/examples/class_weights.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from experiments.registry import get_mode, register_mode, registered_modes
from mlo.errors import ConfigError


@dataclass(frozen=True)
class Mode:
    """A mode. ``levels``: the level names, leaves in stepping order; ``kinds``: level -> builder kind where not
    the level's name; ``u2l``/``l2u``: Betty's edges (``l2u[lower]``: the levels whose loss reads ``lower``,
    ``u2l[upper]``: the levels whose loss reads ``upper``); ``ready_on``: a level steps once these of its lower
    levels are ready (not all of them); ``every_meta``: levels unrolled ``train.meta_every`` steps before their
    upper levels step; ``every``: an upper level that steps only every k-th time its lower levels are ready;
    ``phases``: names in ``experiments.phases``; ``generates``: W2 trains on generated images (the allocation is
    reported); ``spare_pool``: the run reads the pool images no split uses (``sequential_real``); ``options``:
    config keys that only this mode (and the modes made from it) reads: set in another mode, they are refused."""
    name: str
    description: str
    levels: tuple[str, ...]
    phases: tuple[str, ...]
    kinds: dict[str, str] = field(default_factory=dict)
    u2l: dict[str, tuple[str, ...]] = field(default_factory=dict)
    l2u: dict[str, tuple[str, ...]] = field(default_factory=dict)
    ready_on: dict[str, tuple[str, ...]] = field(default_factory=dict)
    every_meta: tuple[str, ...] = ()
    every: dict[str, int] = field(default_factory=dict)
    generates: bool = False
    spare_pool: bool = False
    options: tuple[str, ...] = ()

    def kind(self, level: str) -> str:
        return self.kinds.get(level, level)

    def named(self, name: str, description: str) -> "Mode":
        """The same mode under another name (a mode made from another must not keep its name)."""
        return replace(self, name=name, description=description)

    def without(self, level: str) -> "Mode":
        """The same mode with ``level`` and every edge touching it removed (e.g. ``model.meta=none``)."""
        def prune(edges):
            out = {k: tuple(v for v in vs if v != level) for k, vs in edges.items() if k != level}
            return {k: vs for k, vs in out.items() if vs}
        return replace(self, levels=tuple(n for n in self.levels if n != level), u2l=prune(self.u2l),
                       l2u=prune(self.l2u), ready_on=prune(self.ready_on),
                       every_meta=tuple(n for n in self.every_meta if n != level),
                       every={k: v for k, v in self.every.items() if k != level})

    def with_upper(self, level: str, lower: str, every: int = 1) -> "Mode":
        """The same mode with ``level`` (a level of the kind of its name) added as an upper level of ``lower``
        only: its loss reads ``lower``, whose solution depends on it, so its gradient is the hypergradient
        through ``lower``'s step. It steps when ``lower`` finishes an unroll (each of its steps, or every
        ``train.meta_every`` for a level in ``every_meta``), or only every ``every``-th time."""
        if level in self.levels:
            raise ConfigError(f"Mode.with_upper: mode {self.name} has a level '{level}' already; name yours otherwise")
        if lower not in self.levels:
            raise ConfigError(f"Mode.with_upper: mode {self.name} has no level '{lower}' to put '{level}' above "
                              f"(its levels: {', '.join(self.levels)})")
        if every < 1:
            raise ConfigError(f"Mode.with_upper: every={every} for level '{level}'; give 1 or more")
        return replace(self, levels=self.levels + (level,), u2l={**self.u2l, level: (lower,)},
                       l2u={**self.l2u, lower: self.l2u.get(lower, ()) + (level,)},
                       every={**self.every, **({level: every} if every > 1 else {})})

    def with_retrained_head(self) -> "Mode":
        """The same mode, then cRT: a fresh head on the frozen encoder of the reported classifier, trained
        with class-balanced sampling after every other phase and reported in its place."""
        return replace(self, levels=self.levels + ("crt",), phases=self.phases + ("crt",))

    def with_meta_weight_net(self) -> "Mode":
        """Meta-Weight-Net (``train.loss=mwn``): W1's per-sample losses weighed by a network ``mwn``, an upper
        level of W1 learned on the validation set."""
        return replace(self, kinds={**self.kinds, "w1": "w1_mwn"}).with_upper("mwn", "w1")

    @property
    def reported(self) -> str:
        """The level whose classifier the run reports ("after"): a re-trained head, else W2, else W1."""
        return next(n for n in ("crt", "w2", "w1") if n in self.levels)

    @property
    def retrains(self) -> str:
        """The classifier whose encoder a re-trained head (cRT) reads: the one the mode reports without it."""
        return next(n for n in ("w2", "w1") if n in self.levels)

    @property
    def draws_generated(self) -> bool:
        """W2 draws generated images as it trains, weighted by b_m (their budget and keep form apply)."""
        return "w2" in self.levels and self.kind("w2") == "w2"

    @property
    def single_classifier(self) -> bool:
        """One classifier (W1) and nothing else: what Meta-Weight-Net's weighting applies to."""
        return set(self.levels) == {"w1"}


BUILT_IN = (
    Mode(
        name="end2end",
        description="the method: W1, H, G, W2 and A as one MLO with hypergradients along five paths",
        # H first and W2 waiting only for W1: W1/H/W2 step every iteration, G and A every meta_every
        levels=("disc", "w1", "gen", "w2", "meta"),
        phases=("gan_pretrain", "joint"),
        u2l={"meta": ("w1", "w2", "gen", "disc")},
        l2u={"w1": ("meta", "w2"), "disc": ("gen",), "gen": ("w2",), "w2": ("meta",)},
        ready_on={"w2": ("w1",)},
        every_meta=("disc", "w2"),
        generates=True,
    ),
    Mode(
        name="sequential",
        description="W1 trained first; then the GAN; then p(s) frozen from W1's validation loss, M images "
                    "generated once, and W2 trained on real plus generated images",
        levels=("w1", "disc", "gen", "w2"),
        phases=("w1", "gan_pretrain", "gan", "w2_pregenerated"),
        kinds={"w2": "w2_pregenerated"},
        l2u={"disc": ("gen",)},
        every_meta=("disc",),
        generates=True,
        options=("train.w2_init",),
    ),
    Mode(
        name="sequential_real",
        description="analysis, not a method: sequential with a perfect generator; W2's extra images, as many a "
                    "class as sequential generates, are real images of the class's pool that no split uses",
        levels=("w1", "w2"),
        phases=("w1", "w2_spare_pool"),
        kinds={"w2": "w2_pregenerated"},
        generates=True,
        spare_pool=True,
        options=("train.w2_init",),
    ),
    Mode(
        name="separate",
        description="the GAN trained first and frozen; W1, W2 and A as an MLO reading the frozen generator",
        levels=("disc", "w1", "gen", "w2", "meta"),
        phases=("gan_pretrain", "gan", "mlo_frozen_gan"),
        u2l={"meta": ("w1", "w2")},
        l2u={"w1": ("meta", "w2"), "disc": ("gen",), "w2": ("meta",)},
        ready_on={"w2": ("w1",)},
        every_meta=("disc", "w2"),
        generates=True,
    ),
    Mode(
        name="mtl",
        description="multi-task: G trained on its GAN loss plus W2's loss on its images, W2 on real plus "
                    "generated images, first order (no meta level, no hypergradients)",
        levels=("disc", "w1", "gen", "w2"),
        phases=("gan_pretrain", "joint"),
        kinds={"gen": "gen_mtl"},
        l2u={"disc": ("gen",), "w1": ("w2",), "gen": ("w2",)},
        ready_on={"w2": ("w1",)},
        every_meta=("disc",),
        generates=True,
        options=("train.mtl_weight",),
    ),
    Mode(
        name="vanilla",
        description="one classifier on the long-tailed training set, no generation",
        levels=("w1",),
        phases=("joint",),
    ),
    Mode(
        name="vanilla_meta",
        description="vanilla with A: the classifier's encoder on the long-tailed training set, its head A "
                    "learned on the validation set through the hypergradient; no generation",
        levels=("w1", "meta"),
        phases=("joint",),
        u2l={"meta": ("w1",)},
        l2u={"w1": ("meta",)},
        every_meta=("w1",),
    ),
    Mode(
        name="adversarial",
        description="worst-case generation: min_G max_{D,C} lambda (E_real D - E_gen D) - E_gen loss(C(x), y); "
                    "the classifier C (w2) trains on real plus generated images",
        # C and D step every iteration, then G against both: one edge per pair, no hypergradients
        levels=("w2", "disc", "gen"),
        phases=("joint",),
        kinds={"w2": "adversarial_classifier", "disc": "adversarial_critic", "gen": "adversarial_generator"},
        l2u={"w2": ("gen",), "disc": ("gen",)},
        options=("train.adversarial_form", "train.adversarial_lambda"),
    ),
)
for _mode in BUILT_IN:
    register_mode(_mode)


# kinds of W2 whose loss takes the DeCov penalty of its features of the images it generates as it trains
DECOV_KINDS = ("w2", "adversarial_classifier")


def resolve_mode(cfg) -> Mode:
    """The mode the config asks for, after refusing settings that would silently do nothing in it."""
    t, m = cfg.train, cfg.model
    mode = get_mode(t.mode)
    refuse_options_of_other_modes(cfg, mode)
    if t.loss == "mwn":
        if not mode.single_classifier:
            raise ConfigError(f"train.loss=mwn is Meta-Weight-Net, which weighs the samples of a mode's one classifier "
                              f"(vanilla); train.mode={t.mode} has more levels; use another loss here")
        mode = mode.with_meta_weight_net()
    for key, posthoc in (("posthoc_tau", "logit_adjust"), ("crt_epochs", "crt")):
        if getattr(t, key) != getattr(type(t)(), key) and t.posthoc != posthoc:
            raise ConfigError(f"train.{key} applies to train.posthoc={posthoc} only; drop it")
    if cfg.run.compile != "none" and t.hypergradient == "exact" and mode.u2l:
        raise ConfigError(f"run.compile={cfg.run.compile}: train.hypergradient=exact differentiates the levels' "
                          f"steps twice, which torch.compile does not support; use train.hypergradient=darts or "
                          f"run.compile=none")
    for key in ("keep_weights", "gen_budget"):
        if getattr(t, key) != getattr(type(t)(), key) and not mode.draws_generated:
            raise ConfigError(f"train.{key}={getattr(t, key)} weighs the images W2 draws as it trains, which "
                              f"train.mode={t.mode} does not do (sequential trains on M p_c images generated once, "
                              f"at weight 1); drop it")
    if m.meta == "none" and "meta" in mode.levels:
        mode = mode.without("meta")
    if not mode.generates and t.allocator != "needs":
        raise ConfigError(f"train.allocator={t.allocator} has no effect in train.mode={t.mode}, which generates "
                          f"nothing; drop it or choose a generating mode")
    if t.class_prior != type(t)().class_prior and not (mode.generates or
                                                      any(mode.kind(n) in DECOV_KINDS for n in mode.levels)):
        raise ConfigError(f"train.class_prior={t.class_prior} chooses whether generated images count in the class "
                          f"distribution, and train.mode={t.mode} trains on none; drop it")
    if t.alloc_discount != "none" and "w2_pregenerated" not in mode.phases:
        raise ConfigError(f"train.alloc_discount={t.alloc_discount} scales the split of the set sequential generates "
                          f"once, before W2 trains, which train.mode={t.mode} does not make; use train.mode=sequential "
                          f"or drop it")
    if t.gen_filter != "none" and "w2_pregenerated" not in mode.phases:
        raise ConfigError(f"train.gen_filter={t.gen_filter} filters the set sequential generates once, before W2 "
                          f"trains, which train.mode={t.mode} does not make; use train.mode=sequential or drop it")
    if t.allocator == "learned":
        if not mode.draws_generated:
            raise ConfigError(f"train.allocator=learned learns p(s) through W2's training on images it draws as it "
                              f"trains, which train.mode={t.mode} does not do; use another allocator")
        mode = mode.with_upper("alloc", "w2")
    elif t.alloc_lr != type(t)().alloc_lr:
        raise ConfigError("train.alloc_lr applies to train.allocator=learned only; drop it")
    if "meta" not in mode.levels:
        for key, what in (("gamma", "weighs W1's loss in A's objective"), ("meta_weight_decay", "decays A"),
                          ("meta_data", "chooses A's data")):
            if getattr(t, key) != getattr(type(t)(), key):
                raise ConfigError(f"train.{key} {what}, but this run has no meta level (train.mode={t.mode}, "
                                  f"model.meta={m.meta}); drop it")
    if m.tie_encoders and len({"w2", "disc"} & set(mode.levels)) == 0:
        raise ConfigError(f"model.tie_encoders shares W1's encoder with W2 and H, which train.mode={t.mode} "
                          f"does not have; drop it")
    mode = with_gan_options(cfg, mode)
    return mode.with_retrained_head() if t.posthoc == "crt" else mode


def with_gan_options(cfg, mode: Mode) -> Mode:
    """The mode with the learned-truncation level ``trunc`` if asked for, after refusing GAN options
    that would do nothing in it."""
    g, t, defaults = cfg.gan, cfg.train, type(cfg.gan)()
    reducers = [f"gan.{k}" for k in ("topk_min_fraction", "coreset_factor", "lecam_weight", "real_batches")
                if getattr(g, k) != getattr(defaults, k)]
    if reducers and not {"disc", "gen"} <= set(mode.levels):
        raise ConfigError(f"{reducers[0]} acts on the GAN, which train.mode={t.mode} does not train; drop it")
    if t.decov_weight and not ("w2" in mode.levels and mode.kind("w2") in DECOV_KINDS):
        raise ConfigError(f"train.decov_weight acts on the features of the images W2 generates as it trains, "
                          f"which train.mode={t.mode} does not do; drop it")
    if g.truncation is not None and not mode.generates:
        raise ConfigError(f"gan.truncation truncates the latents of the images W2 trains on, and train.mode={t.mode} "
                          f"generates none; drop it")
    if not g.learn_truncation:
        return mode
    if mode.kind("w2") != "w2":
        raise ConfigError(f"gan.learn_truncation learns tau through W2's training on images it generates at tau as "
                          f"it trains, which train.mode={t.mode} does not do; use a fixed gan.truncation")
    return mode.with_upper("trunc", "w2")


def refuse_options_of_other_modes(cfg, mode: Mode) -> None:
    """A setting some mode declares as its own (``Mode.options``, a level's ``levels.<kind>`` settings) set in a
    run whose mode does not read it would do nothing: refused, naming the modes that read it."""
    modes = registered_modes()
    for key in sorted({k for other in modes for k in other.options} - set(mode.options)):
        if cfg.get(key) != cfg.default(key):
            users = " or ".join(other.name for other in modes if key in other.options)
            raise ConfigError(f"{key} applies to train.mode={users} only (this is {mode.name}); drop it")
    kinds = {mode.kind(level) for level in mode.levels}
    for kind, settings in cfg.levels.items():
        changed = [k for k in settings.__dataclass_fields__ if cfg.get(f"levels.{kind}.{k}") != cfg.default(f"levels.{kind}.{k}")]
        if changed and kind not in kinds:
            users = [other.name for other in modes if kind in {other.kind(level) for level in other.levels}]
            raise ConfigError(f"levels.{kind}.{changed[0]} sets a level of kind {kind}, which train.mode={mode.name} "
                              f"does not have" + (f" ({' and '.join(users)} do)" if users else "") + "; drop it")
