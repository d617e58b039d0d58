"""Hypergradients: each hop carries the step size of the level it differentiates through (closed forms on
chains of quadratics with SGD), the one-sweep traversal equals the path-by-path sum, and the meta
level's gradient on the real end-to-end graph equals an exact reference written here, path by path."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mlo.betty_compat import CompatProblem
from mlo.graph import build_engine
from mlo.hypergradient import path_gradients, twice_differentiable
from mlo.trainer import Phase, Trainer
from problems import LevelProblem, RefinedClassifierProblem, level_config
from tests.conftest import SMOOTH, build_run

FIVE_PATHS = {"meta>w1>meta", "meta>w2>w1>meta", "meta>w2>meta", "meta>w2>gen>meta", "meta>w2>gen>disc>meta"}


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _cosine(a, b) -> float:
    a, b = a.double(), b.double()
    return (a @ b / (a.norm() * b.norm())).item()


# ----- closed forms -----------------------------------------------------------------------------
class Vector(nn.Module):
    def __init__(self, values):
        super().__init__()
        self.x = nn.Parameter(torch.as_tensor(values, dtype=torch.float64))


class Quadratic(LevelProblem):
    """A level whose parameters are one vector x and whose loss is a quadratic of x and the levels it reads."""

    def __init__(self, name, values, loss, lr, kind, scheduler=None, unroll=1):
        module = Vector(values)
        optimizer = torch.optim.SGD(module.parameters(), lr=lr)
        super().__init__(name, level_config(unroll_steps=unroll, hypergradient=kind, darts_alpha=1e-4), module,
                         optimizer, scheduler(optimizer) if scheduler else None)
        self.loss = loss

    def prepare_batch(self, data):
        return {}

    def training_step(self, batch):
        return self.loss(self)


def _x(level):
    return level.module.x


def _chain(kind: str, levels: int):
    """Two levels (``a`` reads ``x1``, ``x1`` reads ``a``) or three (``a`` reads ``x1``, ``x1`` reads ``x2``,
    ``x2`` reads ``a``); SGD inner steps, x1's step size decayed by a scheduler after its first step."""
    g = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    B1, B2, t = rand(4, 3), rand(3, 2), rand(4)
    decay = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** min(step, 1))  # noqa: E731
    if levels == 2:
        B1 = rand(4, 2)
        x1 = Quadratic("x1", rand(4), lambda s: 0.5 * _x(s) @ _x(s) - _x(s) @ B1 @ _x(s.a), 0.3, kind, decay)
        problems, u2l, l2u = [x1], {"a": ["x1"]}, {"x1": ["a"]}
    else:
        x1 = Quadratic("x1", rand(4), lambda s: 0.5 * _x(s) @ _x(s) - _x(s) @ B1 @ _x(s.x2), 0.3, kind, decay)
        x2 = Quadratic("x2", rand(3), lambda s: 0.5 * _x(s) @ _x(s) - _x(s) @ B2 @ _x(s.a), 0.2, kind)
        problems, u2l, l2u = [x2, x1], {"a": ["x2"]}, {"x2": ["x1"], "x1": ["a"]}
    a = Quadratic("a", rand(2), lambda s: 0.5 * (_x(s.x1) - t) @ (_x(s.x1) - t) + 0.25 * _x(s) @ _x(s), 0.1, kind)
    engine = build_engine(problems + [a], u2l, l2u)
    return engine, (B1, B2, t)


