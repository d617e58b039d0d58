"""The command line end to end: a short run on digits, its outputs, eval, --help, and bad input."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.cli import main, resolve_config_path

SHORT = ["epochs=2", "gan_pretrain_steps=8", "width=8", "gan_ch=8", "z_dim=8", "shared_dim=8",
         "meta_every=4", "progress=false"]


REPO = Path(__file__).resolve().parents[1]


def needsgen(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, running the code next to these tests."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "experiments.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_console_script_is_declared():
    from importlib.metadata import entry_points
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "needsgen"]
    assert script.value == "experiments.cli:main"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cli")
    result = needsgen("run", *SHORT, "tensorboard=true", cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return cwd / "runs" / "digits_lt-end2end-seed0", result


def test_run_prints_the_per_class_table(finished_run):
    _, result = finished_run
    lines = result.stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("class"))
    rows = lines[header + 2: header + 12]
    assert [r.split()[0] for r in rows] == [str(c) for c in range(10)]
    assert any(l.startswith("mean") for l in lines) and any(l.startswith("std") for l in lines)
    assert "before (W1)" in result.stdout and "after (W2)" in result.stdout


def test_run_directory_contents(finished_run):
    run_dir, _ = finished_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["mode"] == "end2end" and metrics["final_classifier"] == "w2"
    assert len(metrics["after"]["per_class_acc"]) == 10 and len(metrics["before"]["per_class_acc"]) == 10
    assert 0 <= metrics["top1"] <= 1 and metrics["top1"] == metrics["after"]["top1"]
    assert metrics["train_counts"][0] > metrics["train_counts"][-1]
    assert sum(metrics["generated_per_class"]) > 0
    assert abs(sum(metrics["allocation"]) - 1) < 1e-3
    assert metrics["wall_time_s"] > 0 and metrics["train_images_per_s"] > 0
    assert {"many", "medium", "few", "ece", "per_class_std"} <= set(metrics)
    report = (run_dir / "report.md").read_text()
    assert "| class | real images | acc. before (W1) % | generated | acc. after (W2) % |" in report
    assert report.count("\n| ") >= 10 + 2 + 3
    rows = list(csv.DictReader((run_dir / "train_log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"w1_val_acc", "w2_val_acc", "temperature", "w1_loss", "w2_loss"} <= set(rows[0])
    for png in ("per_class_accuracy.png", "allocation.png", "samples.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert set(state["levels"]) == {"disc", "w1", "gen", "w2", "meta"}
    assert json.loads((run_dir / "seeds.json").read_text())["threads"] == torch.get_num_threads()
    assert (run_dir / "config.yaml").read_text().count("epochs: 2") == 1


def test_allocation_is_logged_every_epoch_with_a_plot_and_tensorboard_scalars(finished_run):
    """p(s), generated images and W1's validation accuracy per class and epoch: a CSV, a plot, TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, result = finished_run
    rows = list(csv.DictReader((run_dir / "allocation_log.csv").open()))
    assert len(rows) == 2 * 10 and [int(r["epoch"]) for r in rows[::10]] == [1, 2]
    for epoch in ("1", "2"):
        mine = [r for r in rows if r["epoch"] == epoch]
        assert abs(sum(float(r["p"]) for r in mine) - 1) < 1e-3 and sum(float(r["generated"]) for r in mine) > 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [float(r["generated"]) for r in rows[10:]] == pytest.approx(metrics["generated_per_class"], abs=0.1)
    assert (run_dir / "allocation_over_time.png").read_bytes()[:4] == b"\x89PNG"
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert {"w1/val_acc", "w2/loss", "temperature"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("w1/val_acc")) == 2
    per_class_p = sorted(d.name for d in (run_dir / "tensorboard").glob("per_class_p_*"))  # one run per class
    assert per_class_p == [f"per_class_p_{c}" for c in sorted(map(str, range(10)))]
    assert "CPU thread(s)" in result.stderr.splitlines()[0]


def test_second_default_run_gets_a_new_directory(finished_run, tmp_path):
    run_dir, _ = finished_run
    before = (run_dir / "metrics.json").read_text()
    from experiments.runner import prepare_run_dir
    from mlo.config import load_config
    cfg = load_config(None, [f"run.out_dir={run_dir.parent}"])
    fresh = prepare_run_dir(cfg, "digits_lt")
    assert fresh.name == "digits_lt-end2end-seed0-2"
    assert (run_dir / "metrics.json").read_text() == before


def test_eval_reproduces_the_final_metrics(finished_run, capsys):
    run_dir, result = finished_run
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    summary = [l for l in result.stdout.splitlines() if l.startswith("test top-1")]
    assert summary and summary[0] in out


