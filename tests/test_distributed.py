"""Two CPU processes under torchrun (gloo): one run, the same allocation p(s) and the same weights in
both, one run directory written by rank 0 alone, and an exact resume by both."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_reliability import TIMING

REPO = Path(__file__).resolve().parents[1]
# 4 GAN steps, then 13 iterations with a meta step every 4; checkpoints at steps 6, 12 and 17
TINY_RUN = ["data.n_max=40", "data.imbalance_factor=4", "data.val_per_class=4", "data.test_per_class=10",
            "data.val_batch_size=20", "model.width=4", "gan.gan_ch=4", "gan.z_dim=8", "gan.shared_dim=4",
            "gan.gan_pretrain_steps=4", "train.batch_size=16", "train.epochs=1", "train.meta_every=4",
            "run.device=cpu", "run.progress=false", "run.checkpoint_every=6", "run.name=ddp"]


def torchrun(debug_dir: Path, *args: str, cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    debug_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                           str(REPO / "tests" / "torchrun_worker.py"), str(debug_dir), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def ranks(debug_dir: Path) -> list[dict]:
    return [torch.load(debug_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def assert_same_weights(rank0: dict, rank1: dict) -> None:
    assert rank0["params"].keys() == rank1["params"].keys() == {"disc", "w1", "gen", "w2", "meta"}
    for name in rank0["params"]:
        assert all(torch.equal(a, b) for a, b in zip(rank0["params"][name], rank1["params"][name])), name


def metrics_without_timing(run_dir: Path) -> dict:
    return {k: v for k, v in json.loads((run_dir / "metrics.json").read_text()).items() if k not in TIMING}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("torchrun")
    result = torchrun(cwd / "debug", "run", *TINY_RUN, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result


def test_both_processes_compute_the_same_allocation_and_weights(two_process_run):
    cwd, _ = two_process_run
    rank0, rank1 = ranks(cwd / "debug")
    # W2's own steps and meta's hops through W2: the same p(s), from the all-reduced validation losses
    assert len(rank0["allocations"]) == len(rank1["allocations"]) > 13
    assert all(torch.equal(a, b) for a, b in zip(rank0["allocations"], rank1["allocations"]))
    assert_same_weights(rank0, rank1)


def test_rank_zero_alone_writes_the_run_directory(two_process_run):
    cwd, result = two_process_run
    rank0, rank1 = ranks(cwd / "debug")
    assert rank1["writes"] == []
    assert {"prepare_run_dir", "save_checkpoint", "atomic_write", "write_outputs"} <= set(rank0["writes"])
    assert [p.name for p in (cwd / "runs").iterdir()] == ["ddp"]
    metrics = json.loads((cwd / "runs" / "ddp" / "metrics.json").read_text())
    assert sum(metrics["generated_per_class"]) > 0 and abs(sum(metrics["allocation"]) - 1) < 1e-3
    assert result.stdout.count("test top-1:") == 1  # the table is printed once
    state = torch.load(cwd / "runs" / "ddp" / "checkpoint.pt", weights_only=True)
    assert state["processes"] == 2 and len(state["per_process"]) == 2


def test_both_processes_resume_exactly_from_a_checkpoint(two_process_run):
    """Back to the checkpoint before the last one (step 12 of 17, before a meta step), resumed by both."""
    cwd, _ = two_process_run
    run_dir = cwd / "runs" / "ddp"
    finished = metrics_without_timing(run_dir)
    os.replace(run_dir / "checkpoint.pt.prev", run_dir / "checkpoint.pt")
    (run_dir / "metrics.json").unlink()
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["trainer"]["global_step"] == 12
    result = torchrun(cwd / "debug-resumed", "run", "--resume", str(run_dir), cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics_without_timing(run_dir) == finished
    assert_same_weights(*ranks(cwd / "debug-resumed"))


def test_two_processes_get_the_gradients_one_process_gets_on_the_whole_batch(tmp_path):
    """Against one process, not only against each other: the gradient that reaches W1 through p(s) (the
    validation losses summed over processes, differentiably) and A's gradient (direct and through W1's
    step), on networks without batch statistics, as the processes' optimizers see them."""
    one, two = tmp_path / "one", tmp_path / "two"
    for folder, processes in ((one, 1), (two, 2)):
        result = torchrun(folder, "gradients", cwd=tmp_path, processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
    single = torch.load(one / "rank0.pt", weights_only=True)
    for rank in ranks(two):
        assert torch.allclose(rank["p"], single["p"], atol=1e-6)
        assert any(g.abs().sum() > 0 for g in single["p_grad_w1"])
        for key in ("p_grad_w1", "meta_grad"):
            for a, b in zip(rank[key], single[key]):
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), key


def test_a_process_that_exits_without_closing_its_run_leaves_the_process_group_before_teardown(tmp_path):
    """Exiting with the group still up can abort in gloo's threads while the interpreter tears down
    (rank 1: "terminate called without an active exception", SIGABRT); the engine that joined the group
    leaves it at exit, so a script that never calls ``Run.close`` still ends cleanly."""
    result = torchrun(tmp_path / "debug", "exit-without-closing", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [rank["group_left"] for rank in ranks(tmp_path / "debug")] == [True, True]
