"""The one training loop: phases of Betty iterations, with progress, epoch callbacks and checkpoints.

A phase steps some leaves of the engine for a number of iterations (GAN pre-training steps only
the discriminator, whose updates trigger the generator; the MLO phase steps every leaf). Upper
levels step when Betty's readiness rules say so. The loop's position (phase, iteration) is part
of a checkpoint, so a run resumes where it stopped.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from tqdm import tqdm


@dataclass
class Phase:
    name: str
    iterations: int
    leaves: list[str] | None = None          # names of the levels stepped each iteration; None: the engine's leaves
    unroll: dict[str, int] = field(default_factory=dict)  # unroll_steps overrides during the phase
    epoch_length: int = 0                     # iterations per epoch (0: no epoch callback)


@contextmanager
def _unroll_overrides(engine, overrides: dict[str, int]):
    saved = {name: getattr(engine, name)._unroll_steps for name in overrides}
    for name, steps in overrides.items():
        getattr(engine, name)._unroll_steps = steps
    try:
        yield
    finally:
        for name, steps in saved.items():
            getattr(engine, name)._unroll_steps = steps


class Trainer:
    def __init__(self, engine, phases: list[Phase], *, progress: bool = True,
                 on_epoch_end: Callable[[Phase, int], dict] | None = None,
                 on_checkpoint: Callable[[], None] | None = None, checkpoint_every: int = 0,
                 should_stop: Callable[[], bool] = lambda: False):
        self.engine = engine
        self.phases = phases
        self.progress = progress
        self.on_epoch_end = on_epoch_end
        self.on_checkpoint = on_checkpoint
        self.checkpoint_every = checkpoint_every
        self.should_stop = should_stop
        self.phase_index = 0
        self.iteration = 0   # within the current phase
        self.phase_seconds: dict[str, float] = {}  # time spent stepping, per phase (no callbacks)

    @property
    def done(self) -> bool:
        return self.phase_index >= len(self.phases)

    @property
    def total_iterations(self) -> int:
        return sum(p.iterations for p in self.phases)

    @property
    def completed_iterations(self) -> int:
        return sum(p.iterations for p in self.phases[: self.phase_index]) + self.iteration

    def state_dict(self) -> dict[str, int]:
        return {"phase_index": self.phase_index, "iteration": self.iteration,
                "global_step": self.engine.global_step, "phase_seconds": dict(self.phase_seconds)}

    def load_state_dict(self, state: dict) -> None:
        self.phase_index, self.iteration = state["phase_index"], state["iteration"]
        self.engine.global_step = state["global_step"]
        self.phase_seconds = dict(state["phase_seconds"])

    def run(self) -> bool:
        """Train to the end, or until ``should_stop()``; returns True when every phase finished."""
        self.engine.train()
        with tqdm(total=self.total_iterations, initial=self.completed_iterations, disable=not self.progress,
                  dynamic_ncols=True) as bar:
            while not self.done:
                index, phase = self.phase_index, self.phases[self.phase_index]
                bar.set_description(phase.name)
                leaves = self.engine.leaves if phase.leaves is None else [getattr(self.engine, n) for n in phase.leaves]
                with _unroll_overrides(self.engine, phase.unroll):
                    while self.phase_index == index:
                        self._iterate(phase, leaves, bar)
                        if self.should_stop():
                            return self.done
        return True

    def _iterate(self, phase: Phase, leaves, bar) -> None:
        start = time.perf_counter()
        self.engine.global_step += 1
        for leaf in leaves:
            leaf.step(global_step=self.engine.global_step)
        self.phase_seconds[phase.name] = self.phase_seconds.get(phase.name, 0.0) + time.perf_counter() - start
        self.iteration += 1
        bar.update(1)
        if phase.epoch_length and self.iteration % phase.epoch_length == 0 and self.on_epoch_end:
            bar.set_postfix(self.on_epoch_end(phase, self.iteration // phase.epoch_length), refresh=False)
            self.engine.train()
        if self.iteration == phase.iterations:
            self.phase_index, self.iteration = self.phase_index + 1, 0
        if self.on_checkpoint and (self.done or (self.checkpoint_every and
                                                 self.engine.global_step % self.checkpoint_every == 0)):
            self.on_checkpoint()
