"""The deterministic problem base every level builds on.

Betty's finite-difference hypergradients re-run a lower level's ``training_step`` on its last batch
with perturbed weights. That is only correct if ``training_step`` is a pure function of the batch
and the parameters. This base makes it so:

1. ``get_batch`` asks the subclass for ``prepare_batch(data)``: every random draw (latents, class
   samples, Gumbel noise, augmentation choices) happens there, from the level's own seeded
   generator, and lands in the batch dict.
2. As a safety net for code that still draws inside ``training_step`` (dropout, a user's level),
   the step runs under a global RNG forked and seeded per batch, so a hop repeats the same draws.
3. Statistics (BN running stats, spectral-norm vectors) change only in their owner's own step:
   a level's step updates its module and its stream of A, never another level's (W2 reading W1
   on validation images must not move W1's BN statistics); an evaluation that is not a step (a
   hop, a reference check) changes none, and runs spectral norm without power iterations.

Tied encoders (``model.tie_encoders``): one level owns the shared encoder (W1, or the classifier where
a mode has no W1) and steps it, once per iteration, with one optimizer state. The levels that borrow it
(``borrows``: W2 and H) leave it out of their own parameters and optimizers; their own steps hand their
gradient of it to the owner (``lend``), which adds it to its own at its next step; and their forwards
never move its BN statistics, which thus come from the owner's real training images alone.

Numerical faults: a step whose loss or gradient is not finite is skipped and counted; the trainer
reports it and aborts after too many in a row. Without a host sync per step: the step is skipped
on the device (``CompatProblem.step_unless``) and its fault code waits on the device until the
trainer reads the codes of many steps at once. A level with hypergradient paths decides on the host
before its backward (its hops would add a non-finite vector to lower levels' weights; they sync
the host anyway). Under several processes every process skips and counts the same steps.

Several processes: each level draws its noise (latents, class samples, Gumbel noise, DiffAugment
choices, the per-batch seeds) from a generator of its own per process, so the processes' shares
of a batch are independent draws, as one process's batch of the same total size would be. What
must agree is computed, not drawn: the allocation p(s) (all-reduced validation losses), the
temperature, and the loaders' global batches and augmentation (``mlo.data.loaders``).

A subclass is small: ``prepare_batch`` and ``training_step``, sometimes ``forward``.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import cached_property
from typing import Any

import torch
import torch.nn as nn
from betty.configs import Config
from torch.nn.utils.parametrizations import _SpectralNorm

from mlo.betty_compat import CompatProblem
from mlo.hypergradient import SweepPlan, gradients_in_chunks, hypergradient
from mlo.data.loaders import derive_seed, stream_seed
from mlo.distributed import any_process


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


FAULT_KINDS = {1: "gradient", 2: "loss"}  # a step's fault code (0: a good step); the larger wins


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Whether all given tensors are finite, as a boolean tensor on their device (no host sync)."""
    return torch.stack(torch._foreach_norm(tensors)).isfinite().all()


def start_momentum(optimizer: torch.optim.Optimizer) -> None:
    """SGD's momentum buffers as zeros before the first step. Fused SGD allocates them, uninitialised, in
    its first step and writes them only if the step is taken: a first step skipped as non-finite
    (``found_inf``) leaves garbage that every later step reads. From zeros, the first step taken is the same
    (``μ·0 + g = g`` without dampening, the only form built here)."""
    if isinstance(optimizer, torch.optim.SGD):
        for group in optimizer.param_groups:
            if group["momentum"]:
                for p in group["params"]:
                    optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


def level_config(*, unroll_steps: int = 1, hypergradient: str = "exact", darts_alpha: float = 1e-4,
                 precision: str = "fp32", retain_graph: bool = False) -> Config:
    """Betty's problem config as every level here uses it; ``hypergradient`` is the hop type
    (``darts`` or ``exact``, see ``mlo.hypergradient``) used where this level is a lower level."""
    return Config(type=hypergradient, unroll_steps=unroll_steps, darts_alpha=darts_alpha, precision=precision,
                  retain_graph=retain_graph)


# layers whose forward in training mode updates their buffers: batch statistics, spectral norm's vectors
STATEFUL_LAYERS = (nn.modules.batchnorm._NormBase, _SpectralNorm)


def stateful_layers(modules: list[nn.Module], keep: list[nn.Module] = (), exclude: list[nn.Module] = ()
                    ) -> list[nn.Module]:
    """The layers of ``modules`` whose forward writes their buffers, except those inside ``keep`` and not
    inside ``exclude``."""
    kept = {id(m) for k in keep for m in k.modules()} - {id(m) for e in exclude for m in e.modules()}
    return list({id(m): m for module in modules for m in module.modules()
                 if id(m) not in kept and isinstance(m, STATEFUL_LAYERS)}.values())


