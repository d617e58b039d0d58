"""Hypergradients of an upper level: one reverse sweep over the level graph, every hop scaled by the
step size of the level it differentiates through (DESIGN.md §1.2 and §3.1).

Each lower level's solution is taken one step ahead, ``X' = X − η_X ∇_X L_X``, so the upper level U
sees X's dependence on a level Y that X's loss reads through ``∂X'/∂Y = −η_X ∂²L_X/∂X∂Y``. A *hop*
through X turns a vector g_X on X's parameters into ``−∂²L_X/∂Y∂X · (η_X ⊙ g_X)`` on every level Y
that X's loss reads. The gradient of U is its direct gradient plus, for every path Betty finds from
U down and back to U, the chain of hops along the path.

Betty evaluates the paths one by one: a level shared by several paths is perturbed once per path
and shared prefixes are recomputed (9 hops per meta step on the five-path end-to-end graph). Hops
are linear in their input, so the same sum is one reverse sweep over the levels, the way autograd
sweeps a graph of tensors:

1. one backward of U's loss gives U's direct gradient and g_X for every level X it reads;
2. the levels are visited so that each comes after every level whose loss reads it; at X, g_X is
   complete, and one hop through X (one finite-difference pair, or one double backward) gives the
   gradient with respect to every level X's loss reads at once; each part is added to that level's
   g (U's part to U's gradient).

So each level is perturbed once per meta step (4 hops on the end-to-end graph, not 9), and U's loss
is differentiated once (not once per path). ``path_gradients`` keeps the path-by-path sum as the
reference the tests and ``experiments/bench/hypergradient.py`` compare the sweep with.

Hop types (``Config.type`` of the level X a hop differentiates through, ``train.hypergradient``):
- ``exact``: a double backward, ``∂/∂Y (∇_X L_X · η⊙g)``, on X's last batch;
- ``darts``: the paper's central finite difference, X's weights at ``±ε·η⊙g`` with
  ``ε = darts_alpha / ‖η⊙g‖``, ``(∇_Y L_X(X−) − ∇_Y L_X(X+)) / 2ε``; the weights are restored exactly;
- ``first_order``: no hop (the direct gradient alone: the ablation that says what the hops are worth).

A hop evaluates X's ``training_step`` on ``X.cur_batch``: a pure function of the batch (``problems.base``)
that changes no statistics. Under several processes each hop first averages its input vector, so N
processes with equal shares of every batch compute what one computes on the whole batch.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mlo.distributed import active, average_

def _zeros_for_none(grads, params) -> list[torch.Tensor]:
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]


def _split(flat: list[torch.Tensor], levels) -> list[list[torch.Tensor]]:
    """``flat`` (parameters of ``levels`` concatenated) cut back into one list per level."""
    out, start = [], 0
    for level in levels:
        n = len(level.trainable_parameters())
        out.append(flat[start:start + n])
        start += n
    return out


def step_sizes(level) -> list[float]:
    """η of each of ``level``'s parameters: its optimizer group's current learning rate (after the
    scheduler), the step size of the one-step approximation ``X' = X − η ∇L``."""
    lr = {id(p): group["lr"] for group in level.optimizer.param_groups for p in group["params"]}
    return [lr[id(p)] for p in level.meta_trainable_parameters()]


def twice_differentiable():
    """Inside, attention runs on the math backend of ``scaled_dot_product_attention``: the fused kernels
    (flash and memory-efficient on CUDA, flash on the CPU) have no double backward, which exact hops and
    gradient penalties take through a ViT."""
    return sdpa_kernel([SDPBackend.MATH])


