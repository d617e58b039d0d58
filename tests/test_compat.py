"""Betty on current torch: device-generic autocast, no deprecated CUDA-only AMP calls, any device."""
from __future__ import annotations

import warnings

import pytest
import torch

from mlo.trainer import Phase, Trainer
from problems import ClassifierProblem
from tests.conftest import build_run


def _autocast_seen(run) -> list:
    seen = []
    original = ClassifierProblem.training_step

    def spy(self, batch):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return original(self, batch)

    run.levels["w1"].training_step = spy.__get__(run.levels["w1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # torch.cuda.amp.* is deprecated
        Trainer(run.engine, [Phase("p", 2)], progress=False).run()
    return seen


def test_bf16_autocast_on_cpu_goes_through_torch_autocast():
    seen = _autocast_seen(build_run("train.precision=bf16", "train.mode=vanilla"))
    assert seen == [(True, torch.bfloat16)] * 2


def test_fp32_runs_without_autocast():
    seen = _autocast_seen(build_run("train.mode=vanilla"))
    assert all(not enabled for enabled, _ in seen) and len(seen) == 2


def test_engine_uses_the_requested_device():
    run = build_run("train.mode=vanilla")
    assert run.engine.device == torch.device("cpu")
    assert next(run.levels["w1"].module.parameters()).device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is initialised here, so nothing is queued")
def test_steps_do_not_queue_lazy_cuda_calls():
    """Seeding every backend per step would queue a lazy CUDA call (with its stack) each time."""
    run = build_run("train.meta_every=2")
    Trainer(run.engine, [Phase("warm", 2)], progress=False).run()
    queued = len(torch.cuda._queued_calls)
    Trainer(run.engine, [Phase("p", 4)], progress=False).run()
    assert len(torch.cuda._queued_calls) == queued
