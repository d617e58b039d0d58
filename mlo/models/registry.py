"""Models by name, as timm does: ``@register_model("encoder")`` on a factory, ``create_model`` to build.

A *family* registers many models at once under a prefix: ``timm:<name>`` is any model timm knows.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from mlo.errors import ConfigError

_REGISTRY: dict[str, dict[str, Callable]] = {"encoder": {}, "gan": {}}


@dataclass(frozen=True)
class Family:
    """Models named ``<prefix>:<member>``, built by ``factory(member, **kwargs)``."""
    factory: Callable
    is_member: Callable[[str], bool]
    members: Callable[[], list[str]]


_FAMILIES: dict[str, dict[str, Family]] = {"encoder": {}, "gan": {}}


def register_model(kind: str, name: str | None = None):
    """Register a factory under ``kind`` ('encoder' or 'gan') and its function name (or ``name``)."""
    def wrap(fn: Callable) -> Callable:
        _REGISTRY[kind][name or fn.__name__] = fn
        return fn
    return wrap


def register_family(kind: str, prefix: str, *, is_member: Callable[[str], bool], members: Callable[[], list[str]]):
    """Register ``factory(member, **kwargs)`` for every name ``<prefix>:<member>`` with ``is_member(member)``."""
    def wrap(fn: Callable) -> Callable:
        _FAMILIES[kind][prefix] = Family(fn, is_member, members)
        return fn
    return wrap


def list_models(kind: str) -> list[str]:
    """Registered names, then one ``<prefix>:<name>`` pattern per family."""
    return sorted(_REGISTRY[kind]) + [f"{prefix}:<name>" for prefix in sorted(_FAMILIES[kind])]


def unknown_model(kind: str, name: str) -> str | None:
    """Why ``name`` is not a ``kind`` model, with a did-you-mean; None when it is one."""
    prefix, _, member = name.partition(":")
    if member and prefix in _FAMILIES[kind]:
        family = _FAMILIES[kind][prefix]
        if family.is_member(member):
            return None
        close = difflib.get_close_matches(member, family.members(), n=1)
        hint = f"did you mean '{prefix}:{close[0]}'?" if close else f"see the names {prefix} lists"
        return f"unknown {prefix} model '{member}' ({hint})"
    if name in _REGISTRY[kind]:
        return None
    close = difflib.get_close_matches(name, list(_REGISTRY[kind]), n=1)
    close += [f"{p}:{name}" for p, family in sorted(_FAMILIES[kind].items()) if family.is_member(name)]
    hint = f"did you mean '{close[-1]}'? " if close else ""
    return f"unknown {kind} '{name}' ({hint}choices: {', '.join(list_models(kind))})"


def create_model(kind: str, name: str, **kwargs):
    reason = unknown_model(kind, name)
    if reason:
        raise ConfigError(reason)
    prefix, _, member = name.partition(":")
    if member and prefix in _FAMILIES[kind]:
        return _FAMILIES[kind][prefix].factory(member, **kwargs)
    return _REGISTRY[kind][name](**kwargs)
