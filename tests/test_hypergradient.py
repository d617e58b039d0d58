"""The meta level's gradient from Betty's finite-difference hops equals an exact double-backward
reference summed over the five paths of the end-to-end graph, built from the real levels."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlo.betty_compat import CompatProblem
from mlo.trainer import Phase, Trainer
from problems import RefinedClassifierProblem
from tests.conftest import SMOOTH, build_run

FIVE_PATHS = {"meta>w1>meta", "meta>w2>w1>meta", "meta>w2>meta", "meta>w2>gen>meta", "meta>w2>gen>disc>meta"}


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _exact_hop(v, curr, prev):
    """−∂/∂θ_prev (∇_θcurr L_curr · v), by double backward on the same batch Betty used."""
    loss = curr.training_step_exec(curr.cur_batch)
    grads = torch.autograd.grad(loss, curr.trainable_parameters(), create_graph=True, allow_unused=True)
    dot = sum((g * u).sum() for g, u in zip(grads, v) if g is not None)
    out = torch.autograd.grad(dot, prev.trainable_parameters(), allow_unused=True)
    return [-(o if o is not None else torch.zeros_like(p)) for o, p in zip(out, prev.trainable_parameters())]


def exact_meta_gradient(meta):
    loss = meta.training_step_exec(meta.cur_batch)
    params = meta.trainable_parameters()
    total = [g if g is not None else torch.zeros_like(p)
             for g, p in zip(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params)]
    for path in meta.paths:
        v = torch.autograd.grad(loss, path[1].trainable_parameters(), retain_graph=True, allow_unused=True)
        v = [g if g is not None else torch.zeros_like(p) for g, p in zip(v, path[1].trainable_parameters())]
        for i in range(1, len(path) - 1):
            v = _exact_hop(v, path[i], path[i + 1])
        total = [a + b for a, b in zip(total, v)]
    return _flat(total)


def _set_hop_precision(run, precision: str) -> None:
    for level in run.levels.values():
        level.hop_precision = precision


def run_and_compare(run, iterations: int, level: str = "meta", hop_precision: str = "fp32"):
    """Cosine and relative error of ``level``'s gradient against the exact reference, which is always
    computed in fp32; ``hop_precision`` is the precision Betty's hops run in."""
    meta = run.levels[level]
    reports = []

    def check():  # Betty calls grad_callback after backward, before the optimizer step
        betty = _flat([p.grad for p in meta.trainable_parameters()]).clone()
        _set_hop_precision(run, "fp32")
        with torch.compiler.set_stance("force_eager"):  # compiled levels cannot differentiate twice
            exact = exact_meta_gradient(meta)
        _set_hop_precision(run, hop_precision)
        reports.append((F.cosine_similarity(betty, exact, dim=0).item(),
                        ((betty - exact).norm() / exact.norm()).item()))

    meta.grad_callback = check
    _set_hop_precision(run, hop_precision)
    Trainer(run.engine, [Phase("check", iterations)], progress=False).run()
    return reports


def test_graph_has_the_five_paths():
    run = build_run(*SMOOTH, "train.meta_every=2")
    paths = {">".join(p.name for p in path) for path in run.levels["meta"].paths}
    assert paths == FIVE_PATHS


@pytest.mark.parametrize("overrides", [
    ("run.seed=0",), ("run.seed=1",), ("run.seed=2",),
    # under bf16 autocast the hops (and meta's own step, where the hypergradient starts) run in fp32
    ("train.precision=bf16",),
    # torch.compile (aot_eager: the tracing of forward and backward that inductor builds on) through
    # Betty's steps and hops: perturbed weights, frozen statistics, retained graphs
    ("run.compile=aot_eager",),
], ids=["seed0", "seed1", "seed2", "bf16_steps", "compiled"])
def test_meta_gradient_matches_exact_reference(overrides):
    """Betty's darts hops at the default step, on smooth networks (see tests/smooth_models.py)."""
    run = build_run(*SMOOTH, "train.meta_every=2", *overrides)
    reports = run_and_compare(run, iterations=4)
    assert len(reports) == 2
    for cos, rel in reports:
        assert cos >= 0.999, (cos, rel)


