"""Build Betty's Engine from problems and name-keyed edges, after checking names, paths and cadence.

Edges follow Betty: ``u2l[upper]`` lists the lower levels whose parameters the upper level's
loss reads directly; ``l2u[lower]`` lists the upper levels that depend on the lower level's
solution. Levels that are never an ``l2u`` value are leaves, stepped every iteration; an upper
level steps once all its children (or those in its ``ready_on``) finished ``unroll_steps`` steps.
"""
from __future__ import annotations

import torch
from betty.configs import EngineConfig
from betty.problems import ImplicitProblem

from mlo.betty_compat import CompatEngine

# Betty sets every level as an attribute of every other level and of the engine, by name.
_RESERVED = set(dir(ImplicitProblem)) | set(dir(CompatEngine)) | {
    "device", "cfg", "module", "optimizer", "scheduler", "train_data_loader", "train_data_iterator",
    "cur_batch", "epoch_counter", "env", "precision", "dtype", "scaler", "gas", "logger", "ready",
    "leaves", "problems", "dependencies", "config", "records", "noise", "seed", "ready_on",
    "graph_modules", "loss_fn", "pending_features", "total_steps", "ema", "allocator", "objective", "policy",
    "batch_size", "num_classes", "image_size", "lecam_anchors", "pending_scores", "topk", "decov_weight",
    "truncation", "gen_per_step", "lambda_gen", "adversarial_lambda",
}


class GraphError(ValueError):
    """The level graph is malformed (a bug in a mode definition or a user's level)."""


def validate_graph(names: list[str], u2l: dict[str, list[str]], l2u: dict[str, list[str]],
                   unroll: dict[str, int], ready_on: dict[str, list[str] | None]) -> None:
    if len(set(names)) != len(names):
        raise GraphError(f"level names must be unique: {names}")
    for name in names:
        if not name.isidentifier() or name in _RESERVED:
            raise GraphError(f"level name '{name}' clashes with a Betty attribute or is not an identifier")
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
                   ready_on={p.name: getattr(p, "ready_on", None) for p in problems})
    modules = [p.module for p in problems]
    for p in problems:
        p.graph_modules = modules
    dependencies = {
        "u2l": {by_name[k]: [by_name[v] for v in vs] for k, vs in u2l.items()},
        "l2u": {by_name[k]: [by_name[v] for v in vs] for k, vs in l2u.items()},
    }
    config = EngineConfig(train_iters=0, valid_step=1 << 30, strategy=strategy, logger_type="none")
    return CompatEngine(problems=problems, config=config, dependencies=dependencies, device=device)
