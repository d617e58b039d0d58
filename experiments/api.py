"""The public API for levels and modes of your own, the one the built-in ones register through.

    from experiments.api import BuildContext, Mode, get_mode, register_level, register_mode, setting

- ``register_level(kind, settings=None)``: decorates ``builder(ctx: BuildContext, name: str) -> LevelProblem``;
  ``settings``, a dataclass of ``setting(default, help, min=, max=, choices=)`` fields, is the config section
  ``levels.<kind>`` (``ctx.settings(kind)`` in the builder).
- ``register_mode(mode)``: a ``Mode``, most often a registered one changed: ``get_mode("vanilla").with_upper(
  "cw", "w1", every=1).named("class_weights", "...")``.
- ``BuildContext``: what a builder reads: ``cfg``, ``data``, ``mode``, ``device``, ``num_classes``, ``levels``
  (the problems built before it), ``common(name)`` (what every ``LevelProblem`` takes), ``level_config(name,
  retain_graph=)`` (Betty's config of the level), ``train_loader(stream)`` / ``val_loader(stream)`` /
  ``class_balanced_batches(stream, size)`` (loaders whose seeds derive from the stream's name), ``seed(stream)``,
  ``settings(kind)``, and the builders of the built-in modules (``classifier(name)``, ``classifier_optimizer``,
  ``classifier_scheduler``, ``meta_module``, ``gan``).
- A level is a ``problems.LevelProblem`` subclass whose heart is ``training_step(batch)``; it reads other
  levels as attributes by name (``self.w1``), draws its noise in ``prepare_batch`` from ``self.noise``, and
  ``record(key, tensor)`` logs a statistic (a vector's per-epoch mean goes to level_log.csv and metrics.json).
  An upper level of a classifier that defines ``weigh(lower, batch, losses)`` weighs that classifier's
  per-sample training losses (``ClassifierProblem.weighed``).

Load a plugin with ``run.plugins=path/to/file.py`` (or a module name); it is saved in the run's config.yaml,
so every command that reads the run directory imports it again.
"""
from __future__ import annotations

from experiments.modes import Mode
from experiments.registry import get_mode, register_level, register_mode, registered_modes
from mlo.config import setting

__all__ = ["BuildContext", "Mode", "get_mode", "register_level", "register_mode", "registered_modes", "setting"]


def __getattr__(name: str):
    if name == "BuildContext":  # imports torch: only when asked for
        from experiments.levels import BuildContext
        return BuildContext
    raise AttributeError(f"module 'experiments.api' has no attribute '{name}'")