@pytest.mark.parametrize("command", [[], ["run"], ["eval"], ["bench"]])
def test_help_for_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(command + ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: needsgen")
    if command == ["run"]:
        assert "train.meta_every=8" in out and "digits_lt" in out


@pytest.mark.parametrize("argv,stray", [(["run", "--modes", "x"], "--modes"),
                                        (["eval", "RUN", "epochs=3"], "epochs=3")])
def test_arguments_a_subcommand_does_not_take_are_refused(argv, stray, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {stray}" in capsys.readouterr().err


def test_bench_times_both_modes(capsys):
    tiny = ["width=4", "gan_ch=4", "z_dim=8", "shared_dim=4", "batch_size=16", "meta_every=2", "device=cpu"]
    assert main(["bench", *tiny[:-1], "--iters", "2", "--warmup", "1", tiny[-1]]) == 0  # overrides after options too
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("dataset digits, encoder small_cnn") and "fp32, channels_last false" in lines[0]
    rows = {line.split()[0]: float(line.split()[1]) for line in lines[2:4]}
    assert set(rows) == {"vanilla", "end2end"} and all(s > 0 for s in rows.values())
    assert lines[4].startswith("end2end / vanilla = ")
    # the breakdown: end2end's steps and hops, and its passes per iteration (A and G step every 2 iterations)
    breakdown = "\n".join(lines[5:])
    assert "step w2" in breakdown and "hop w2" in breakdown and "hop disc" in breakdown
    passes = lines[-1].split("forward passes per iteration: ")[1]
    assert "gen 4.00" in passes and "hops 4.00" in passes  # 4 exact hops of 2 backward passes each, per 2 iterations


def test_bench_with_tied_encoders_times_vanilla_untied(capsys):
    """Tying is a setting of the levels that share; the vanilla reference has none and runs untied."""
    tiny = ["width=4", "gan_ch=4", "z_dim=8", "shared_dim=4", "batch_size=16", "meta_every=2", "device=cpu"]
    assert main(["bench", *tiny, "model.tie_encoders=true", "--iters", "1", "--warmup", "1", "--no-breakdown"]) == 0
    out = capsys.readouterr().out
    assert "tied encoders true" in out.splitlines()[0] and "end2end / vanilla = " in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_bench_sync_check_needs_cuda(capsys):
    assert main(["bench", "--check-syncs"]) == 2
    assert "--check-syncs needs a CUDA device" in capsys.readouterr().err


def test_run_help_lists_the_chosen_configs_values_and_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "fmnist_lt_cpu", "lr=0.01", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "gan.gan_ch=32 " in out and "train.lr=0.01 " in out and "data.dataset=fmnist " in out
    generator = next(line for line in out.splitlines() if line.strip().startswith("gan.generator="))
    assert all(name in generator for name in ("acgan", "biggan", "light_per_class", "vcgan", "wacgan_gp"))
    assert "train.optimizer=adam" in out and "[choices: adam, sgd]" in out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "gan.gan_ch=16 " in capsys.readouterr().out  # the default config's, not the built-in default 32


def test_bad_keys_answer_before_torch_is_imported(tmp_path):
    """A mistyped key or value is refused before torch loads (well under a second on this machine)."""
    code = ("import sys, time; from experiments.cli import main; start = time.perf_counter(); "
            "rc = main(['run', 'epochz=3']); print(rc, 'torch' in sys.modules, time.perf_counter() - start)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60).stdout.split()
    assert out[0] == "2" and out[1] == "False" and float(out[2]) < 1.0, out


def test_a_run_on_another_dataset_is_named_after_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "mode=vanilla", "dataset=synthetic", "epochs=1", "width=4", "progress=false",
                 "n_max=20", "val_per_class=2", "test_per_class=2"]) in (0,)
    assert (tmp_path / "runs" / "digits_lt-synthetic-vanilla-seed0" / "metrics.json").is_file()


def test_gpu_check_says_in_one_line_that_it_needs_cuda(capsys):
    from experiments.bench import gpu_check
    assert not torch.cuda.is_available()  # this machine; on a GPU machine the check itself runs
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err


def test_gpu_check_settings_run_and_report_on_tiny_shapes():
    """The check's own machinery, on the CPU with tiny shapes: every setting it lists resolves, a setting's
    modes are timed with their ratio to vanilla, and a failing setting is a row, not the end of the check."""
    from experiments.bench import gpu_check
    from mlo.config import load_config
    from tests.conftest import TINY

    for setting in gpu_check.settings():  # every shipped setting is a valid config
        load_config(None if setting.config is None else resolve_config_path(setting.config), list(setting.overrides))
    tiny = gpu_check.Setting("tiny", None, tuple(TINY) + ("train.meta_every=2",), ("vanilla", "end2end"))
    broken = gpu_check.Setting("broken", None, tuple(TINY) + ("model.width=0",), ("vanilla",))
    rows = gpu_check.run_setting(tiny, iters=2, warmup=1) + gpu_check.run_setting(broken, iters=1, warmup=0)
    assert [r["mode"] for r in rows] == ["vanilla", "end2end", "vanilla"]
    assert all(r["s_per_it"] > 0 for r in rows[:2]) and rows[2]["error"].startswith("ConfigError")
    text = gpu_check.report(rows)
    assert "x  " in text.splitlines()[2] and "FAILED" in text.splitlines()[3]
