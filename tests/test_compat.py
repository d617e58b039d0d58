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


def test_a_torch_older_than_the_project_needs_is_refused_in_one_line_at_import():
    import subprocess
    import sys

    from mlo.torch_version import MIN_TORCH, check_torch
    check_torch()  # the installed one
    code = ("import torch; from torch.torch_version import TorchVersion; torch.__version__ = TorchVersion('2.8.0')\n"
            "from experiments.cli import main; import sys; sys.exit(main(['run', 'epochs=1', 'progress=false']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.strip() == (f"needsgen: error: needsgen needs torch >= {MIN_TORCH} and found 2.8.0; upgrade "
                                     f"it (pip install 'torch>={MIN_TORCH}' 'torchvision>=0.24')")


def test_cuda_n_in_one_process_becomes_the_current_device(monkeypatch):
    """run.device=cuda:N without torchrun: streams, autocast and compiled kernels use the current device,
    so resolving the device makes cuda:N current (checked with CUDA's calls stood in for on the CPU)."""
    import torch

    from experiments.runner import resolve_device
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    assert resolve_device("cuda:2") == torch.device("cuda", 2) and current == [torch.device("cuda", 2)]
    assert resolve_device("cpu") == torch.device("cpu") and len(current) == 1


def test_run_deterministic_turns_on_deterministic_algorithms():
    import torch

    from tests.conftest import build_run
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        build_run("train.mode=vanilla", "run.deterministic=true")
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
