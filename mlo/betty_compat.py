"""The adjustments Betty 0.2.1 needs on current torch, for mixed precision, for several processes
and for a loop without host syncs, in one place.

Mixed precision
    Betty wraps ``training_step`` in ``torch.cuda.amp.autocast`` (deprecated, and silently fp32 on
    the CPU) and builds ``torch.cuda.amp.GradScaler`` (asserting CUDA). Here autocast is
    ``torch.autocast(device_type=...)`` and fp16's scaler is ``torch.amp.GradScaler``. Only the
    own steps of levels without hypergradient paths (W1, H, G, W2) run under autocast; everything
    a hypergradient is built from runs in fp32 (``hop_precision``): the hops, because a hop is a
    finite difference of two gradients taken ``darts_alpha`` apart in parameter norm, far below
    bf16's resolution (8 bits of mantissa), so in bf16 it measures rounding (cosine to the exact
    gradient 0.1-0.5 on the test networks); and the own step of a level with paths (A), whose
    gradient is the vector the hops multiply (in bf16: cosine 0.9987 at a first meta step). A's
    step comes every ``meta_every`` iterations, next to its fp32 hops.
    fp16's loss scale does not reach the hypergradient: Betty scales the upper level's loss, so
    its direct gradient and the vector entering the first hop carry the scale S; each hop is linear
    in its input vector (``darts``: the step ``darts_alpha/‖v‖`` makes the perturbation independent
    of S and the quotient carries S), so everything lands in the upper level's gradient times S,
    which its own scaler unscales before the step (checked on the CPU with a real GradScaler).

Several processes (torchrun)
    Betty's ``distributed`` strategy is CUDA-only as written (``rank % torch.cuda.device_count()``,
    ``torch.cuda.set_device``, nccl) and patches only torch DataLoaders. Here the process group
    comes from torchrun's environment, with gloo on the CPU and nccl on CUDA, on ``cpu`` or
    ``cuda:LOCAL_RANK``; our loaders shard their batches themselves (``mlo.data.loaders``).
    Gradients are averaged over processes explicitly, once per level step, not by DDP's reducer:
    the reducer only sees gradients that ``backward`` accumulates during one forward–backward per
    module, but here a level's gradient also comes from ``autograd.grad`` (an upper level's direct
    gradient, the ``exact`` hops, which would never be averaged), modules run forward many times per
    iteration inside other levels' steps and hops, and tied encoders are parameters of three levels
    (DDP stops with "Expected to mark a variable ready only once"). Each hypergradient hop
    (``mlo.hypergradient``) also averages its input vector first, so that with equal shares of every
    batch a step of N processes computes what one process computes on the concatenated batches (up
    to batch statistics such as BatchNorm's).

Host syncs
    Betty's ``get_loss`` reads the loss with ``.item()`` every step; here the loss dict holds a
    detached tensor. ``step_unless`` skips an update on the device (the ``found_inf`` protocol of
    fused optimizers, as GradScaler uses it), so a non-finite step needs no host sync either.

Logging
    Betty logs problem wiring at INFO on stdout; it is lowered to WARNING so a run's own progress
    output stays readable.
"""
from __future__ import annotations

import atexit
import logging

import mlo.torch_version  # noqa: F401  (refuses a torch older than the project needs, before Betty loads)
import torch
import torch.distributed as dist
from betty.engine import Engine
from betty.logging.logger_base import get_logger
from betty.problems import ImplicitProblem
from betty.utils import get_dtype

from mlo.distributed import Processes, average_, broadcast_

get_logger().setLevel(logging.WARNING)  # Betty sets INFO when it first creates its logger


def device_type(device) -> str:
    return torch.device(device).type


def autocast(device, precision: str):
    """Autocast to bf16/fp16 on any device type; for fp32, autocast switched off (also inside an
    autocast region)."""
    if precision == "fp32":
        return torch.autocast(device_type=device_type(device), enabled=False)
    return torch.autocast(device_type=device_type(device), dtype=get_dtype(precision))


def compile_modules(problems, backend: str) -> None:
    """``torch.compile`` each level's network in place (its state_dict keys stay the same).

    AOTAutograd donates saved buffers to the backward, which then refuses ``retain_graph``; Betty
    keeps graphs for the hops (``retain_graph=True`` on upper levels), so donation is switched off.
    """
    torch._functorch.config.donated_buffer = False
    for problem in problems:
        problem.module.compile(backend=backend)


def check_compiler(device, backend: str) -> str | None:
    """Why ``backend`` cannot compile on ``device`` (None if it can): inductor's CPU kernels are C++."""
    if backend != "inductor" or device_type(device) != "cpu":
        return None
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # a torch without this helper: let torch.compile say what it needs
        return None
    try:
        get_cpp_compiler()
    except Exception as exc:  # inductor's own search for a C++ compiler, whatever it raises
        return f"inductor needs a C++ compiler on the CPU (g++ or clang++) and found none ({exc})"
    return None