@pytest.mark.parametrize("levels", [2, 3])
@pytest.mark.parametrize("kind", ["exact", "darts", "first_order"])
def test_hypergradient_of_a_chain_of_quadratics_is_the_closed_form(kind, levels):
    """One-step unrolled: ``x1' = x1 − η1 ∇L1``, so ``d x1'/d x2 = η1 B1`` and ``d x2'/d a = η2 B2``.
    Two levels: ``∇_a = ½a + η1 B1ᵀ(x1 − t)``; three: ``½a + η2 B2ᵀ η1 B1ᵀ (x1 − t)``; η after the scheduler."""
    engine, (B1, B2, t) = _chain(kind, levels)
    a, x1 = engine.a, engine.x1
    seen = []

    def check():
        eta1 = x1.optimizer.param_groups[0]["lr"]
        hyper = eta1 * B1.T @ (_x(x1).detach() - t)
        if levels == 3:
            hyper = engine.x2.optimizer.param_groups[0]["lr"] * B2.T @ hyper
        expected = 0.5 * _x(a).detach() + (0.0 if kind == "first_order" else hyper)
        seen.append((a.module.x.grad.clone(), expected, eta1))

    a.grad_callback = check
    Trainer(engine, [Phase("check", 3)], progress=False).run()
    assert [eta for *_, eta in seen] == [0.15, 0.15, 0.15]  # 0.3 halved by the scheduler after the first step
    for grad, expected, _ in seen:
        assert torch.allclose(grad, expected, rtol=1e-5, atol=0), (grad, expected)
    assert not torch.allclose(seen[0][1], 0.5 * _x(a).detach())  # the hypergradient is not negligible here


# ----- the sweep against the path-by-path sum -------------------------------------------------------
@pytest.mark.parametrize("kind", ["exact", "darts"])
def test_one_sweep_equals_the_sum_over_paths(kind):
    """Four hops (each level perturbed once) give what nine path-by-path hops give: hops are linear."""
    run = build_run(*SMOOTH, "train.meta_every=2", f"train.hypergradient={kind}", "train.lr=0.05", "gan.g_lr=0.05",
                    "gan.d_lr=0.05")
    meta = run.levels["meta"]
    assert [level.name for level in meta.sweep_plan.order] == ["w2", "w1", "gen", "disc"]
    seen = []

    def check():
        swept = _flat([p.grad for p in meta.trainable_parameters()]).clone()
        paths = path_gradients(meta)
        assert set(paths) == {"direct"} | FIVE_PATHS
        summed = sum(_flat(v) for v in paths.values())
        direct = _flat(paths["direct"])
        seen.append((_cosine(swept - direct, summed - direct), ((swept - summed).norm() / (summed - direct).norm()).item()))

    meta.grad_callback = check
    Trainer(run.engine, [Phase("check", 4)], progress=False).run()
    assert len(seen) == 2
    for cos, rel in seen:
        assert cos >= 0.9999 and (kind == "darts" or rel < 1e-4), seen


def test_first_order_is_the_direct_gradient_alone():
    run = build_run("train.meta_every=2", "train.hypergradient=first_order")
    meta, seen = run.levels["meta"], []
    meta.grad_callback = lambda: seen.append((_flat([p.grad for p in meta.trainable_parameters()]).clone(),
                                              _flat(path_gradients(meta, kind="exact")["direct"])))
    Trainer(run.engine, [Phase("check", 2)], progress=False).run()
    assert len(seen) == 1 and torch.equal(*seen[0])


# ----- the real graph against an exact reference, path by path ---------------------------------------
def _exact_hop(v, curr, prev):
    """−∂/∂θ_prev (∇_θcurr L_curr · η_curr v), by double backward on the batch the engine used."""
    eta = curr.optimizer.param_groups[0]["lr"]
    with twice_differentiable():
        loss = curr.training_step_exec(curr.cur_batch)
        grads = torch.autograd.grad(loss, curr.trainable_parameters(), create_graph=True, allow_unused=True)
    dot = sum((g * u * eta).sum() for g, u in zip(grads, v) if g is not None)
    out = torch.autograd.grad(dot, prev.trainable_parameters(), allow_unused=True)
    return [-(o if o is not None else torch.zeros_like(p)) for o, p in zip(out, prev.trainable_parameters())]


