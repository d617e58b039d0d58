"""Runs survive SIGKILL, SIGINT/SIGTERM and numerical faults without losing work, and repeat exactly."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments.cli import main
from experiments.runner import Run
from mlo.errors import NumericalFault
from mlo.trainer import Phase, Trainer
from tests.conftest import build_run, tiny_config

REPO = Path(__file__).resolve().parents[1]
# long enough (about 150 iterations) to be killed in the middle, small enough to take seconds
LONG = ["epochs=20", "gan_pretrain_steps=10", "width=8", "gan_ch=8", "z_dim=8", "shared_dim=8",
        "meta_every=4", "progress=false", "checkpoint_every=3"]
TIMING = {"wall_time_s", "train_images_per_s", "seconds_per_iteration", "phase_seconds"}


def start(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "experiments.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def checkpoint_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["trainer"]["global_step"]


def interrupt_after_progress(proc: subprocess.Popen, run_dir: Path, sig: int, past_step: int, rng: random.Random):
    """Wait until a checkpoint beyond ``past_step`` exists, then send ``sig`` after a random pause."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if checkpoint_step(run_dir) > past_step:
                break
        except (FileNotFoundError, RuntimeError, EOFError):
            pass
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.4))
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, err


def metrics_without_timing(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k not in TIMING}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("reference")
    proc = start("run", *LONG, "name=ref", cwd=cwd)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return cwd / "runs" / "ref"