class CompatProblem(ImplicitProblem):
    """``ImplicitProblem`` with device-generic mixed precision, several processes and no host sync
    per step."""

    hop_precision = "fp32"  # of the hops and the own steps of levels with paths (evaluation_precision)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._own_step = False  # inside this level's own step (get_loss), not a hop of an upper level

    def initialize(self):
        precision = self.precision
        self.precision = "fp32" if precision == "fp16" else precision  # keep Betty's CUDA-only scaler out
        try:
            super().initialize()
        finally:
            self.precision = precision
        if precision == "fp16":
            self.scaler = torch.amp.GradScaler(device_type(self.device), init_scale=self.initial_dynamic_scale,
                                               growth_factor=self.scale_factor)

    def training_step_exec(self, batch):
        with autocast(self.device, self.evaluation_precision()):
            return self.training_step(batch)

    def evaluation_precision(self) -> str:
        """``precision`` for the own steps of a level without hypergradient paths; ``hop_precision``
        for every evaluation a hypergradient is built from: the hops, and the own step of a level
        with paths, whose gradient is the vector the hops multiply."""
        return self.precision if self._own_step and not self.paths else self.hop_precision

    def get_loss(self, batch):
        """Betty's ``get_loss`` without its ``.item()``: ``loss_dict["loss"]`` is a detached tensor."""
        previous, self._own_step = self._own_step, True
        try:
            out = self.training_step_exec(batch)
        finally:
            self._own_step = previous
        loss = out["loss"] if isinstance(out, dict) else out
        loss_dict = {**(out if isinstance(out, dict) else {}), "loss": loss.detach()}
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        return loss / self.gas, loss_dict

    # ----- several processes --------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self._strategy == "distributed"

    @property
    def world_size(self) -> int:
        """The processes training this level together (1 outside torchrun; Betty says 0)."""
        return self._world_size if self.distributed else 1

    def patch_module(self):
        if not self.distributed:
            return super().patch_module()
        # no DDP wrapper: gradients are averaged in average_gradients (see the module doc)
        self.module.to(self.device)
        broadcast_(list(self.module.parameters()) + list(self.module.buffers()))

    def patch_data_loader(self, loader):
        # Betty rebuilds torch DataLoaders with a distributed sampler; the loaders here shard themselves
        if isinstance(loader, torch.utils.data.DataLoader):
            return super().patch_data_loader(loader)
        return loader

    def average_gradients(self, flags: list[torch.Tensor] = ()) -> None:
        """Average this level's gradients, and float ``flags`` along with them, over processes (one
        collective; nothing in one process). Parameters without a gradient take part as zeros and
        keep none."""
        if self.distributed:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable_parameters()]
            average_(grads + list(flags))

    # ----- steps without host syncs -------------------------------------------------------------
    def step_unless(self, skip: torch.Tensor) -> None:
        """Betty's optimizer step, skipped where ``skip`` (a boolean tensor on the device) is true.

        Fused optimizers (``fused=True`` Adam, AdamW, SGD) skip on the device through ``found_inf``,
        the protocol GradScaler uses with them; other optimizers cost one host sync here. With fp16,
        the GradScaler already skips steps whose gradients are not finite."""
        betty_step = ImplicitProblem.optimizer_step  # a subclass's optimizer_step may be what calls this
        if self.scaler is not None:
            return betty_step(self)
        if not getattr(self.optimizer, "_step_supports_amp_scaling", False):
            if not bool(skip):
                betty_step(self)
            return
        self.optimizer.found_inf = skip.float()
        try:
            betty_step(self)
        finally:
            del self.optimizer.found_inf


class CompatEngine(Engine):
    """Betty's Engine on an explicit device, in one process or in the processes torchrun started
    (``strategy="distributed"``)."""

    def __init__(self, problems, config=None, dependencies=None, device="cpu"):
        self._requested_device = torch.device(device)
        super().__init__(problems, config=config, dependencies=dependencies)

    def configure_systems(self):
        if self._strategy in ("zero", "fsdp", "accelerate"):
            raise ValueError(f"strategy '{self._strategy}' is not supported here; use 'distributed'")
        if self._strategy != "distributed":
            dist_dict = super().configure_systems()
            self.device = self._requested_device
            return dist_dict
        self.device = self._requested_device
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if on_cuda else "gloo", device_id=self.device if on_cuda else None)
            # A process that exits with the group still up can abort in gloo's threads during interpreter
            # teardown ("terminate called without an active exception"); leave it while Python is alive.
            atexit.register(leave_process_group)
        self._backend = dist.get_backend()
        self._world_size, self._rank = dist.get_world_size(), dist.get_rank()
        self._local_rank = Processes.from_environ().local_rank
        return {"strategy": self._strategy, "backend": self._backend, "world_size": self._world_size,
                "rank": self._rank, "local_rank": self._local_rank}

    def cleanup(self):
        """Leave the process group (Betty's own cleanup would fail on a group already left)."""
        leave_process_group()


def leave_process_group() -> None:
    """Destroy the process group if this process is still in one: ``CompatEngine.cleanup``, and at exit for a
    process that never cleaned up."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