def exact_meta_gradient(meta):
    """Direct gradient, and the direct gradient plus every path's chain of exact hops."""
    loss = meta.training_step_exec(meta.cur_batch)
    params = meta.trainable_parameters()
    direct = [g if g is not None else torch.zeros_like(p)
              for g, p in zip(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params)]
    total = direct
    for path in meta.paths:
        v = torch.autograd.grad(loss, path[1].trainable_parameters(), retain_graph=True, allow_unused=True)
        v = [g if g is not None else torch.zeros_like(p) for g, p in zip(v, path[1].trainable_parameters())]
        for i in range(1, len(path) - 1):
            v = _exact_hop(v, path[i], path[i + 1])
        total = [a + b for a, b in zip(total, v)]
    return _flat(direct), _flat(total)


def _set_hop_precision(run, precision: str) -> None:
    for level in run.levels.values():
        level.hop_precision = precision


def run_and_compare(run, iterations: int, level: str = "meta", hop_precision: str = "fp32"):
    """Per upper-level step: cosine of the engine's gradient to the exact reference (always in fp32), and
    cosine of its hypergradient part (total minus direct) to the reference's; ``hop_precision`` is the
    precision the engine's hops run in."""
    meta = run.levels[level]
    reports = []

    def check():  # Betty calls grad_callback after backward, before the optimizer step
        engine = _flat([p.grad for p in meta.trainable_parameters()]).clone()
        _set_hop_precision(run, "fp32")
        with torch.compiler.set_stance("force_eager"):  # compiled levels cannot differentiate twice
            direct, exact = exact_meta_gradient(meta)
        _set_hop_precision(run, hop_precision)
        reports.append((_cosine(engine, exact), _cosine(engine - direct, exact - direct)))

    meta.grad_callback = check
    _set_hop_precision(run, hop_precision)
    Trainer(run.engine, [Phase("check", iterations)], progress=False).run()
    return reports


def test_graph_has_the_five_paths():
    run = build_run(*SMOOTH, "train.meta_every=2")
    paths = {">".join(p.name for p in path) for path in run.levels["meta"].paths}
    assert paths == FIVE_PATHS


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_hops_match_the_exact_reference_on_the_default_networks(seed):
    """The default hop type on the default networks (ReLU CNN, BigGAN, A as the last two layers)."""
    run = build_run("train.meta_every=2", f"run.seed={seed}")
    reports = run_and_compare(run, iterations=6)
    assert len(reports) == 3
    for total, hyper in reports:
        assert total >= 0.99 and hyper >= 0.99, reports


@pytest.mark.parametrize("budget", ["squared", "score"])
def test_default_hops_match_the_exact_reference_with_the_other_budgets(budget):
    """The generated weights reach A and W1 through p: with Eq. 4's keep-weights and with the score function."""
    run = build_run("train.meta_every=2", f"train.gen_budget={budget}")
    reports = run_and_compare(run, iterations=4)
    assert len(reports) == 2 and all(total >= 0.99 and hyper >= 0.99 for total, hyper in reports), reports


@pytest.mark.parametrize("overrides", [
    ("run.seed=0",), ("run.seed=1",), ("run.seed=2",),
    # under bf16 autocast the hops (and meta's own step, where the hypergradient starts) run in fp32
    ("train.precision=bf16",),
    # torch.compile (aot_eager: the tracing of forward and backward that inductor builds on) through
    # the steps and hops: perturbed weights, frozen statistics
    ("run.compile=aot_eager",),
], ids=["seed0", "seed1", "seed2", "bf16_steps", "compiled"])
def test_finite_difference_hops_match_the_exact_reference_on_smooth_networks(overrides):
    """The paper's darts hops (tests/smooth_models.py: tanh networks, where finite differences cross no
    kink); the step sizes are raised so that the hypergradient is a sizeable part of the gradient."""
    run = build_run(*SMOOTH, "train.meta_every=2", "train.hypergradient=darts", "train.lr=0.05", "gan.g_lr=0.05",
                    "gan.d_lr=0.05", *overrides)
    reports = run_and_compare(run, iterations=4)
    assert len(reports) == 2
    for total, hyper in reports:
        assert total >= 0.999 and hyper >= 0.99, reports