def test_hops_in_bf16_measure_rounding():
    """The same run with the hops in bf16: a finite difference over darts_alpha=0.001 in parameter
    norm is far below bf16's resolution (measured cosine 0.1-0.5)."""
    run = build_run(*SMOOTH, "train.meta_every=2", "train.precision=bf16")
    reports = run_and_compare(run, iterations=4, hop_precision="bf16")
    assert max(cos for cos, _ in reports) < 0.9, reports


def test_loss_scale_does_not_leak_into_the_hypergradient():
    """fp16's loss scaling, with a real GradScaler on the CPU: Betty scales meta's loss, so its direct
    gradient and every hop carry the scale S; meta's scaler unscales their sum before the step."""
    run = build_run(*SMOOTH, "train.meta_every=2")
    for level in run.levels.values():
        level.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    meta = run.levels["meta"]
    seen = {}

    def check():
        seen["scaled"] = _flat([p.grad for p in meta.trainable_parameters()]).clone()
        seen["exact"] = exact_meta_gradient(meta)

    def step_spy(*args, _step=meta.optimizer.step, **kwargs):  # the gradient the optimizer uses
        seen["stepped"] = _flat([p.grad for p in meta.trainable_parameters()]).clone()
        return _step(*args, **kwargs)

    meta.grad_callback = check
    meta.optimizer.step = step_spy
    Trainer(run.engine, [Phase("check", 2)], progress=False).run()
    exact = seen["exact"]
    assert F.cosine_similarity(seen["scaled"], exact, dim=0) >= 0.999
    assert seen["scaled"].norm() / exact.norm() == pytest.approx(2.0 ** 12, rel=1e-3)
    assert F.cosine_similarity(seen["stepped"], exact, dim=0) >= 0.999
    assert seen["stepped"].norm() / exact.norm() == pytest.approx(1.0, rel=1e-3)


def test_exact_hops_match_the_reference_on_relu_networks():
    """``train.hypergradient=exact`` on the real CNN and BigGAN, where finite differences cannot."""
    run = build_run("train.meta_every=2", "train.hypergradient=exact")
    reports = run_and_compare(run, iterations=4)
    assert len(reports) == 2
    for cos, rel in reports:
        assert cos >= 0.9999 and rel < 1e-3, (cos, rel)


class NoisyRefinedClassifier(RefinedClassifierProblem):
    """W2 that draws its latents inside training_step — the anti-pattern."""

    def training_step(self, batch):
        return super().training_step({**batch, "z": torch.randn_like(batch["z"])})


class UnprotectedNoisyRefinedClassifier(NoisyRefinedClassifier):
    """The same, with the base class's per-batch RNG fork bypassed (plain Betty behaviour)."""

    def training_step_exec(self, batch):
        return CompatProblem.training_step_exec(self, batch)


def _swap_w2_class(run, cls):
    w2 = run.levels["w2"]
    w2.__class__ = cls
    return run


def test_noise_inside_training_step_is_made_safe_by_the_base_class():
    protected = run_and_compare(_swap_w2_class(build_run(*SMOOTH, "train.meta_every=2"), NoisyRefinedClassifier), 4)
    assert all(cos >= 0.999 for cos, _ in protected), protected


def test_noise_inside_training_step_corrupts_an_unprotected_level():
    unprotected = run_and_compare(_swap_w2_class(build_run(*SMOOTH, "train.meta_every=2"), UnprotectedNoisyRefinedClassifier), 4)
    assert min(cos for cos, _ in unprotected) < 0.9, unprotected


def test_meta_weight_net_hypergradient_matches_exact_reference():
    """Meta-Weight-Net's hops are exact by construction (see problems/mwn.py); this checks the wiring."""
    run = build_run("train.mode=vanilla", "train.loss=mwn")
    assert run.levels["w1"].config.type == "exact"
    assert [[p.name for p in path] for path in run.levels["mwn"].paths] == [["mwn", "w1", "mwn"]]
    reports = run_and_compare(run, iterations=3, level="mwn")
    assert len(reports) == 3 and all(cos >= 0.9999 and rel < 1e-3 for cos, rel in reports), reports
