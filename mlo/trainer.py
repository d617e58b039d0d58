"""The one training loop: phases of Betty iterations, with progress, epoch callbacks and checkpoints.

A phase steps some leaves of the engine for a number of iterations (GAN pre-training steps only
the discriminator, whose updates trigger the generator; the MLO phase steps every leaf). Upper
levels step when Betty's readiness rules say so. The loop's position (phase, iteration) is part
of a checkpoint, so a run resumes where it stopped.

Faults: levels skip steps whose loss or gradient is not finite (``problems.base``); the loop
reports each one and raises ``NumericalFault`` once a level has ``max_faults`` in a row.
Signals: inside ``stop_on_signals()``, SIGINT/SIGTERM let the current iteration finish and make
``run`` return early (a second signal interrupts at once).
"""
from __future__ import annotations

import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from tqdm import tqdm

from mlo.errors import NumericalFault


@dataclass
class Phase:
    name: str
    iterations: int
    leaves: list[str] | None = None          # names of the levels stepped each iteration; None: the engine's leaves
    unroll: dict[str, int] = field(default_factory=dict)  # unroll_steps overrides during the phase
    epoch_length: int = 0                     # iterations per epoch (0: no epoch callback)
    setup: Callable[[], None] | None = None   # run when the phase starts, also when resuming inside it;
                                              # must be deterministic (a resumed run repeats it)


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


class StopRequest:
    """Set by SIGINT/SIGTERM inside ``stop_on_signals``; remembers which signal."""

    def __init__(self):
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None


@contextmanager
def stop_on_signals(request: StopRequest, signals=(signal.SIGINT, signal.SIGTERM)):
    previous = {s: signal.getsignal(s) for s in signals}

    def handle(signum, frame):
        request.signal = signum
        for s, handler in previous.items():  # a second signal acts at once
            signal.signal(s, handler)

    for s in signals:
        signal.signal(s, handle)
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Trainer:
    def __init__(self, engine, phases: list[Phase], *, progress: bool = True,
                 on_epoch_end: Callable[[Phase, int], dict] | None = None,
                 on_checkpoint: Callable[[], None] | None = None, checkpoint_every: int = 0,
                 stop: StopRequest | None = None, max_faults: int = 10):
        self.engine = engine
        self.phases = phases
        self.progress = progress
        self.on_epoch_end = on_epoch_end
        self.on_checkpoint = on_checkpoint
        self.checkpoint_every = checkpoint_every
        self.stop = stop if stop is not None else StopRequest()
        self.max_faults = max_faults
        self.fault_count = 0
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
                "global_step": self.engine.global_step, "phase_seconds": dict(self.phase_seconds),
                "fault_count": self.fault_count}

    def load_state_dict(self, state: dict) -> None:
        self.phase_index, self.iteration = state["phase_index"], state["iteration"]
        self.engine.global_step = state["global_step"]
        self.phase_seconds = dict(state["phase_seconds"])
        self.fault_count = state["fault_count"]

    def run(self) -> bool:
        """Train to the end, or until a stop is requested; returns True when every phase finished."""
        self.engine.train()
        with tqdm(total=self.total_iterations, initial=self.completed_iterations, disable=not self.progress,
                  dynamic_ncols=True) as bar:
            while not self.done:
                index, phase = self.phase_index, self.phases[self.phase_index]
                bar.set_description(phase.name)
                if phase.setup is not None:
                    phase.setup()
                leaves = self.engine.leaves if phase.leaves is None else [getattr(self.engine, n) for n in phase.leaves]
                with _unroll_overrides(self.engine, phase.unroll):
                    while self.phase_index == index:
                        self._iterate(phase, leaves, bar)
                        if self.stop:
                            return self.done
        return True

    def _check_faults(self, bar) -> None:
        for problem in self.engine.problems:
            for kind in getattr(problem, "faults", ()):
                self.fault_count += 1
                bar.write(f"step {self.engine.global_step}: non-finite {kind} in level '{problem.name}'; step "
                          f"skipped ({problem.consecutive_faults} in a row, limit {self.max_faults})", file=sys.stderr)
            if getattr(problem, "faults", None):
                problem.faults.clear()
            if getattr(problem, "consecutive_faults", 0) >= self.max_faults:
                raise NumericalFault(f"level '{problem.name}' had {problem.consecutive_faults} non-finite steps in a "
                                     f"row (train.max_faults={self.max_faults}) at step {self.engine.global_step}")

    def _iterate(self, phase: Phase, leaves, bar) -> None:
        start = time.perf_counter()
        self.engine.global_step += 1
        for leaf in leaves:
            leaf.step(global_step=self.engine.global_step)
        self.phase_seconds[phase.name] = self.phase_seconds.get(phase.name, 0.0) + time.perf_counter() - start
        self._check_faults(bar)
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
