"""``needsgen sample`` and ``needsgen gan-metrics`` end to end on a tiny run, their --help and bad input."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from experiments.cli import main
from tests.conftest import tiny_config
from tests.test_cli import needsgen

TINY_RUN = ["epochs=1", "gan_pretrain_steps=0", "width=4", "gan_ch=4", "z_dim=8", "shared_dim=4", "batch_size=64",
            "imbalance_factor=10", "val_per_class=4", "test_per_class=20", "val_batch_size=20", "meta_every=4",
            "device=cpu", "progress=false", "name=tiny"]
CLASSES = 10
GRID_CELL = 32 + 2  # 8x8 digits enlarged to 32 pixels, plus save_image's 2-pixel padding


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("gan_cli")
    result = needsgen("run", *TINY_RUN, cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return cwd / "runs" / "tiny"


def grid_shape(path) -> tuple[int, int]:
    """(columns, rows) of a sample grid."""
    with Image.open(path) as image:
        width, height = image.size
    return (width - 2) // GRID_CELL, (height - 2) // GRID_CELL


def test_sample_writes_a_grid_per_class_and_one_of_all_classes(tiny_run, capsys):
    assert main(["sample", str(tiny_run), "--per-class", "3"]) == 0
    out = tiny_run / "samples"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"samples_class{c}.png" for c in range(CLASSES)] + ["samples_all.png"])
    assert grid_shape(out / "samples_all.png") == (3, CLASSES)      # one row per class
    assert grid_shape(out / "samples_class9.png") == (2, 2)         # 3 images, two per row
    assert f"{out}/" in capsys.readouterr().out


def test_sample_is_seeded_and_truncation_changes_it(tiny_run, tmp_path):
    for name, extra in (("a", []), ("b", []), ("truncated", ["--truncation", "0.5"])):
        assert main(["sample", str(tiny_run), "--per-class", "2", "--out", str(tmp_path / name), *extra]) == 0
    grid = lambda name: (tmp_path / name / "samples_all.png").read_bytes()
    assert grid("a") == grid("b")
    assert grid("a") != grid("truncated")


def test_gan_metrics_prints_the_tables_and_writes_json(tiny_run, capsys):
    assert main(["gan-metrics", str(tiny_run), "--n", "60", "--gan-train-epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "only comparable within this project" in out
    assert "standard FID (TF-Inception): not computed; add --standard-fid" in out
    assert "per-class FID" in out and "GAN-train" in out and "GAN-test" in out
    result = json.loads((tiny_run / "gan_metrics.json").read_text())
    assert result["finished"] and result["truncation"] is None and list(result["features"]) == ["w1_encoder"]
    for ref in ("train", "test"):
        m = result["features"]["w1_encoder"][ref]
        assert m["n_real"] == m["n_generated"] == 60
        assert m["fid"] > 0 and m["kid_std"] > 0 and m["inception_score_mean"] >= 1 - 1e-9
        assert all(0 <= m[k] <= 1 for k in ("precision", "recall", "coverage")) and m["density"] >= 0
        assert sorted(m["per_class_fid"], key=int) == [str(c) for c in range(CLASSES)]
        assert f"{m['fid']:.4g}" in out
    g = result["gan_train_test"]
    assert 0 <= g["gan_train"] <= 1 and 0 <= g["gan_test"] <= 1 and g["epochs"] == 1


@pytest.mark.parametrize("command", ["sample", "gan-metrics"])
def test_help_of_the_generator_commands(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: needsgen {command}") and "EMA" in out and "--truncation TAU" in out


@pytest.fixture
def vanilla_run(tmp_path):
    """A vanilla run directory (config and checkpoint, untrained): it has no generator."""
    from experiments.runner import Run, prepare_run_dir
    cfg = tiny_config("train.mode=vanilla", f"run.out_dir={tmp_path}", "run.name=vanilla")
    run = Run(cfg)
    run.run_dir = prepare_run_dir(cfg, "digits_lt")
    run.save_checkpoint()
    return run.run_dir


@pytest.mark.parametrize("command", [["sample", "--per-class", "2"], ["gan-metrics"]])
def test_a_run_without_a_generator_is_refused(command, vanilla_run, capsys):
    assert main([command[0], str(vanilla_run), *command[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("needsgen: error: ") and len(err.splitlines()) == 1
    assert "(train.mode=vanilla) has no generator" in err
    assert not (vanilla_run / "samples").exists() and not (vanilla_run / "gan_metrics.json").exists()



def test_gan_metrics_standard_fid_says_which_fid_is_which(tiny_run, capsys):
    assert main(["gan-metrics", str(tiny_run), "--n", "6", "--standard-fid"]) == 0
    out = capsys.readouterr().out
    result = json.loads((tiny_run / "gan_metrics.json").read_text())
    standard = result["standard_fid"]
    assert "clean-fid" in standard["description"] and "TF-Inception" in standard["description"]
    assert standard["weights"].endswith("default_1.pt")
    assert "only comparable within this project" in result["features"]["w1_encoder"]["description"]
    for ref in ("train", "test"):
        assert standard[ref]["n"] == 6 and standard[ref]["fid"] > 0
        assert f"{standard[ref]['fid']:.4g}" in out

BAD_INPUT = [
    (["sample", "RUN", "--per-class", "0"], "--per-class must be > 0, got 0"),
    (["sample", "RUN", "--per-class", "2", "--truncation", "0"], "--truncation must be > 0, got 0.0"),
    (["sample", "RUN", "--per-class", "2"], "is not a run directory with a checkpoint"),
    (["gan-metrics", "RUN", "--n", "3"], "--n 3 is too small: precision/recall use k=5 neighbours"),
    (["gan-metrics", "RUN", "--tf-inception", "NOFILE"], "--tf-inception: 'NOFILE' does not exist"),
    (["gan-metrics", "RUN", "--gan-train-epochs", "-1"], "--gan-train-epochs must be >= 0, got -1"),
    (["gan-metrics", "RUN", "--seed", "-2"], "--seed must be >= 0, got -2"),
    (["gan-metrics", "RUN", "--truncation", "nan"], "--truncation must be > 0, got nan"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys, tmp_path):
    assert main([a.replace("RUN", str(tmp_path)) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("needsgen: error: "), err
    assert message in err
