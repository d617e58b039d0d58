"""Models by name, as timm does: ``@register_model("encoder")`` on a factory, ``create_model`` to build."""
from __future__ import annotations

from typing import Callable

from mlo.errors import ConfigError

_REGISTRY: dict[str, dict[str, Callable]] = {"encoder": {}, "gan": {}}


def register_model(kind: str, name: str | None = None):
    """Register a factory under ``kind`` ('encoder' or 'gan') and its function name (or ``name``)."""
    def wrap(fn: Callable) -> Callable:
        _REGISTRY[kind][name or fn.__name__] = fn
        return fn
    return wrap


def list_models(kind: str) -> list[str]:
    return sorted(_REGISTRY[kind])


def create_model(kind: str, name: str, **kwargs):
    if name not in _REGISTRY[kind]:
        raise ConfigError(f"unknown {kind} '{name}' (registered: {', '.join(list_models(kind))})")
    return _REGISTRY[kind][name](**kwargs)
