"""The training loop does not wait for the device: reads of tensor values on the host (each a host
sync on a GPU), counted while the real end-to-end levels train on the CPU."""
from __future__ import annotations

import pytest
from torch.overrides import TorchFunctionMode

from mlo.trainer import Phase, Trainer
from tests.conftest import build_run

HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}


class HostReads(TorchFunctionMode):
    """Records every call that copies a tensor's value to the host."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def reads_during(run, iterations: int) -> list[str]:
    """Host reads while training ``iterations`` iterations, ending with one sync point of the loop."""
    with HostReads() as reads:
        Trainer(run.engine, [Phase("counted", iterations)], progress=False, sync_every=1000).run()
    return reads.calls


def test_iterations_without_a_meta_step_never_wait_for_the_device():
    run = build_run("train.meta_every=8", "train.epochs=40")
    Trainer(run.engine, [Phase("warm-up", 8)], progress=False).run()  # the first G and A steps
    # W1, H and W2 step 7 times: nothing is read until the loop's sync point at the end
    assert reads_during(run, 7) == ["tolist"]


@pytest.mark.parametrize("hops", ["exact", "darts"])
@pytest.mark.parametrize("coreset", [1, 4])
def test_meta_steps_read_only_whether_a_is_finite(hops, coreset):
    """A step of G and A: the hops read nothing (a darts step size stays on the device), nor does the
    generator's moving average (its counter lives on the host) or a core-set's greedy choice; A decides on
    the host whether its loss is finite before the hops."""
    run = build_run("train.meta_every=8", "train.epochs=40", f"train.hypergradient={hops}",
                    f"gan.coreset_factor={coreset}")
    Trainer(run.engine, [Phase("warm-up", 7)], progress=False).run()
    assert reads_during(run, 1) == ["__bool__", "tolist"]
