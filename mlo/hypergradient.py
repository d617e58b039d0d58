"""Hypergradient hop types beyond Betty's own, registered in Betty's table (``mlo.betty_compat.register_hop``).

A hop (curr, prev) turns a vector v on curr's parameters into ``−∂²L_curr/∂θ_prev∂θ_curr · v``
(identity inverse Hessian, as Betty's ``darts``). Betty's ``darts`` estimates it by central finite
differences with a step of ``darts_alpha`` in parameter norm; ``exact`` computes it by double
backward on the same batch. Finite differences see every ReLU/max-pool kink that the step
crosses, so on ReLU networks they measure a smoothed Hessian; ``exact`` is the almost-everywhere
Hessian that autograd defines, at the memory cost of one double-backward graph.
"""
from __future__ import annotations

import torch

from mlo.betty_compat import register_hop

HYPERGRADIENTS = ("darts", "exact")


def exact(vector, curr, prev, sync: bool):
    loss = curr.training_step_exec(curr.cur_batch)
    params = curr.meta_trainable_parameters()
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vector) if g is not None)
    prev_params = prev.trainable_parameters()
    if not torch.is_tensor(dot) or not dot.requires_grad:
        out = [torch.zeros_like(p) for p in prev_params]
    else:
        out = torch.autograd.grad(dot, prev_params, allow_unused=True)
        out = [-o if o is not None else torch.zeros_like(p) for o, p in zip(out, prev_params)]
    if sync:  # Betty's contract: on the last hop of a synchronised path, write into prev's grads
        prev.set_grads(prev_params, out)
        return None
    return out


register_hop("exact", exact)


def reference_gradient(problem) -> list[torch.Tensor]:
    """The gradient an upper level would get with ``exact`` hops on every path: its direct
    gradient plus, per path, the chain of exact hops. For measuring how close ``darts`` is."""
    loss = problem.training_step_exec(problem.cur_batch)
    params = problem.trainable_parameters()
    total = list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
    total = [g if g is not None else torch.zeros_like(p) for g, p in zip(total, params)]
    for path in problem.paths:
        first = path[1].meta_trainable_parameters()
        v = torch.autograd.grad(loss, first, retain_graph=True, allow_unused=True)
        v = [g if g is not None else torch.zeros_like(p) for g, p in zip(v, first)]
        for i in range(1, len(path) - 1):
            v = exact(v, path[i], path[i + 1], sync=False)
        total = [a + b for a, b in zip(total, v)]
    return total
