"""Betty on current torch: device-generic autocast, no deprecated CUDA-only AMP calls, any device;
the throughput options channels_last and compile."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch._inductor.config as inductor_config

from mlo.errors import ConfigError
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


def test_channels_last_keeps_weights_and_batches_in_nhwc_and_computes_the_same():
    runs = {flag: build_run("train.mode=vanilla", f"run.channels_last={flag}") for flag in ("false", "true")}
    losses = {flag: run.levels["w1"].training_step(run.levels["w1"].get_batch()) for flag, run in runs.items()}
    assert torch.allclose(losses["false"], losses["true"], rtol=1e-5)
    w1 = runs["true"].levels["w1"]
    x, _ = next(iter(w1.train_data_loader[0]))
    assert x.is_contiguous(memory_format=torch.channels_last)
    Trainer(runs["true"].engine, [Phase("p", 2)], progress=False).run()
    convs = [m for m in w1.module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)


def test_inductor_on_a_cpu_without_a_compiler_is_refused(monkeypatch):
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-c++-compiler",))
    with pytest.raises(ConfigError, match=r"run.compile=inductor: inductor needs a C\+\+ compiler"):
        build_run("train.mode=vanilla", "run.compile=inductor")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is initialised here, so nothing is queued")
def test_steps_do_not_queue_lazy_cuda_calls():
    """Seeding every backend per step would queue a lazy CUDA call (with its stack) each time."""
    run = build_run("train.meta_every=2")
    Trainer(run.engine, [Phase("warm", 2)], progress=False).run()
    queued = len(torch.cuda._queued_calls)
    Trainer(run.engine, [Phase("p", 4)], progress=False).run()
    assert len(torch.cuda._queued_calls) == queued
