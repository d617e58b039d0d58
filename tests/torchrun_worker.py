"""One process of a torchrun test (tests/test_distributed.py): the real ``needsgen`` command line,
watched from the outside.

    torchrun --standalone --nproc_per_node=N tests/torchrun_worker.py DEBUG_DIR needsgen-args...

Each process writes ``DEBUG_DIR/rank<r>.pt``: every allocation p(s) it computed (own steps and
hops, in order), its levels' parameters at the end, and which of the run's writers it called.
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
