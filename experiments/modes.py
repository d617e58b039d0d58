"""Modes are data: which levels exist, how they are wired, and which phases train them.

The levels are built by name in ``experiments.levels``; ``mlo.graph`` turns the edges into a Betty
engine; ``mlo.trainer`` runs the phases. Adding a mode is adding an entry here.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from mlo.errors import ConfigError


@dataclass(frozen=True)
class Mode:
    name: str
    description: str
    levels: tuple[str, ...]                                   # stepping order of the leaves
    u2l: dict[str, tuple[str, ...]] = field(default_factory=dict)
    l2u: dict[str, tuple[str, ...]] = field(default_factory=dict)
    ready_on: dict[str, tuple[str, ...]] = field(default_factory=dict)
    every_meta: tuple[str, ...] = ()    # levels unrolled ``meta_every`` steps before their uppers step
    pretrain_gan: bool = False          # a discriminator/generator phase before the main phase
    generates: bool = False             # W2 trains on generated images (reports the allocation)

    def without(self, level: str) -> "Mode":
        """The same mode with ``level`` and every edge touching it removed (e.g. ``model.meta=none``)."""
        def prune(edges):
            out = {k: tuple(v for v in vs if v != level) for k, vs in edges.items() if k != level}
            return {k: vs for k, vs in out.items() if vs}
        return replace(self, levels=tuple(n for n in self.levels if n != level), u2l=prune(self.u2l),
                       l2u=prune(self.l2u), ready_on=prune(self.ready_on),
                       every_meta=tuple(n for n in self.every_meta if n != level))


MODES: dict[str, Mode] = {
    "end2end": Mode(
        name="end2end",
        description="the method: W1, H, G, W2 and A as one MLO with finite-difference hypergradients",
        # H first and W2 waiting only for W1: W1/H/W2 step every iteration, G and A every meta_every
        levels=("disc", "w1", "gen", "w2", "meta"),
        u2l={"meta": ("w1", "w2", "gen", "disc")},
        l2u={"w1": ("meta", "w2"), "disc": ("gen",), "gen": ("w2",), "w2": ("meta",)},
        ready_on={"w2": ("w1",)},
        every_meta=("disc", "w2"),
        pretrain_gan=True,
        generates=True,
    ),
    "vanilla": Mode(
        name="vanilla",
        description="one classifier on the long-tailed training set, no generation",
        levels=("w1",),
    ),
}


def resolve_mode(cfg) -> Mode:
    """The mode the config asks for, after refusing settings that would silently do nothing in it."""
    t, m = cfg.train, cfg.model
    if t.mode not in MODES:
        raise ConfigError(f"train.mode: unknown value '{t.mode}' (choices: {', '.join(MODES)})")
    mode = MODES[t.mode]
    if m.meta == "none" and "meta" in mode.levels:
        mode = mode.without("meta")
    if not mode.generates and t.allocator != "needs":
        raise ConfigError(f"train.allocator={t.allocator} has no effect in train.mode={t.mode}, which generates "
                          f"nothing; drop it or choose a generating mode")
    if "meta" not in mode.levels and t.gamma != 1.0:
        raise ConfigError(f"train.gamma weighs W1's loss in A's objective, but this run has no meta level "
                          f"(train.mode={t.mode}, model.meta={m.meta}); drop it")
    if m.tie_encoders and len({"w2", "disc"} & set(mode.levels)) == 0:
        raise ConfigError(f"model.tie_encoders shares W1's encoder with W2 and H, which train.mode={t.mode} "
                          f"does not have; drop it")
    return mode