def test_hops_in_bf16_measure_rounding():
    """The same run with the hops in bf16: a finite difference over darts_alpha in parameter norm is far
    below bf16's resolution."""
    run = build_run(*SMOOTH, "train.meta_every=2", "train.hypergradient=darts", "train.precision=bf16",
                    "train.lr=0.05", "gan.g_lr=0.05", "gan.d_lr=0.05")
    reports = run_and_compare(run, iterations=4, hop_precision="bf16")
    assert max(hyper for _, hyper in reports) < 0.9, reports


@pytest.mark.parametrize("kind", ["exact", "darts"])
def test_loss_scale_does_not_leak_into_the_hypergradient(kind):
    """fp16's loss scaling, with a real GradScaler on the CPU: Betty scales meta's loss, so its direct
    gradient and every hop carry the scale S; meta's scaler unscales their sum before the step."""
    run = build_run(*SMOOTH, "train.meta_every=2", f"train.hypergradient={kind}")
    for level in run.levels.values():
        level.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    meta = run.levels["meta"]
    seen = {}

    def check():
        seen["scaled"] = _flat([p.grad for p in meta.trainable_parameters()]).clone()
        seen["exact"] = exact_meta_gradient(meta)[1]

    def step_spy(*args, _step=meta.optimizer.step, **kwargs):  # the gradient the optimizer uses
        seen["stepped"] = _flat([p.grad for p in meta.trainable_parameters()]).clone()
        return _step(*args, **kwargs)

    meta.grad_callback = check
    meta.optimizer.step = step_spy
    Trainer(run.engine, [Phase("check", 2)], progress=False).run()
    exact = seen["exact"]
    assert _cosine(seen["scaled"], exact) >= 0.999
    assert seen["scaled"].norm() / exact.norm() == pytest.approx(2.0 ** 12, rel=1e-3)
    assert _cosine(seen["stepped"], exact) >= 0.999
    assert seen["stepped"].norm() / exact.norm() == pytest.approx(1.0, rel=1e-3)


class NoisyRefinedClassifier(RefinedClassifierProblem):
    """W2 that draws its latents inside training_step — the anti-pattern."""

    def training_step(self, batch):
        return super().training_step({**batch, "z": torch.randn_like(batch["z"])})


class UnprotectedNoisyRefinedClassifier(NoisyRefinedClassifier):
    """The same, with the base class's per-batch RNG fork bypassed (plain Betty behaviour)."""

    def training_step_exec(self, batch):
        return CompatProblem.training_step_exec(self, batch)


def _noisy_run(cls):
    run = build_run(*SMOOTH, "train.meta_every=2", "train.hypergradient=darts", "train.lr=0.05", "gan.g_lr=0.05",
                    "gan.d_lr=0.05")
    run.levels["w2"].__class__ = cls
    return run


def test_noise_inside_training_step_is_made_safe_by_the_base_class():
    protected = run_and_compare(_noisy_run(NoisyRefinedClassifier), 4)
    assert all(hyper >= 0.99 for _, hyper in protected), protected


def test_noise_inside_training_step_corrupts_an_unprotected_level():
    unprotected = run_and_compare(_noisy_run(UnprotectedNoisyRefinedClassifier), 4)
    assert min(hyper for _, hyper in unprotected) < 0.9, unprotected