@contextmanager
def frozen_layers(layers: list[nn.Module]):
    """Run forwards that leave the buffers (BN running stats, spectral-norm u/v) of ``layers`` unchanged.

    Each buffer is swapped for a scratch copy while inside and the original put back after, so
    nothing is modified in place (autograd saved the scratch copies, e.g. BN's running stats).
    """
    spectral = [m for m in layers if isinstance(m, _SpectralNorm)]
    saved_iters = [m.n_power_iterations for m in spectral]
    originals = [(m, name, b) for m in layers for name, b in m._buffers.items() if b is not None]
    for m, name, b in originals:
        m._buffers[name] = b.clone()
    for m in spectral:
        m.n_power_iterations = 0
    try:
        yield
    finally:
        for m, n in zip(spectral, saved_iters):
            m.n_power_iterations = n
        for m, name, b in originals:
            m._buffers[name] = b


def frozen_statistics(modules: list[nn.Module], keep: list[nn.Module] = (), exclude: list[nn.Module] = ()):
    """``frozen_layers`` of the stateful layers of ``modules`` (all but those inside ``keep`` and not inside
    ``exclude``): each buffer swapped is a copy per step and hop, so only the layers that write theirs."""
    return frozen_layers(stateful_layers(modules, keep, exclude))


@contextmanager
def forked_rng(seed: int, device):
    """The global RNGs of the CPU and of ``device`` seeded with ``seed`` inside, restored outside.

    Only those two: ``torch.manual_seed`` would also seed every other backend, and on a machine
    where CUDA is not initialised each such call queues a lazy call with its formatted stack —
    a millisecond and a leak per step."""
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


