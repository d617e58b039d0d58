"""Several processes, one run: torchrun's environment and the few collectives the run needs.

``torchrun --nproc_per_node=N -m experiments.cli run ...`` starts N processes with ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` set; the engine (``mlo.betty_compat.CompatEngine``) joins them
in one process group. Every helper here is the identity in a single process, so callers need not ask.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import mlo.torch_version  # noqa: F401  (refuses a torch older than the project needs)
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.utils._pytree import tree_map


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes torchrun started (one process: rank 0 of 1)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_environ(cls) -> "Processes":
        env = os.environ
        return cls(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
                   world_size=int(env.get("WORLD_SIZE", 1)))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs, shows progress and writes the run directory."""
        return self.rank == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over processes, differentiable: its backward sums the incoming gradients over
    processes, which makes each process's gradient that of the sum of all processes' losses."""
    return funcol.wait_tensor(funcol.all_reduce(tensor, "sum", dist.group.WORLD)) if active() else tensor


def _all_reduce_(tensors: list[torch.Tensor], op) -> None:
    """Reduce each tensor over processes in place, in one collective per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=op)
        torch._foreach_copy_(group, [part.view_as(t) for t, part in zip(group, flat.split([t.numel() for t in group]))])


@torch.no_grad()
def sum_(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over processes, in place."""
    if active() and tensors:
        _all_reduce_(tensors, dist.ReduceOp.SUM)


@torch.no_grad()
def average_(tensors: list[torch.Tensor]) -> None:
    """Average each (floating-point) tensor over processes, in place."""
    if active() and tensors:
        _all_reduce_(tensors, dist.ReduceOp.SUM)
        torch._foreach_div_(tensors, dist.get_world_size())


@torch.no_grad()
def maximum_(tensors: list[torch.Tensor]) -> None:
    """The largest value over processes of each tensor, in place."""
    if active() and tensors:
        _all_reduce_(tensors, dist.ReduceOp.MAX)


@torch.no_grad()
def broadcast_(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values in every process's tensors."""
    if active():
        for t in tensors:
            dist.broadcast(t, src=0)


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` (any picklable object) on every process."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list | None:
    """Every process's ``obj`` in rank order on rank 0, None elsewhere; tensors travel via the CPU."""
    obj = tree_map(lambda t: t.detach().cpu() if torch.is_tensor(t) else t, obj)
    if not active():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def any_process(flag: torch.Tensor) -> bool:
    """Whether the boolean ``flag`` is true in any process; one host sync."""
    flag = flag.detach().float().reshape(1)
    maximum_([flag])
    return bool(flag)
