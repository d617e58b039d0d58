"""One process of a torchrun test (tests/test_distributed.py): the real ``needsgen`` command line,
watched from the outside.

    torchrun --standalone --nproc_per_node=N tests/torchrun_worker.py DEBUG_DIR needsgen-args...

Each process writes ``DEBUG_DIR/rank<r>.pt``: every allocation p(s) it computed (own steps and
hops, in order), its levels' parameters at the end, and which of the run's writers it called; with
``gradients`` in place of the needsgen arguments, the gradients of ``gradients()`` below; with
``exit-without-closing``, whether the process group was left before the interpreter's teardown.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import experiments.runner as runner
from experiments.cli import main
from mlo.distributed import Processes
from problems import RefinedClassifierProblem

debug_dir, argv = Path(sys.argv[1]), sys.argv[2:]
seen = {"allocations": [], "params": {}, "writes": []}


def gradients() -> dict:
    """``gradients`` instead of needsgen arguments: on smooth networks (no batch statistics), the gradient
    of a fixed function of p(s) with respect to W1 (p from every process's share of the validation batch),
    and A's gradient at the first meta step of vanilla_meta (no noise), both as the optimizer sees them."""
    from mlo.distributed import average_
    from mlo.trainer import Phase, Trainer
    from tests.conftest import SMOOTH, tiny_config

    common = [*SMOOTH, "data.val_batch_size=20", "train.batch_size=16", "train.meta_every=2",
              "data.augment=none", "gan.diffaugment=none"]
    run = runner.Run(tiny_config(*common))
    w1, w2 = run.levels["w1"], run.levels["w2"]
    run.engine.train()
    batch = w2.get_batch()
    p, _ = w2.allocation(batch["x_val"], batch["y_val"], batch["idx_val"])
    weights = torch.linspace(-1.0, 1.0, len(p))
    grads = list(torch.autograd.grad((weights * torch.log(p)).sum(), w1.trainable_parameters()))
    average_(grads)  # what a level's step does with its processes' gradients
    out = {"p": p.detach(), "p_grad_w1": grads}
    run = runner.Run(tiny_config(*common, "train.mode=vanilla_meta"))
    meta, averaged = run.levels["meta"], []
    average = meta.average_gradients

    def capture(*args, **kwargs):
        average(*args, **kwargs)
        averaged.append([q.grad.detach().clone() for q in meta.trainable_parameters()])

    meta.average_gradients = capture
    Trainer(run.engine, [Phase("meta", 2)], progress=False).run()
    out["meta_grad"] = averaged[0]
    run.close()  # every process waits for the others, then leaves the process group, as the CLI does
    return out


def exit_without_closing() -> None:
    """``exit-without-closing`` instead of needsgen arguments: build a run (which joins the process group),
    take a collective, and exit without ``Run.close``. Registered before the run, the handler below runs
    after the engine's own exit handlers (atexit is last in, first out) and records whether the process
    group was still up then, while the interpreter was alive to leave it cleanly."""
    import atexit

    import torch.distributed as dist
    from mlo.distributed import barrier
    from tests.conftest import SMOOTH, tiny_config

    rank = Processes.from_environ().rank
    atexit.register(lambda: torch.save({"group_left": not dist.is_initialized()}, debug_dir / f"rank{rank}.pt"))
    runner.Run(tiny_config(*SMOOTH))
    barrier()


if argv[:1] == ["gradients"]:
    torch.save(gradients(), debug_dir / f"rank{Processes.from_environ().rank}.pt")
    sys.exit(0)
if argv[:1] == ["exit-without-closing"]:
    exit_without_closing()
    sys.exit(0)


def watch_allocation(original):
    def allocation(self, x_val, y_val, idx_val):
        p, stats = original(self, x_val, y_val, idx_val)
        seen["allocations"].append(p.detach().clone())
        return p, stats
    return allocation


def watch_writer(name, original):
    def writer(*args, **kwargs):
        seen["writes"].append(name)
        return original(*args, **kwargs)
    return writer


def watch_execute(original):
    def execute(self, *args, **kwargs):
        try:
            return original(self, *args, **kwargs)
        finally:
            seen["params"] = {name: [p.detach().clone() for p in level.module.parameters()]
                              for name, level in self.levels.items()}
    return execute


RefinedClassifierProblem.allocation = watch_allocation(RefinedClassifierProblem.allocation)
runner.Run.execute = watch_execute(runner.Run.execute)
runner.Run.write_outputs = watch_writer("write_outputs", runner.Run.write_outputs)
for name in ("prepare_run_dir", "atomic_write", "save_checkpoint"):
    setattr(runner, name, watch_writer(name, getattr(runner, name)))

code = main(argv)
torch.save(seen, debug_dir / f"rank{Processes.from_environ().rank}.pt")
sys.exit(code)