def test_meta_weight_net_hypergradient_matches_exact_reference():
    """Meta-Weight-Net's hops are exact by construction (see problems/mwn.py); this checks the wiring."""
    run = build_run("train.mode=vanilla", "train.loss=mwn")
    assert run.levels["w1"].config.type == "exact"
    assert [[p.name for p in path] for path in run.levels["mwn"].paths] == [["mwn", "w1", "mwn"]]
    reports = run_and_compare(run, iterations=3, level="mwn")
    assert len(reports) == 3 and all(total >= 0.9999 and hyper >= 0.9999 for total, hyper in reports), reports


@pytest.mark.parametrize("hops", ["exact", "darts"])
def test_learned_allocation_gets_the_hypergradient_through_w2_and_moves_p(hops):
    """train.allocator=learned: p(s) = softmax(logits), an upper level of W2 whose loss does not read the
    logits (no direct gradient), so their whole gradient is the hop through W2's step, against the exact one."""
    # at the first step (p uniform) the logits' gradient is small, and a darts difference 1e-4 apart loses
    # about 2% of cosine to fp32 round-off on some CPUs (0.982 on one, >= 0.99 on another); at 1e-3 it is
    # 0.99996 and the truncation error on tanh networks is still negligible (1e-2 gives 1.0)
    smooth = (*SMOOTH, "train.darts_alpha=1e-3") if hops == "darts" else ()
    run = build_run(*smooth, "train.allocator=learned", "train.meta_every=2", f"train.hypergradient={hops}",
                    "train.lr=0.05", "train.alloc_lr=0.05")
    alloc, w2 = run.levels["alloc"], run.levels["w2"]
    assert run.mode.u2l["alloc"] == ("w2",) and "alloc" in run.mode.l2u["w2"]
    assert [[p.name for p in path] for path in alloc.paths] == [["alloc", "w2", "alloc"]]
    assert torch.allclose(w2.allocator(None), torch.full((run.data.num_classes,), 1 / run.data.num_classes))
    reports = run_and_compare(run, iterations=6, level="alloc")
    assert len(reports) == 3 and all(total >= 0.99 for total, _ in reports), reports
    grads = path_gradients(alloc, kind="exact")
    assert set(grads) == {"direct", "alloc>w2>alloc"} and grads["direct"][0].abs().max() == 0
    p = w2.allocator(None)
    assert not torch.allclose(p, torch.full_like(p, 1 / len(p))) and torch.isclose(p.sum(), torch.tensor(1.0))


def test_every_hop_type_the_config_offers_exists():
    import dataclasses

    from mlo.config import TrainConfig
    from mlo.hypergradient import HOPS
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}["hypergradient"]
    assert set(field.metadata["choices"]) == set(HOPS)


def test_a_with_weight_decay_and_class_balanced_training_batches_keeps_its_exact_hypergradient():
    """The extensions against A over-fitting the validation set: Adam's weight decay on A, and A's objective
    over each validation batch joined by as many class-balanced training images."""
    run = build_run("train.meta_weight_decay=0.01", "train.meta_data=val_and_train", "train.meta_every=2")
    meta = run.levels["meta"]
    assert meta.optimizer.param_groups[0]["weight_decay"] == 0.01
    run.engine.train()
    n, classes = run.cfg.data.val_batch_size, run.data.num_classes
    val, train = torch.zeros(classes), torch.zeros(classes)
    for _ in range(10):
        batch = meta.get_batch()
        assert len(batch["y"]) == 2 * n
        val += torch.bincount(batch["y"][:n], minlength=classes)
        train += torch.bincount(batch["y"][n:], minlength=classes)
    counts = torch.tensor(run.data.train_counts, dtype=torch.float)
    assert (val == val[0]).all()  # the validation batches: balanced
    assert train.std() / train.mean() < 0.3 < counts.std() / counts.mean()  # the training images: class-balanced
    reports = run_and_compare(build_run("train.meta_data=val_and_train", "train.meta_every=2"), iterations=4)
    assert len(reports) == 2 and all(total >= 0.99 and hyper >= 0.99 for total, hyper in reports), reports


