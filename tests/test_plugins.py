"""A level and a mode in a user's own file (docs/examples/class_weights.py), loaded by run.plugins: every
command reads its runs, its hypergradient is the exact one, and every wiring mistake is one line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.cli import main
from mlo.errors import ConfigError
from tests.conftest import TINY, tiny_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "class_weights.py"
TINY_ARGS = [t for t in TINY if not t.startswith("run.progress")] + ["train.epochs=2", "run.progress=false"]


@pytest.fixture(scope="session")
def plugin(tmp_path_factory) -> Path:
    """The example, copied outside the checkout (once: a plugin is imported once per process)."""
    folder = tmp_path_factory.mktemp("user_code")
    shutil.copy(EXAMPLE, folder / "class_weights.py")
    return folder / "class_weights.py"


def needsgen(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "experiments.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_example_runs_from_its_own_folder_and_its_run_is_read_from_anywhere(plugin, tmp_path):
    """A fresh process, the plugin by a path relative to where the user is; config.yaml keeps it absolute, so
    `needsgen eval` of the run from another directory imports it again."""
    done = needsgen("run", "run.plugins=class_weights.py", "train.mode=class_weights", *TINY_ARGS,
                    f"run.out_dir={tmp_path}", "run.name=cw", cwd=plugin.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = tmp_path / "cw"
    assert f"- {plugin}" in (run_dir / "config.yaml").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["mode"] == "class_weights" and len(metrics["learned"]["cw"]["logits"]) == 10
    evaluated = needsgen("eval", str(run_dir), cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert f"test top-1: {100 * metrics['top1']:.2f}%" in evaluated.stdout


def test_the_example_resumes_exactly_and_logs_what_its_level_learns(plugin, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["run", f"run.plugins={plugin}", "train.mode=class_weights", *TINY_ARGS, "levels.cw.lr=0.1",
            "run.checkpoint_every=5", "run.name=cw"]
    assert main(args) == 0
    run_dir = tmp_path / "runs" / "cw"
    finished = json.loads((run_dir / "metrics.json").read_text())
    os.replace(run_dir / "checkpoint.pt.prev", run_dir / "checkpoint.pt")  # back to the one before the last
    (run_dir / "metrics.json").unlink()
    assert main(["run", "--resume", str(run_dir)]) == 0
    resumed = json.loads((run_dir / "metrics.json").read_text())
    timing = ("wall_time_s", "phase_seconds", "train_images_per_s", "seconds_per_iteration")
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in finished.items() if k not in timing}
    weights = resumed["level_statistics"]["cw"]["weights"]
    assert len(weights) == 10 and abs(sum(weights) - 10) < 1e-3 and max(weights) - min(weights) > 1e-3
    log = (run_dir / "level_log.csv").read_text().splitlines()
    assert sum(",cw,weights," in line for line in log) == 2 * 10  # per epoch and class


def test_the_examples_hypergradient_is_the_exact_one(plugin):
    """The level's loss does not read its weights: their gradient is all hypergradient, through W1's step."""
    from experiments.runner import Run
    from mlo.hypergradient import path_gradients
    from tests.test_hypergradient import run_and_compare

    run = Run(tiny_config(f"run.plugins={plugin}", "train.mode=class_weights", "levels.cw.lr=0.1"))
    cw = run.levels["cw"]
    assert [[p.name for p in path] for path in cw.paths] == [["cw", "w1", "cw"]]
    reports = run_and_compare(run, iterations=3, level="cw")
    assert len(reports) == 3 and all(total >= 0.9999 for total, _ in reports), reports
    grads = path_gradients(cw, kind="exact")
    assert grads["direct"][0].abs().max() == 0 and grads["cw>w1>cw"][0].abs().max() > 0


def test_a_user_mode_in_compare_sample_and_gan_metrics(plugin, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = [*TINY_ARGS, "gan.gan_pretrain_steps=2", "train.meta_every=2", f"run.plugins={plugin}"]
    assert main(["compare", *tiny, "--modes", "vanilla,class_weights,end2end_class_weights", "--seeds", "0",
                 "--name", "cmp"]) == 0
    table = (tmp_path / "runs" / "cmp" / "compare.md").read_text()
    assert "| class_weights |" in table and "| end2end_class_weights |" in table
    run_dir = tmp_path / "runs" / "cmp" / "end2end_class_weights-seed0"
    assert main(["sample", str(run_dir), "--per-class", "2"]) == 0
    assert (run_dir / "samples" / "samples_all.png").is_file()
    assert main(["gan-metrics", str(run_dir), "--n", "40"]) == 0
    assert json.loads((run_dir / "gan_metrics.json").read_text())["features"]["w1_encoder"]["test"]["fid"] >= 0
    capsys.readouterr()


def test_argument_errors_are_answered_before_torch_is_imported(tmp_path):
    code = ("import sys; from experiments.cli import main\n"
            "for args in (['run', 'train.mode=nope'], ['eval', 'missing'], ['compare', '--modes', 'vanilla', "
            "'--seeds', 'x'], ['compare', '--modes', 'vanilla,nope'], ['run', 'run.plugins=absent.py']):\n"
            "    assert main(args) == 2, args\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 5 and all(line.startswith("needsgen: error: ") for line in lines), lines
    assert "train.mode: unknown mode 'nope'" in lines[0] and "'missing' is not a run directory" in lines[1]
    assert "--seeds: expected comma-separated integers" in lines[2] and "--modes: unknown mode 'nope'" in lines[3]
    assert "run.plugins: 'absent.py' is not a file" in lines[4]


def _plugin_file(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text("from experiments.api import BuildContext, get_mode, register_level, register_mode, setting\n"
                    "from problems import LevelProblem\n" + body)
    return path


@pytest.mark.parametrize("body,message", [
    ("register_mode(get_mode('vanilla'))\n", "register_mode: a mode 'vanilla' is registered already (by "
                                             "experiments.modes)"),
    ("@register_level('w1')\ndef build(ctx, name):\n    pass\n", "register_level: a level kind 'w1' is registered"),
    ("raise RuntimeError('my bug')\n", "importing '{path}' failed: RuntimeError: my bug"),
], ids=["duplicate mode", "duplicate level", "plugin raises"])
def test_a_plugin_that_cannot_load_is_one_line(tmp_path, capsys, body, message):
    path = _plugin_file(tmp_path, f"bad_{abs(hash(body))}", body)
    assert main(["run", f"run.plugins={path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.format(path=path) in err, err


@pytest.mark.parametrize("body,mode,message", [
    ("register_mode(get_mode('vanilla').with_upper('train', 'w1').named('clash', 'x'))\n"
     "@register_level('train')\ndef build(ctx, name):\n    return None\n", "clash",
     "returned a NoneType for level 'train'"),
    ("register_mode(get_mode('vanilla').with_upper('loss_fn', 'w1').named('clash2', 'x'))\n"
     "import torch\n@register_level('loss_fn')\ndef build(ctx, name):\n"
     "    m = torch.nn.Linear(1, 1)\n"
     "    return LevelProblem(name, ctx.level_config(name), m, torch.optim.SGD(m.parameters(), lr=0.1),"
     " **ctx.common(name))\n", "clash2", "level name 'loss_fn' clashes with the attribute 'loss_fn' of level 'w1'"),
    ("register_mode(get_mode('vanilla').with_upper('nobuilder', 'w1').named('clash3', 'x'))\n", "clash3",
     "train.mode=clash3 has a level of kind 'nobuilder', which no register_level names"),
], ids=["builder returns nothing", "name clash", "no builder"])
def test_wiring_mistakes_name_the_level_in_one_line(tmp_path, capsys, body, mode, message):
    path = _plugin_file(tmp_path, f"wiring_{mode}", body)
    assert main(["run", f"run.plugins={path}", f"train.mode={mode}", *TINY_ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_a_levels_settings_are_checked_listed_and_refused_where_its_level_is_absent(plugin, capsys):
    assert main(["run", f"run.plugins={plugin}", "train.mode=vanilla", "levels.cw.lr=0.1"]) == 2
    assert "levels.cw.lr sets a level of kind cw, which train.mode=vanilla does not have" in capsys.readouterr().err
    assert main(["run", f"run.plugins={plugin}", "train.mode=class_weights", "levels.cw.lr=-1"]) == 2
    assert "levels.cw.lr: must be >= 0.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", f"run.plugins={plugin}", "--help"])
    assert "levels.cw.lr=0.05  learning rate (Adam) of the class weights' logits" in capsys.readouterr().out


def test_an_upper_level_steps_every_kth_time_its_lower_level_is_ready(plugin):
    """Mode.with_upper(..., every=k): the level gets ``every`` through BuildContext.common and steps on every
    k-th readiness of its lower level."""
    from experiments.registry import get_mode
    from experiments.runner import Run
    from mlo.trainer import Phase, Trainer

    run = Run(tiny_config(f"run.plugins={plugin}", "train.mode=class_weights"))
    run.mode = get_mode("class_weights").without("cw").with_upper("cw", "w1", every=3)
    assert run.ctx.__class__(run.cfg, run.data, run.mode, run.device).common("cw")["every"] == 3
    run.levels["cw"].every = 3
    Trainer(run.engine, [Phase("count", 9)], progress=False).run()
    assert run.levels["w1"].count == 9 and run.levels["cw"].count == 3


def test_with_upper_refuses_what_cannot_be_wired():
    from experiments.registry import get_mode
    with pytest.raises(ConfigError, match="has a level 'w1' already"):
        get_mode("vanilla").with_upper("w1", "w1")
    with pytest.raises(ConfigError, match="has no level 'w9' to put 'cw' above"):
        get_mode("vanilla").with_upper("cw", "w9")
    with pytest.raises(ConfigError, match="every=0"):
        get_mode("vanilla").with_upper("cw", "w1", every=0)


def test_the_layout_has_no_arrow_back():
    """experiments -> problems -> mlo, never back; and the bench no longer imports the command line that
    imports it (experiments.bench.speed and experiments.cli)."""
    import ast

    def imports(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        names = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}

    for package, forbidden in (("mlo", ("problems", "experiments")), ("problems", ("experiments",))):
        for path in (REPO / package).rglob("*.py"):
            bad = [m for m in imports(path) if m.split(".")[0] in forbidden]
            assert not bad, (path, bad)
    assert not {m for m in imports(REPO / "experiments" / "bench" / "speed.py") if m == "experiments.cli"}


def test_every_named_random_stream_is_in_seeds_json(tmp_path):
    from experiments.runner import Run
    from mlo.data.loaders import stream_seed

    run = Run(tiny_config("train.mode=end2end"))
    run.run_dir = tmp_path
    run.write_seeds()
    streams = json.loads((tmp_path / "seeds.json").read_text())["streams"]
    assert {"w1 batches", "w2 batches", "disc batches", "meta validation batches", "samples"} <= set(streams)
    assert all(seed == stream_seed(0, name) for name, seed in streams.items())
    assert torch.equal(torch.tensor(len(set(streams.values()))), torch.tensor(len(streams)))  # all different


def test_a_mode_made_from_another_keeps_the_options_it_reads(tmp_path):
    """What a mode accepts is a property of the Mode (``options``), not a test of its name: one made from
    sequential takes train.w2_init, one made from vanilla refuses it."""
    from experiments.config_files import load_run_config
    from experiments.modes import resolve_mode

    path = _plugin_file(tmp_path, "derived", "register_mode(get_mode('sequential').named('my_sequential', 'x'))\n"
                                             "register_mode(get_mode('vanilla').named('my_vanilla', 'x'))\n")
    cfg = load_run_config(None, [*TINY, f"run.plugins={path}", "train.mode=my_sequential", "train.w2_init=w1"])
    assert resolve_mode(cfg).name == "my_sequential" and resolve_mode(cfg).options == ("train.w2_init",)
    with pytest.raises(ConfigError, match="train.w2_init applies to train.mode=sequential or sequential_real or my_sequential only"):
        resolve_mode(load_run_config(None, [*TINY, f"run.plugins={path}", "train.mode=my_vanilla",
                                            "train.w2_init=w1"]))