class LevelProblem(CompatProblem):
    """A Betty ``ImplicitProblem`` whose ``training_step`` is a pure function of ``cur_batch``."""

    def __init__(self, name: str, config: Config, module: nn.Module, optimizer, scheduler=None,
                 train_data_loader=None, *, seed: int = 0, ready_on: list[str] | None = None, every: int = 1,
                 borrows: nn.Module | None = None, lender: str | None = None):
        super().__init__(name, config, module=module, optimizer=optimizer, scheduler=scheduler,
                         train_data_loader=train_data_loader)
        self.seed = stream_seed(seed, name)  # the level's own noise: the stream named after it
        self.ready_on = ready_on        # step once these children are ready, not all of them
        self.every = every              # step only every this many times the children are ready
        self._times_ready = 0
        self.graph_modules: list[nn.Module] = [module]  # set by the graph builder: every module in the graph
        self.noise = None                # torch.Generator on the device, for prepare_batch
        self._batches_drawn = 0          # the per-batch RNG seed is derived from (seed, batches drawn)
        self._loss_finite = None         # of the current own step, a boolean tensor on the device
        self._skip_backward = False      # the current own step computes no gradient (levels with paths)
        self.records: dict[str, torch.Tensor] = {}
        self.consecutive_faults = 0
        self.fault_codes: list[tuple[int, torch.Tensor]] = []  # (global step, code) not yet read by the trainer
        self.borrows = borrows     # a module of another level's (a tied encoder) that this level reads
        self.lender = lender       # the name of that level, which steps it
        self.lent: dict[int, torch.Tensor] = {}  # (as a lender) borrowers' gradients of its weights, by id
        self.chunk_size: int | None = None  # a level with paths: images per forward-backward of its own loss
        self._chunk_gradients: list[torch.Tensor] | None = None  # of its loss in chunks, for the sweep
        self._frozen_layers: dict[tuple, list[nn.Module]] = {}  # by (own step?, graph): see layers_to_freeze

    # ----- randomness, drawn in get_batch -------------------------------------------------------
    def initialize(self):
        super().initialize()
        if self._world_size > 1 and self._rank > 0:  # rank 0 draws what a single process draws
            self.seed = derive_seed(self.seed, self._rank)
        self.noise = torch.Generator(device=self.device).manual_seed(self.seed)

    def prepare_batch(self, data) -> dict[str, Any]:
        """Turn loader output into the batch dict, drawing any noise from ``self.noise``."""
        x, y = data
        return {"x": x, "y": y}

    def get_batch(self) -> dict[str, Any]:
        data = super().get_batch() if self.train_data_loader is not None else None
        batch = self.prepare_batch(data)
        batch["rng_seed"] = derive_seed(self.seed, self._batches_drawn)
        self._batches_drawn += 1
        return batch

    # ----- pure evaluation ----------------------------------------------------------------------
    def training_step_exec(self, batch):
        with frozen_layers(self.layers_to_freeze()), forked_rng(batch["rng_seed"], self.device):
            return super().training_step_exec(batch)

    def layers_to_freeze(self) -> list[nn.Module]:
        """The graph's stateful layers this evaluation leaves alone: all of them in a hop, all but this level's
        own in its own step. Found once per kind and graph (a walk over every module of a ViT-B/16 graph costs
        about a millisecond, at every step, hop and chunk)."""
        key = (self._own_step, tuple(map(id, self.graph_modules)))
        if key not in self._frozen_layers:
            keep = self.owned_statistics() if self._own_step else []
            exclude = [self.borrows] if self.borrows is not None else []
            self._frozen_layers[key] = stateful_layers(self.graph_modules, keep, exclude)
        return self._frozen_layers[key]

    # ----- tied modules ---------------------------------------------------------------------------
    def trainable_parameters(self):
        """The module's parameters, less those of a borrowed module (its owner steps them)."""
        params = list(self.module.parameters())
        if self.borrows is None:
            return params
        borrowed = {id(p) for p in self.borrows.parameters()}
        return [p for p in params if id(p) not in borrowed]

    def lend(self, params, grads) -> None:
        """Take a borrower's gradient of some of this level's parameters, for this level's next step."""
        for p, g in zip(params, grads):
            if g is not None:
                self.lent[id(p)] = self.lent[id(p)] + g.detach() if id(p) in self.lent else g.detach()

    def patch_optimizer(self):
        if not self.trainable_parameters():
            self.optimizer = None  # nothing of its own to step (all it reads is borrowed or another level's)
            return
        super().patch_optimizer()
        start_momentum(self.optimizer)

    def patch_scheduler(self):
        if self.optimizer is None:
            self.scheduler = None
            return
        super().patch_scheduler()

    def owned_statistics(self) -> list[nn.Module]:
        """Modules whose statistics this level's own step updates: its module and its stream of A."""
        owned = [self.module]
        stream, meta = getattr(unwrap(self.module), "stream", None), self.shared_meta
        norms = getattr(unwrap(meta), "norms", None) if meta is not None else None  # a neck-form A's BN
        if stream is not None and norms is not None:
            owned.append(norms[stream])
        return owned

    def loss_chunks(self, batch: dict[str, Any]) -> list[tuple[float, dict[str, Any]]] | None:
        """The own step's ``batch`` cut into pieces of ``chunk_size`` images, each with its share of the batch, so
        that the shares' weighted sum of the pieces' mean losses is the batch's mean loss; None: one piece."""
        if not self.chunk_size:
            return None
        n = len(batch["y"])
        if n <= self.chunk_size:
            return None
        cut = lambda v, i: v[i:i + self.chunk_size] if torch.is_tensor(v) and v.dim() and len(v) == n else v  # noqa: E731
        return [(min(self.chunk_size, n - i) / n, {k: cut(v, i) for k, v in batch.items()})
                for i in range(0, n, self.chunk_size)]

    def get_loss(self, batch):
        self._own_step = True
        chunks = self.loss_chunks(batch) if self.paths else None
        self._chunk_gradients = None
        try:
            if chunks is None:
                loss, loss_dict = super().get_loss(batch)
            else:  # differentiated chunk by chunk as it is evaluated; the hypergradient takes those gradients
                loss, self._chunk_gradients = gradients_in_chunks(self, chunks)
                loss_dict = {"loss": loss}
            self._loss_finite = torch.isfinite(loss_dict["loss"])
            self.record("loss", torch.where(self._loss_finite, loss_dict["loss"], 0.0))
            self.record("steps", self._loss_finite.float())
        finally:
            self._own_step = False
        self._skip_backward = bool(self.paths) and any_process(~self._loss_finite)
        return loss, loss_dict

    # ----- gradients ----------------------------------------------------------------------------
    def backward(self, loss, params, paths, create_graph=False, retain_graph=True, allow_unused=True):
        """The direct gradient, plus for a level with paths the hypergradient of ``mlo.hypergradient``'s
        sweep (in place of Betty's path-by-path traversal)."""
        if self._skip_backward:
            return
        if not paths and self.borrows is None:
            return super().backward(loss, params, paths, create_graph=create_graph, retain_graph=retain_graph,
                                    allow_unused=allow_unused)
        if not paths:  # one backward for its own weights and the borrowed ones, which go to their owner
            borrowed = list(self.borrows.parameters())
            grads = torch.autograd.grad(loss, params + borrowed, allow_unused=True)
            self.set_grads(params, grads[:len(params)])
            getattr(self, self.lender).lend(borrowed, grads[len(params):])
            return
        self.set_grads(params, hypergradient(self, loss))

    def take_chunk_gradients(self) -> list[torch.Tensor] | None:
        """The sweep's first gradients of a loss evaluated in chunks (once: None after), else None."""
        grads, self._chunk_gradients = self._chunk_gradients, None
        return grads

    @cached_property
    def sweep_plan(self) -> SweepPlan:
        """The hops of this level's hypergradient, from the paths Betty found (set when the engine is built)."""
        return SweepPlan.from_paths(self)

    def optimizer_step(self, *args, **kwargs):
        loss_fault = (~self._loss_finite).float()
        if self._skip_backward or self.optimizer is None:  # no gradient, or nothing to step
            self.fault_codes.append((self._global_step, loss_fault.mul(2).long()))
            return
        for p in self.trainable_parameters():  # what borrowers lent since the last step
            lent = self.lent.pop(id(p), None)
            if lent is not None:
                p.grad = lent if p.grad is None else p.grad + lent
        self.average_gradients(flags=[loss_fault])  # from here on every process holds the same values
        code = torch.where(loss_fault > 0, 2, 0)
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        # with fp16 the GradScaler itself skips steps with inf gradients (normal while it calibrates)
        if self.scaler is None and grads:
            code = torch.where(all_finite(grads), code, code.clamp(min=1))
        self.fault_codes.append((self._global_step, code))
        self.step_unless(code > 0)

    def count_fault(self, code: int) -> str | None:
        """Take in the code of one step (in order): the kind of its fault, or None for a good step."""
        if code == 0:
            self.consecutive_faults = 0
            return None
        self.consecutive_faults += 1
        return FAULT_KINDS[code]

    def record(self, key: str, value: torch.Tensor) -> None:
        """Accumulate a statistic of the level's own steps (never of hops); no host sync."""
        if self._own_step:
            value = value.detach().float()
            self.records[key] = self.records[key] + value if key in self.records else value

    def pop_records(self) -> dict[str, torch.Tensor]:
        records, self.records = self.records, {}
        return records

    # ----- cadence and wiring -------------------------------------------------------------------
    def step_normal(self, global_step=None):
        self._global_step = global_step  # Betty sets it only for leaves; fault reports name the step
        if self.every > 1 and self.check_ready():
            self._times_ready += 1
            if self._times_ready % self.every:  # not this time: wait for the children's next readiness
                self.ready = [False] * len(self.ready)
                return
        super().step_normal(global_step=global_step)

    def check_ready(self):
        if self.ready_on is None:
            return super().check_ready()
        names = [c.name for c in self.children]
        return all(self.ready[names.index(n)] for n in self.ready_on)

    @property
    def shared_meta(self) -> nn.Module | None:
        """A, when the graph has a ``meta`` level (Betty sets levels as attributes)."""
        meta = getattr(self, "meta", None)
        return meta.module if meta is not None else None

    # ----- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() if self.optimizer is not None else {"module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.optimizer is not None:
            return super().load_state_dict(state)
        self.module.load_state_dict(state["module"])

    def level_state(self) -> dict[str, Any]:
        """Everything needed to resume the level: the state every process shares, and this
        process's own (``process_state``)."""
        state = self.state_dict()
        state.update({
            "count": self._count, "ready": list(self.ready), "inner_loop_start": self._inner_loop_start,
            "epoch_counter": list(self.epoch_counter or []),
            "loaders": [loader.state_dict() for loader in (self.train_data_loader or [])],
            "consecutive_faults": self.consecutive_faults, "times_ready": self._times_ready,
            **self.process_state(),
        })
        return state

    def process_state(self) -> dict[str, Any]:
        """The part of ``level_state`` that differs between processes."""
        return {
            "noise": self.noise.get_state(), "batches_drawn": self._batches_drawn,
            "records": dict(self.records),
            # hops of an upper level re-run this level on its last batch, possibly from an earlier iteration
            "cur_batch": self.cur_batch,
            # borrowers' gradients of its weights waiting for its next step (each process's own share)
            "lent": [self.lent.get(id(p)) for p in self.trainable_parameters()],
        }

    def load_level_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state)
        self._count, self.ready = state["count"], list(state["ready"])
        self._inner_loop_start = state["inner_loop_start"]
        if self.train_data_loader is not None:
            self.epoch_counter = list(state["epoch_counter"])
            for i, (loader, loader_state) in enumerate(zip(self.train_data_loader, state["loaders"])):
                loader.load_state_dict(loader_state)
                self.train_data_iterator[i] = iter(loader)
        self.noise.set_state(state["noise"].cpu())  # generator states are CPU byte tensors on any device
        self._batches_drawn = state["batches_drawn"]
        self.records = dict(state["records"])
        self.consecutive_faults = state["consecutive_faults"]
        self._times_ready = state.get("times_ready", 0)
        self.cur_batch = state["cur_batch"]
        lent = state.get("lent", ())  # absent from format-1 checkpoints, which only untied runs read
        self.lent = {id(p): g for p, g in zip(self.trainable_parameters(), lent) if g is not None}