def test_exact_hops_through_a_timm_vit_run_attention_on_a_twice_differentiable_backend():
    """A ViT's fused attention (flash, on the CPU as on CUDA) has no double backward: the exact hop runs
    attention on the math backend, and matches the exact reference on timm's tiny test ViT."""
    run = build_run("model.encoder=timm:test_vit", "data.image_size=32", "train.meta_every=2", "train.batch_size=8")
    assert run.cfg.model.encoders_tied  # a timm backbone: W1, W2 and H share it, each with a layer of its own
    encoder = run.levels["w1"].module.encoder.shared
    x = torch.randn(2, 1, 32, 32, requires_grad=True)
    (g,) = torch.autograd.grad(encoder(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for .*attention.* is not implemented"):
        torch.autograd.grad(g.sum(), x)  # what an exact hop would meet without the math backend
    reports = run_and_compare(run, iterations=4)
    assert len(reports) == 2 and all(total >= 0.99 and hyper >= 0.99 for total, hyper in reports), reports


@pytest.mark.parametrize("kind", ["darts", "exact"])
def test_hops_run_in_ieee_fp32_whatever_tf32_settings_a_user_made(kind):
    """On a GPU, cuDNN convolutions default to TF32 (10-bit mantissa), below a darts hop's resolution: hops
    switch TF32 off for convolutions and matmuls (and full matmul precision), and restore the settings after."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision, torch.get_float32_matmul_precision()
    run = build_run(*SMOOTH, "train.meta_every=2", f"train.hypergradient={kind}")
    w2 = run.levels["w2"]
    seen, step = [], w2.training_step

    def watch(batch):
        if not w2._own_step:  # a hop through W2
            seen.append((conv.fp32_precision, matmul.fp32_precision, torch.get_float32_matmul_precision()))
        return step(batch)

    w2.training_step = watch
    try:
        conv.fp32_precision, matmul.fp32_precision = "tf32", "tf32"
        torch.set_float32_matmul_precision("medium")
        Trainer(run.engine, [Phase("check", 2)], progress=False).run()
        assert seen and set(seen) == {("ieee", "ieee", "highest")}
        assert (conv.fp32_precision, matmul.fp32_precision, torch.get_float32_matmul_precision()) == (
            "tf32", "tf32", "medium")
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def test_a_meta_loss_in_chunks_has_the_gradient_of_the_whole_batch():
    """train.meta_chunk: A's validation batch forward-backward a chunk at a time (ImageNet-LT's memory); on
    networks without batch statistics the gradient, hypergradient included, is the whole batch's."""
    grads = {}
    for chunk in (None, 7):
        run = build_run(*SMOOTH, "train.meta_every=2", "data.val_batch_size=40", "data.val_per_class=4",
                        *([f"train.meta_chunk={chunk}"] if chunk else []))
        meta = run.levels["meta"]
        assert meta.chunk_size == chunk
        seen, forwards, step = [], [], meta.training_step
        meta.grad_callback = lambda meta=meta, seen=seen: seen.append(_flat([p.grad for p in meta.trainable_parameters()]).clone())

        def count(batch, meta=meta, forwards=forwards, step=step):
            if meta._own_step:
                forwards.append(len(batch["y"]))
            return step(batch)

        meta.training_step = count
        Trainer(run.engine, [Phase("check", 4)], progress=False).run()
        assert len(seen) == 2
        grads[chunk] = seen
        if chunk:
            chunks = meta.loss_chunks(meta.cur_batch)
            assert len(chunks) == 6 and sum(share for share, _ in chunks) == pytest.approx(1.0)
        # A's own loss is evaluated once a step: the chunks' forwards give both its value and its gradient
        assert forwards == ([7] * 5 + [5]) * 2 if chunk else forwards == [40, 40]
    for whole, chunked in zip(grads[None], grads[7]):
        assert torch.allclose(whole, chunked, rtol=1e-5, atol=1e-7)