@contextmanager
def full_fp32():
    """Inside, fp32 is fp32 on a GPU too: cuDNN's convolutions (TF32 by default) and matmuls in IEEE fp32. A
    ``darts`` hop is a difference of gradients ``darts_alpha`` (1e-4) apart in parameter norm, below TF32's
    10-bit mantissa; an exact hop's double backward is kept at the precision of the reference it is tested
    against. On the CPU the flags change nothing."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision, torch.get_float32_matmul_precision()
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    torch.set_float32_matmul_precision("highest")  # what torch.set_float32_matmul_precision("high") set
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def exact_hop(level, vector: list[torch.Tensor], targets) -> list[list[torch.Tensor]]:
    """``−∂/∂θ_Y (∇_X L_X · vector)`` for every level Y in ``targets``, by double backward."""
    target_params = [p for t in targets for p in t.trainable_parameters()]
    params = level.meta_trainable_parameters()
    with twice_differentiable():
        loss = level.training_step_exec(level.cur_batch)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vector) if g is not None)
    if not torch.is_tensor(dot) or not dot.requires_grad:
        return _split([torch.zeros_like(p) for p in target_params], targets)
    out = torch.autograd.grad(dot, target_params, allow_unused=True)
    return _split([-o for o in _zeros_for_none(out, target_params)], targets)


@torch.no_grad()
def _shift(params, vector, scale: torch.Tensor) -> None:
    torch._foreach_add_(params, torch._foreach_mul(vector, scale))


def darts_hop(level, vector: list[torch.Tensor], targets) -> list[list[torch.Tensor]]:
    """The finite-difference estimate of ``exact_hop``: ``(∇_Y L_X(θ − εv) − ∇_Y L_X(θ + εv)) / 2ε``
    with ``ε = darts_alpha / ‖v‖`` (a step of ``darts_alpha`` in parameter norm); one pair of
    evaluations for all targets. No host sync: ε stays on the device."""
    target_params = [p for t in targets for p in t.trainable_parameters()]
    params = level.meta_trainable_parameters()
    norm = torch.stack(torch._foreach_norm(vector)).norm()
    eps = level.config.darts_alpha / norm.clamp(min=1e-30)
    saved = [p.detach().clone() for p in params]

    def gradient_at(scale):
        _shift(params, vector, scale)
        loss = level.training_step_exec(level.cur_batch)
        return _zeros_for_none(torch.autograd.grad(loss, target_params, allow_unused=True), target_params)

    plus = gradient_at(eps)
    minus = gradient_at(-2 * eps)
    with torch.no_grad():
        torch._foreach_copy_(params, saved)
    return _split(torch._foreach_div(torch._foreach_sub(minus, plus), 2 * eps), targets)


def first_order_hop(level, vector: list[torch.Tensor], targets) -> list[list[torch.Tensor]]:
    """No hop: the upper level ignores how ``level``'s solution depends on what its loss reads."""
    return [[torch.zeros_like(p) for p in t.trainable_parameters()] for t in targets]


HOPS = {"exact": exact_hop, "darts": darts_hop, "first_order": first_order_hop}


def hop(level, vector: list[torch.Tensor], targets, kind: str | None = None) -> list[list[torch.Tensor]]:
    """One hop through ``level`` (of its own type, or ``kind``): ``vector`` on its parameters, scaled
    by its step sizes, to a vector on the parameters of each level in ``targets``."""
    kind = kind or level.config.type
    if active():
        vector = [v.clone() for v in vector]
        average_(vector)
    scaled = [v * lr for v, lr in zip(vector, step_sizes(level))]
    with full_fp32():
        return HOPS[kind](level, scaled, targets)


