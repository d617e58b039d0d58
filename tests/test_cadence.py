"""W1, H and W2 step every iteration; G and A every meta_every — counted from the optimizers."""
from __future__ import annotations

from mlo.trainer import Phase, Trainer
from tests.conftest import build_run


def optimizer_steps(problem) -> int:
    """Adam's own step counter of the level's first parameter (0 for a level with none of its own)."""
    if problem.optimizer is None:
        return 0
    state = problem.optimizer.state[problem.trainable_parameters()[0]]
    return int(state["step"]) if state else 0


def test_steps_per_level_over_32_iterations():
    run = build_run("train.meta_every=8", "train.epochs=40")
    Trainer(run.engine, [Phase("cadence", 32)], progress=False).run()
    steps = {name: optimizer_steps(p) for name, p in run.levels.items()}
    assert steps == {"w1": 32, "disc": 32, "w2": 32, "gen": 4, "meta": 4}


def test_gan_pretraining_phase_steps_only_the_gan():
    run = build_run("gan.gan_pretrain_steps=6", "train.meta_every=8")
    pretrain = run.trainer.phases[0]
    assert pretrain.leaves == ["disc"]
    Trainer(run.engine, [pretrain], progress=False).run()
    steps = {name: optimizer_steps(p) for name, p in run.levels.items()}
    assert steps == {"w1": 0, "disc": 6, "w2": 0, "gen": 6, "meta": 0}
    assert run.levels["disc"]._unroll_steps == 8  # the phase's override is undone


def test_vanilla_mode_has_one_level():
    run = build_run("train.mode=vanilla")
    assert list(run.levels) == ["w1"]
    Trainer(run.engine, [Phase("vanilla", 5)], progress=False).run()
    assert optimizer_steps(run.levels["w1"]) == 5


def test_meta_none_removes_level_four():
    run = build_run("model.meta=none", "train.meta_every=2")
    assert "meta" not in run.levels
    assert run.levels["w1"].module.meta is not None  # each network owns its A-shaped block
    Trainer(run.engine, [Phase("no meta", 4)], progress=False).run()
    steps = {name: optimizer_steps(p) for name, p in run.levels.items()}
    assert steps == {"w1": 4, "disc": 4, "w2": 4, "gen": 2}
