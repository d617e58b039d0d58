"""The one training loop: phases of Betty iterations, with progress, epoch callbacks and checkpoints.

A phase steps some leaves of the engine for a number of iterations (GAN pre-training steps only
the discriminator, whose updates trigger the generator; the MLO phase steps every leaf). Upper
levels step when Betty's readiness rules say so. The loop's position (phase, iteration) is part
of a checkpoint, so a run resumes where it stopped.

Host syncs: the steps queue work on the device without waiting for it. The loop waits at its sync
points only: every ``sync_every`` iterations, at epoch and phase ends and before checkpoints. There
it reads the levels' fault codes (one host sync for all levels and steps since the last point);
under several processes, the same read agrees on the codes and on a stop request (one collective).

Faults: levels skip steps whose loss or gradient is not finite (``problems.base``); the loop
reports each one at the next sync point and raises ``NumericalFault`` once a level has
``max_faults`` in a row, so an abort comes at most ``sync_every`` iterations late; a checkpoint is
never written before the faults up to it are counted.
Signals: inside ``stop_on_signals()``, SIGINT/SIGTERM let the current iteration finish and make
``run`` return early (a second signal interrupts at once); under several processes, they stop
every process at the next sync point (and a second signal is ignored).
"""
from __future__ import annotations

import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

from mlo.distributed import active, maximum_
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
    restore: Callable[[], bool] | None = None  # at the phase's start (not when resuming inside it): True when it
                                              # put the levels where the phase would leave them (phase skipped)
    on_end: Callable[[], None] | None = None  # once the phase's last iteration is done


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
def stop_on_signals(request: StopRequest, signals=(signal.SIGINT, signal.SIGTERM), second_interrupts: bool = True):
    """Inside, SIGINT/SIGTERM set ``request``; a second one acts at once if ``second_interrupts``
    (not under torchrun, which passes a terminal's Ctrl-C on to its processes a second time and
    kills them itself if they take too long)."""
    previous = {s: signal.getsignal(s) for s in signals}

    def handle(signum, frame):
        if request.signal is None:
            request.signal = signum
        if second_interrupts:
            for s, handler in previous.items():
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
                 stop: StopRequest | None = None, max_faults: int = 10, sync_every: int = 1, main: bool = True):
        self.engine = engine
        self.phases = phases
        self.progress = progress and main
        self.on_epoch_end = on_epoch_end
        self.on_checkpoint = on_checkpoint
        self.checkpoint_every = checkpoint_every
        self.stop = stop if stop is not None else StopRequest()
        self.max_faults = max_faults
        self.sync_every = sync_every
        self.main = main    # the process that reports (rank 0)
        self.fault_count = 0
        self.phase_index = 0
        self.iteration = 0   # within the current phase
        self.phase_seconds: dict[str, float] = {}  # time spent stepping and syncing, per phase (no callbacks)
        self._stop_agreed = False  # under several processes: a stop request all of them saw at a sync point

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
                if self.iteration == 0 and phase.restore is not None and phase.restore():
                    self.phase_index += 1
                    bar.update(phase.iterations)
                    continue
                if phase.setup is not None:
                    phase.setup()
                leaves = self.engine.leaves if phase.leaves is None else [getattr(self.engine, n) for n in phase.leaves]
                with _unroll_overrides(self.engine, phase.unroll):
                    while self.phase_index == index:
                        self._iterate(phase, leaves, bar)
                        if self._stop_agreed if active() else self.stop:
                            return self.done
        return True

    def _sync(self, bar) -> None:
        """Read every level's fault codes since the last sync point (and agree on them and on a
        stop request with the other processes); report the faults, abort after too many in a row."""
        pending = sorted(((step, n, problem, code) for n, problem in enumerate(self.engine.problems)
                          for step, code in getattr(problem, "fault_codes", ())), key=lambda item: item[:2])
        for problem in self.engine.problems:
            getattr(problem, "fault_codes", []).clear()
        values = torch.stack([code for *_, code in pending] +
                             [torch.full((), self.stop.signal or 0, device=self.engine.device)])
        maximum_([values])
        *codes, signal = values.tolist()
        if signal:
            self.stop.signal, self._stop_agreed = signal, True
        for (step, _, problem, _), code in zip(pending, codes):
            kind = problem.count_fault(code)
            if kind is None:
                continue
            self.fault_count += 1
            if self.main:
                bar.write(f"step {step}: non-finite {kind} in level '{problem.name}'; step skipped "
                          f"({problem.consecutive_faults} in a row, limit {self.max_faults})", file=sys.stderr)
            if problem.consecutive_faults >= self.max_faults:
                raise NumericalFault(f"level '{problem.name}' had {problem.consecutive_faults} non-finite steps in a "
                                     f"row (train.max_faults={self.max_faults}) at step {step}")

    def _iterate(self, phase: Phase, leaves, bar) -> None:
        start = time.perf_counter()
        self.engine.global_step += 1
        for leaf in leaves:
            leaf.step(global_step=self.engine.global_step)
        self.iteration += 1
        epoch_end = bool(phase.epoch_length) and self.iteration % phase.epoch_length == 0
        phase_end = self.iteration == phase.iterations
        checkpoint = self.on_checkpoint is not None and (
            (phase_end and self.phase_index == len(self.phases) - 1)
            or bool(self.checkpoint_every and self.engine.global_step % self.checkpoint_every == 0))
        if epoch_end or phase_end or checkpoint or self.engine.global_step % self.sync_every == 0:
            self._sync(bar)
        self.phase_seconds[phase.name] = self.phase_seconds.get(phase.name, 0.0) + time.perf_counter() - start
        bar.update(1)
        if epoch_end and self.on_epoch_end:
            bar.set_postfix(self.on_epoch_end(phase, self.iteration // phase.epoch_length), refresh=False)
            self.engine.train()
        if phase_end:
            if phase.on_end is not None:
                phase.on_end()
            self.phase_index, self.iteration = self.phase_index + 1, 0
        if checkpoint:
            self.on_checkpoint()