def test_sigkill_twice_then_resume_ends_like_an_uninterrupted_run(reference, tmp_path):
    rng = random.Random(int(time.time()))
    run_dir = tmp_path / "runs" / "killed"
    kills = []
    proc = start("run", *LONG, "name=killed", cwd=tmp_path)
    code, _ = interrupt_after_progress(proc, run_dir, signal.SIGKILL, past_step=0, rng=rng)
    assert code == -signal.SIGKILL
    kills.append(checkpoint_step(run_dir))
    proc = start("run", "--resume", str(run_dir), cwd=tmp_path)
    code, _ = interrupt_after_progress(proc, run_dir, signal.SIGKILL, past_step=kills[0] + 20, rng=rng)
    assert code == -signal.SIGKILL
    kills.append(checkpoint_step(run_dir))
    assert 0 < kills[0] < kills[1] and not (run_dir / "metrics.json").exists()
    proc = start("run", "--resume", str(run_dir), cwd=tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert metrics_without_timing(run_dir) == metrics_without_timing(reference), kills
    log = lambda d: [{k: v for k, v in r.items() if k != "seconds"}
                     for r in __import__("csv").DictReader((d / "train_log.csv").open())]
    assert log(run_dir) == log(reference)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_writes_a_checkpoint_and_resumes_exactly(reference, tmp_path, sig, code):
    run_dir = tmp_path / "runs" / "stopped"
    proc = start("run", *LONG, "name=stopped", cwd=tmp_path)
    returncode, err = interrupt_after_progress(proc, run_dir, sig, past_step=12, rng=random.Random(0))
    assert returncode == code, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"needsgen: stopped by {signal.Signals(sig).name} at step ")
    step = int(line.split(" at step ")[1].split()[0])
    assert checkpoint_step(run_dir) == step and line.endswith("--resume runs/stopped")
    proc = start("run", "--resume", str(run_dir), cwd=tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert metrics_without_timing(run_dir) == metrics_without_timing(reference)


def test_same_seed_and_config_give_the_same_metrics(tmp_path):
    results = []
    for name in ("a", "b"):
        run = Run(tiny_config("train.epochs=2", "gan.gan_pretrain_steps=4", "train.meta_every=2"))
        (tmp_path / name).mkdir()
        results.append({k: v for k, v in run.execute(tmp_path / name).items() if k not in TIMING})
    assert results[0] == results[1]
    seeds = json.loads((tmp_path / "a" / "seeds.json").read_text())
    assert seeds["run.seed"] == 0 and seeds["data.split_seed"] == 0
    assert set(seeds["levels"]) == {"disc", "w1", "gen", "w2", "meta"}
    assert len(seeds["levels"]["w2"]["loaders"]) == 2


def test_other_seed_gives_other_metrics(tmp_path):
    a = Run(tiny_config("train.epochs=2", "train.mode=vanilla")).execute(tmp_path)
    b = Run(tiny_config("train.epochs=2", "train.mode=vanilla", "run.seed=1")).execute(tmp_path)
    assert a["after"]["per_class_acc"] != b["after"]["per_class_acc"]


# ----- numerical faults --------------------------------------------------------------------------
def _nan_loss_at(problem, bad_counts):
    original = type(problem).training_step

    def training_step(batch):
        loss = original(problem, batch)
        return loss * float("nan") if problem.count in bad_counts else loss

    problem.training_step = training_step


def _adam_steps(problem) -> int:
    return int(problem.optimizer.state[problem.trainable_parameters()[0]]["step"])


def test_transient_nan_loss_skips_those_steps_and_training_goes_on(capsys, tmp_path):
    run = build_run("train.epochs=2", "train.meta_every=2")
    run.run_dir = tmp_path
    w1 = run.levels["w1"]
    _nan_loss_at(w1, {3, 5})
    run.trainer.run()
    total = run.ctx.total_steps
    assert _adam_steps(w1) == total - 2 and run.trainer.fault_count == 2
    assert all(torch.isfinite(p).all() for level in run.levels.values() for p in level.module.parameters())
    err = capsys.readouterr().err
    assert err.count("non-finite loss in level 'w1'; step skipped") == 2


def test_nan_gradient_is_caught_even_when_the_loss_is_finite(capsys, tmp_path):
    run = build_run("train.epochs=1", "train.mode=vanilla")
    run.run_dir = tmp_path
    w1 = run.levels["w1"]
    param = w1.trainable_parameters()[0]
    handle = param.register_hook(lambda g: g * float("nan") if w1.count == 2 else g)
    run.trainer.run()
    handle.remove()
    assert _adam_steps(w1) == run.ctx.total_steps - 1
    assert "non-finite gradient in level 'w1'" in capsys.readouterr().err


def test_nan_in_the_meta_level_leaves_lower_levels_untouched():
    run = build_run("train.epochs=1", "train.meta_every=2")
    meta, w2 = run.levels["meta"], run.levels["w2"]
    _nan_loss_at(meta, {1})
    grads = []
    meta.grad_callback = lambda: grads.append([p.grad for p in meta.trainable_parameters()])
    from mlo.trainer import Phase, Trainer
    Trainer(run.engine, [Phase("p", 2)], progress=False).run()
    assert len(grads) == 1 and all(g is None for g in grads[0])  # no gradient, no hops
    assert meta.consecutive_faults == 1
    assert all(torch.isfinite(p).all() for p in w2.module.parameters())


def test_persistent_nan_aborts_and_keeps_the_last_good_checkpoint(tmp_path):
    run = Run(tiny_config("train.epochs=3", "train.mode=vanilla", "run.checkpoint_every=4", "train.max_faults=3"))
    _nan_loss_at(run.levels["w1"], set(range(7, 1000)))
    with pytest.raises(NumericalFault, match=r"level 'w1' had 3 non-finite steps in a row \(train.max_faults=3\)"):
        run.execute(tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["trainer"]["global_step"] == 8 and run.checkpoint_step == 8
    assert all(torch.isfinite(t).all() for t in state["levels"]["w1"]["module"].values() if t.is_floating_point())
    assert not (tmp_path / "metrics.json").exists()


def test_cli_reports_an_abort_with_exit_code_3(tmp_path, monkeypatch, capsys):
    import problems.classifier as classifier
    original = classifier.ClassifierProblem.training_step
    monkeypatch.setattr(classifier.ClassifierProblem, "training_step",
                        lambda self, batch: original(self, batch) * float("nan"))
    monkeypatch.chdir(tmp_path)
    code = main(["run", "mode=vanilla", "epochs=1", "max_faults=2", "progress=false", "name=nan"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert err[-1].startswith("needsgen: training aborted: level 'w1' had 2 non-finite steps in a row")
    assert err[-1].endswith("no checkpoint had been written yet")


# ----- checkpoints ---------------------------------------------------------------------------------
@pytest.fixture()
def short_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "mode=vanilla", "epochs=2", "progress=false", "name=short", "checkpoint_every=5"]) == 0
    run_dir = tmp_path / "runs" / "short"
    (run_dir / "metrics.json").unlink()  # pretend it was killed after its last checkpoint
    return run_dir


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_checkpoint_is_named_and_the_previous_one_kept(short_run, capsys, damage):
    ckpt = short_run / "checkpoint.pt"
    previous = short_run / "checkpoint.pt.prev"
    assert previous.is_file()
    prev_bytes = previous.read_bytes()
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint" * 100)
    code = main(["run", "--resume", str(short_run)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and f"checkpoint '{ckpt}' is truncated or corrupted" in err
    assert "'checkpoint.pt.prev', is readable: move it over" in err and previous.read_bytes() == prev_bytes
    assert len(err) < 300  # one line of ours, not torch's text


def test_advice_when_both_checkpoints_are_damaged(short_run, capsys):
    for name in ("checkpoint.pt", "checkpoint.pt.prev"):
        (short_run / name).write_bytes(b"not a checkpoint" * 100)
    assert main(["run", "--resume", str(short_run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'checkpoint.pt.prev' is damaged too" in err and "move it over" not in err


def test_resume_with_a_different_config_is_refused_listing_the_keys(short_run, capsys):
    code = main(["run", "--resume", str(short_run), "epochs=5", "lr=0.01"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "train.epochs: 2 -> 5" in err and "train.lr: 0.001 -> 0.01" in err


def test_checkpoint_written_with_another_config_is_refused(short_run, capsys):
    config = short_run / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.001", "lr: 0.002"))
    code = main(["run", "--resume", str(short_run)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "was written with a different config: train.lr: 0.001 -> 0.002" in err


def test_checkpoint_of_another_format_is_refused_by_name(short_run, capsys):
    state = torch.load(short_run / "checkpoint.pt", weights_only=True)
    torch.save({**state, "format": 99}, short_run / "checkpoint.pt")
    assert main(["run", "--resume", str(short_run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "written by another version of needsgen (format 99, this one reads 3" in err


@pytest.mark.parametrize("written", [1, 2])
def test_checkpoint_of_an_earlier_format_evaluates_but_is_not_trained_on(short_run, capsys, written):
    """Formats 1 (before the format number: without what tied encoders borrow) and 2 (W2 weighed its generated
    images by the squared budget, then unnamed) still evaluate where encoders are untied; resuming one is refused."""
    state = torch.load(short_run / "checkpoint.pt", weights_only=True)
    del state["trained_on"]
    if written == 1:
        del state["format"]
        for level in state["levels"].values():
            del level["lent"]
    else:
        state["format"] = 2
    torch.save(state, short_run / "checkpoint.pt")
    assert main(["eval", str(short_run)]) == 0
    assert main(["run", "--resume", str(short_run)]) == 2
    assert f"(format {written}, this one reads 3 to train on)" in capsys.readouterr().err


def test_resume_of_a_finished_run_is_refused(short_run, capsys):
    (short_run / "metrics.json").write_text("{}")
    assert main(["run", "--resume", str(short_run)]) == 2
    assert "already finished" in capsys.readouterr().err


def test_resume_after_a_crash_between_the_two_renames(short_run, capsys):
    """A kill after moving checkpoint.pt to .prev and before renaming the new one in: use .prev."""
    os.replace(short_run / "checkpoint.pt", short_run / "checkpoint.pt.prev")
    (short_run / ".checkpoint.pt.tmp123").write_bytes(b"partial")
    assert main(["run", "--resume", str(short_run)]) == 0
    assert not (short_run / ".checkpoint.pt.tmp123").exists()
    assert math.isfinite(json.loads((short_run / "metrics.json").read_text())["top1"])


def test_a_skipped_first_sgd_step_leaves_momentum_that_the_next_step_can_use():
    """Fused SGD allocates its momentum buffers in its first step and fills them only if the step is taken:
    a non-finite first step (skipped on the device) must not leave garbage for the steps after it."""
    runs = [build_run("train.mode=vanilla", "train.optimizer=sgd", "train.lr=0.1") for _ in range(2)]
    skipped, clean = (run.levels["w1"] for run in runs)
    _nan_loss_at(skipped, {1})
    Trainer(runs[0].engine, [Phase("two", 2)], progress=False).run()  # step 1 skipped, step 2 is its first
    clean.get_batch()  # the clean run's first step takes the batch the skipping run's second step took
    Trainer(runs[1].engine, [Phase("one", 1)], progress=False).run()
    for p, q in zip(skipped.trainable_parameters(), clean.trainable_parameters()):
        assert torch.isfinite(skipped.optimizer.state[p]["momentum_buffer"]).all()
        assert torch.allclose(p, q, atol=1e-6)
