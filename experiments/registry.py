"""How levels and modes become known by name: the built-in ones and a user's own, through the same calls.

Nothing here imports torch, so the modes and the level settings that a plugin (``run.plugins``) registers
are known when a config is checked, before a network is built.

- ``register_level(kind, settings=None)``: decorates a builder ``builder(ctx, name) -> LevelProblem``, called
  for every level of that kind a mode has (``name`` is the level's name, ``ctx`` the ``BuildContext``). A
  ``settings`` dataclass (fields made with ``mlo.config.setting``) becomes the config section
  ``levels.<kind>`` (checked, listed by ``needsgen run --help``, saved in config.yaml), read by the builder as
  ``ctx.settings(kind)``.
- ``register_mode(mode)``: a ``Mode`` (``experiments.modes``), known by ``mode.name``.

A name registered twice is refused in one line that says who registered it first.
"""
from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from mlo.config import register_level_settings
from mlo.errors import ConfigError

if TYPE_CHECKING:
    from experiments.modes import Mode


@dataclass(frozen=True)
class LevelEntry:
    builder: Callable
    origin: str  # the module that registered it


_LEVELS: dict[str, LevelEntry] = {}
_MODES: dict[str, "Mode"] = {}
_MODE_ORIGINS: dict[str, str] = {}


def _origin(obj) -> str:
    return getattr(obj, "__module__", None) or "?"


def _builtins() -> None:
    """The built-in modes and levels register when their modules are imported (the levels' with torch)."""
    import experiments.modes  # noqa: F401


def register_level(kind: str, settings: type | None = None):
    """Register ``builder(ctx, name)`` for the levels of ``kind`` (and, with ``settings``, the config section
    ``levels.<kind>``)."""
    if not kind.isidentifier():
        raise ConfigError(f"register_level: '{kind}' is not a Python identifier (levels are attributes of each other)")

    def wrap(builder: Callable) -> Callable:
        if kind in _LEVELS:
            raise ConfigError(f"register_level: a level kind '{kind}' is registered already (by "
                              f"{_LEVELS[kind].origin}); choose another name for the one in {_origin(builder)}")
        if settings is not None:
            register_level_settings(kind, settings)
        _LEVELS[kind] = LevelEntry(builder, _origin(builder))
        return builder
    return wrap


def level_builder(kind: str, mode: str) -> Callable:
    """The builder of ``kind``; a kind nothing registered is refused naming the mode that lists it."""
    import experiments.levels  # noqa: F401  (the built-in levels)
    if kind not in _LEVELS:
        close = difflib.get_close_matches(kind, list(_LEVELS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"train.mode={mode} has a level of kind '{kind}', which no register_level names ({hint}"
                          f"registered: {', '.join(sorted(_LEVELS))}; a plugin's in run.plugins)")
    return _LEVELS[kind].builder


def register_mode(mode: "Mode") -> "Mode":
    """Make ``mode`` known as ``train.mode=<mode.name>`` (and in compare's --modes)."""
    origin = sys._getframe(1).f_globals.get("__name__", "?")
    if mode.name in _MODES:
        raise ConfigError(f"register_mode: a mode '{mode.name}' is registered already (by {_MODE_ORIGINS[mode.name]}); "
                          f"give the one in {origin} another name (Mode.named)")
    _MODES[mode.name] = mode
    _MODE_ORIGINS[mode.name] = origin
    return mode


def get_mode(name: str, key: str = "train.mode") -> "Mode":
    """The registered mode ``name``; an unknown one is refused in one line (``key``: the setting named)."""
    _builtins()
    if name not in _MODES:
        close = difflib.get_close_matches(name, list(_MODES), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"{key}: unknown mode '{name}' ({hint}modes: {', '.join(_MODES)}; a mode of your own is "
                          f"registered by a plugin in run.plugins)")
    return _MODES[name]


def registered_modes() -> list["Mode"]:
    _builtins()
    return list(_MODES.values())