@dataclass(frozen=True)
class SweepPlan:
    """The hops of one upper level, read off Betty's paths: the levels its loss reads (where the
    sweep starts), the lower levels in sweep order, and for each of them the levels a hop through
    it reaches (the upper level included)."""
    upper: object
    first: tuple
    order: tuple
    targets: dict

    @property
    def starts(self) -> tuple:
        """The levels the hops start from; none when every level below is first-order (no hop to make)."""
        return self.first if any(level.config.type != "first_order" for level in self.order) else ()

    @classmethod
    def from_paths(cls, upper) -> "SweepPlan":
        first, edges = [], []
        for path in upper.paths:  # [U, X1, ..., Xk, U]: U reads X1, X_i reads X_{i+1}, Xk reads U
            if path[1] not in first:
                first.append(path[1])
            for curr, prev in zip(path[1:-1], path[2:]):
                if (curr, prev) not in edges:
                    edges.append((curr, prev))
        levels = list(dict.fromkeys(level for edge in edges for level in edge if level is not upper))
        targets = {level.name: [prev for curr, prev in edges if curr is level] for level in levels}
        # a level comes after every level whose loss reads it (Kahn's order on the edges below U)
        readers = {level.name: {curr.name for curr, prev in edges if prev is level} for level in levels}
        order, done = [], set()
        while len(order) < len(levels):
            ready = [level for level in levels if level.name not in done and readers[level.name] <= done]
            order.append(ready[0])
            done.add(ready[0].name)
        return cls(upper, tuple(first), tuple(order), targets)


def gradients_in_chunks(upper, chunks) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``upper``'s loss over its batch cut in ``chunks`` (``loss_chunks``), and its gradient with respect to the
    sweep's inputs: the sum of each chunk's gradient of its share of the loss, one chunk's graph at a time. The
    value comes from the same forwards, so a chunked loss is evaluated once."""
    inputs = sweep_inputs(upper)
    value, total = None, None
    for share, batch in chunks:
        part = upper.training_step_exec(batch) * share
        value = part.detach() if value is None else value + part.detach()
        if upper.scaler is not None:
            part = upper.scaler.scale(part)
        grads = _zeros_for_none(torch.autograd.grad(part, inputs, allow_unused=True), inputs)
        total = grads if total is None else torch._foreach_add(total, grads)
    return value, total


def sweep_inputs(upper) -> list[torch.Tensor]:
    """What the sweep differentiates ``upper``'s loss by: its own parameters, then those of the levels the
    hops start from."""
    return upper.trainable_parameters() + [p for level in upper.sweep_plan.starts for p in level.trainable_parameters()]


def hypergradient(upper, loss: torch.Tensor) -> list[torch.Tensor]:
    """The gradient of ``upper``'s parameters: direct plus every path's hops, in one sweep."""
    plan = upper.sweep_plan
    params, first = upper.trainable_parameters(), plan.starts
    flat = upper.take_chunk_gradients()  # a loss in chunks was differentiated as it was evaluated
    if flat is None:
        inputs = sweep_inputs(upper)
        flat = _zeros_for_none(torch.autograd.grad(loss, inputs, allow_unused=True), inputs)
    total = flat[:len(params)]
    pending = {level.name: vector for level, vector in zip(first, _split(flat[len(params):], first))}
    for level in plan.order:
        vector = pending.pop(level.name, None)
        if not vector or level.config.type == "first_order":  # nothing reached it, or it has no weights of its own
            continue
        targets = plan.targets[level.name]
        for target, out in zip(targets, hop(level, vector, targets)):
            if target is upper:
                total = torch._foreach_add(total, out)
            elif target.name in pending:
                pending[target.name] = torch._foreach_add(pending[target.name], out)
            else:
                pending[target.name] = out
    return total


def path_gradients(upper, kind: str | None = None) -> dict[str, list[torch.Tensor]]:
    """The reference: ``upper``'s direct gradient (``"direct"``) and each path's contribution (keyed
    ``"meta>w2>gen>meta"``), computed path by path with hops of type ``kind`` (each level's own by
    default), on the levels' current weights and last batches."""
    loss = upper.training_step_exec(upper.cur_batch)
    params = upper.trainable_parameters()
    out = {"direct": _zeros_for_none(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params)}
    for path in upper.paths:
        first = path[1].trainable_parameters()
        vector = _zeros_for_none(torch.autograd.grad(loss, first, retain_graph=True, allow_unused=True), first)
        for curr, prev in zip(path[1:-1], path[2:]):
            vector = hop(curr, vector, [prev], kind=kind)[0]
        out[">".join(level.name for level in path)] = vector
    return out
