"""Build Betty's Engine from problems and name-keyed edges, after checking names, paths and cadence.

Edges follow Betty: ``l2u[lower]`` lists the levels whose training loss reads ``lower``'s parameters
(so they depend on its solution, and step after it); ``u2l[upper]`` lists the levels whose training
loss reads ``upper``'s parameters, where its hypergradient paths end (``mlo.hypergradient``). Levels
that are never an ``l2u`` value are leaves, stepped every iteration; an upper level steps once all its
children (or those in its ``ready_on``) finished ``unroll_steps`` steps.
"""
from __future__ import annotations

import torch
from betty.configs import EngineConfig

from mlo.betty_compat import CompatEngine
from mlo.errors import ConfigError


class GraphError(ConfigError):
    """The level graph is malformed (a mode's definition, a user's level): one line naming the level."""


def validate_graph(names: list[str], u2l: dict[str, list[str]], l2u: dict[str, list[str]],
                   unroll: dict[str, int], ready_on: dict[str, list[str] | None],
                   attributes: dict[str, str] | None = None) -> None:
    """``attributes``: every attribute name of the problems and of the engine, with what has it, which a level's
    name must not shadow (Betty sets every level as an attribute of every other level and of the engine)."""
    attributes = attributes or {}
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise GraphError(f"level '{twice[0]}' is in the mode twice; level names must be unique")
    for name in names:
        if not name.isidentifier():
            raise GraphError(f"level name '{name}' is not a Python identifier (Betty sets each level as an attribute "
                             f"of the others by its name); rename it")
        if name in attributes:
            raise GraphError(f"level name '{name}' clashes with the attribute '{name}' of {attributes[name]} (Betty "
                             f"sets each level as an attribute of the others and of the engine by its name); rename it")
    for kind, edges in (("u2l", u2l), ("l2u", l2u)):
        for src, dsts in edges.items():
            for n in [src, *dsts]:
                if n not in names:
                    raise GraphError(f"{kind} edge {src} -> {dsts} names unknown level '{n}'")
            if src in dsts:
                raise GraphError(f"{kind} edge {src} -> {src} is a self-loop")
    _check_acyclic(names, l2u)
    for upper, lowers in u2l.items():
        for lower in lowers:
            if not _reaches(lower, upper, l2u):
                raise GraphError(f"u2l edge {upper} -> {lower} has no l2u path from {lower} back to {upper}")
    children = {n: [c for c, ups in l2u.items() if n in ups] for n in names}
    for name in names:
        if unroll.get(name, 1) < 1:
            raise GraphError(f"level '{name}': unroll_steps must be >= 1")
        for child in ready_on.get(name) or []:
            if child not in children[name]:
                raise GraphError(f"level '{name}' waits for '{child}', which is not one of its lower levels")


def _reaches(src: str, dst: str, l2u: dict[str, list[str]]) -> bool:
    stack, seen = [src], set()
    while stack:
        node = stack.pop()
        if node == dst:
            return True
        if node not in seen:
            seen.add(node)
            stack.extend(l2u.get(node, []))
    return False


def _check_acyclic(names: list[str], l2u: dict[str, list[str]]) -> None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 1:
            raise GraphError(f"l2u edges form a cycle: {' -> '.join(path + [node])} (Betty's path search "
                             f"would recurse forever; model mutual levels with one edge)")
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in l2u.get(node, []):
            visit(nxt, path + [node])
        state[node] = 2

    for n in names:
        visit(n, [])


def build_engine(problems: list, u2l: dict[str, list[str]], l2u: dict[str, list[str]], *,
                 device: torch.device | str = "cpu", strategy: str = "default") -> CompatEngine:
    """Validate and wire ``problems`` (listed in stepping order) into a Betty engine.

    The training loop is ``mlo.trainer``; the engine's own ``run`` is not used.
    """
    by_name = {p.name: p for p in problems}
    validate_graph(list(by_name), u2l, l2u,
                   unroll={p.name: p.config.unroll_steps for p in problems},
                   ready_on={p.name: getattr(p, "ready_on", None) for p in problems},
                   attributes={**{a: f"level '{p.name}' ({type(p).__name__})" for p in problems for a in dir(p)},
                               **{a: "Betty's Engine" for a in dir(CompatEngine)}})
    modules = [p.module for p in problems]
    for p in problems:
        p.graph_modules = modules
    dependencies = {
        "u2l": {by_name[k]: [by_name[v] for v in vs] for k, vs in u2l.items()},
        "l2u": {by_name[k]: [by_name[v] for v in vs] for k, vs in l2u.items()},
    }
    config = EngineConfig(train_iters=0, valid_step=1 << 30, strategy=strategy, logger_type="none")
    return CompatEngine(problems=problems, config=config, dependencies=dependencies, device=device)
