"""Allocation p(s), class sampling and the binary Gumbel-softmax relaxation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from mlo.budget import (ClassStats, budget_weights, create_allocator, expected_keep, keep_weights, logistic_noise,
                        per_class_val_loss, sample_classes, temperature, uniform_noise)
from mlo.data.loaders import to_float
from tests.conftest import build_run


def _stats(loss, counts=None):
    loss = torch.as_tensor(loss, dtype=torch.float)
    counts = torch.as_tensor(counts if counts is not None else [1.0] * len(loss), dtype=torch.float)
    return ClassStats(val_loss=loss, val_acc=torch.zeros_like(loss), train_counts=counts)


def test_needs_allocation_is_proportional_to_per_class_loss():
    p = create_allocator("needs")(_stats([0.5, 1.0, 2.5]))
    assert torch.allclose(p, torch.tensor([0.125, 0.25, 0.625]))


def test_equal_and_reciprocal_allocations():
    s = _stats([0.5, 1.0, 2.5], counts=[100, 20, 5])
    assert torch.allclose(create_allocator("equal")(s), torch.full((3,), 1 / 3))
    inv = torch.tensor([1 / 100, 1 / 20, 1 / 5])
    assert torch.allclose(create_allocator("reciprocal")(s), inv / inv.sum())


def test_per_class_val_loss_matches_a_direct_computation():
    logits = torch.randn(30, 3)
    labels = torch.arange(30) % 3
    out = per_class_val_loss(logits, labels, 3)
    for c in range(3):
        mask = labels == c
        direct = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
        assert torch.allclose(out.val_loss[c], direct, atol=1e-6)
        assert out.val_acc[c] == (logits[mask].argmax(1) == c).float().mean()


def test_p_covers_the_whole_validation_set_for_a_fixed_w1():
    """W2's p(s) comes from its validation batch plus the remembered rest of the set: after one pass over
    the validation batches, p equals the allocation of W1's losses on the whole validation set."""
    run = build_run("data.val_per_class=8", "data.val_batch_size=20")  # 2 images a class per batch: 4 batches
    w1, w2 = run.levels["w1"], run.levels["w2"]
    run.engine.eval()  # a fixed W1 (its BN in evaluation mode)
    with torch.no_grad():  # spread the logits, so that images' losses differ
        run.levels["meta"].module.head.weight.mul_(30)
    loader = w2.train_data_loader[1]
    assert len(loader) == 4
    x_all, y_all = run.data.val_images, torch.as_tensor(run.data.val_labels)
    with torch.no_grad():
        full = per_class_val_loss(w1(to_float(x_all)), y_all, run.data.num_classes)
        full.train_counts = w2.train_counts
        expected = w2.allocator(full)
        batches = list(loader) + list(loader)[:1]
        for i, (x, y, idx) in enumerate(batches):
            w2._own_step = True  # as in W2's own step: the batch's losses go to the memory after it
            p, stats = w2.allocation(x, y, idx)
            w2._own_step = False
            if i == len(batches) - 1:
                assert torch.allclose(p, expected, atol=1e-6), (p, expected)
                assert torch.allclose(stats.val_loss, full.val_loss, atol=1e-5)
            elif i < 3:  # the memory does not cover the set yet: p is of the images seen so far
                assert not torch.allclose(stats.val_loss, full.val_loss, atol=1e-3)
            w2.val_memory.update(*w2.pending_val)
    assert w2.val_memory.seen.all()


def test_batch_terms_of_p_are_differentiable_and_the_memory_is_not():
    run = build_run("data.val_per_class=8", "data.val_batch_size=40")
    w2 = run.levels["w2"]
    run.engine.train()
    first, second = list(w2.train_data_loader[1])
    w2._own_step = True
    w2.allocation(*first)
    w2._own_step = False
    w2.val_memory.update(*w2.pending_val)
    p, stats = w2.allocation(*second)
    grads = torch.autograd.grad(stats.val_loss.sum(), run.levels["w1"].trainable_parameters(), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert not w2.val_memory.values.requires_grad


def test_straight_through_keep_weights_are_binary_with_the_relaxed_gradient():
    g = torch.Generator().manual_seed(4)
    p_o = torch.full((1000,), 0.3, requires_grad=True)
    noise = logistic_noise((1000,), g, "cpu")
    hard = keep_weights(p_o, noise, 0.5, "straight_through")
    relaxed = keep_weights(p_o, noise, 0.5)
    assert torch.allclose(hard.detach(), (relaxed > 0.5).float(), atol=1e-6)  # 0 or 1, up to an ulp
    assert 0.1 < (relaxed > 0.5).float().mean() < 0.5
    (g_hard,) = torch.autograd.grad(hard.sum(), p_o)
    (g_relaxed,) = torch.autograd.grad(relaxed.sum(), p_o)
    assert torch.allclose(g_hard, g_relaxed)


def test_sampled_class_frequencies_follow_p():
    p = torch.tensor([0.05, 0.15, 0.3, 0.5])
    g = torch.Generator().manual_seed(0)
    n = 40_000
    classes = sample_classes(p, uniform_noise((n, 4), g, "cpu"))
    observed = np.bincount(classes.numpy(), minlength=4)
    chi2 = stats.chisquare(observed, f_exp=(p * n).numpy())
    assert chi2.pvalue > 1e-3, (observed, chi2)
    assert np.allclose(observed / n, p.numpy(), atol=0.01)


@pytest.mark.parametrize("t", [5.0, 1.0, 0.1, 0.01])
def test_keep_probability_equals_p_at_any_temperature(t):
    g = torch.Generator().manual_seed(1)
    n = 40_000
    for p_o in (0.1, 0.4, 0.8):
        b = keep_weights(torch.full((n,), p_o), logistic_noise((n,), g, "cpu"), t)
        kept = (b > 0.5).float().mean().item()
        assert abs(kept - p_o) < 4 * np.sqrt(p_o * (1 - p_o) / n) + 1e-3, (t, p_o, kept)


def test_keep_weights_become_binary_as_temperature_goes_to_zero():
    g = torch.Generator().manual_seed(2)
    noise = logistic_noise((20_000,), g, "cpu")
    p_o = torch.full((20_000,), 0.3)
    undecided = [((keep_weights(p_o, noise, t) > 0.01) & (keep_weights(p_o, noise, t) < 0.99)).float().mean().item()
                 for t in (1.0, 0.1, 0.01, 0.001)]
    assert undecided == sorted(undecided, reverse=True)
    assert undecided[0] > 0.5 and undecided[-1] < 0.01


def test_temperature_anneals_exponentially():
    assert temperature(0.0, 1.0, 0.1) == pytest.approx(1.0)
    assert temperature(0.5, 1.0, 0.1) == pytest.approx(0.1 ** 0.5)
    assert temperature(1.0, 1.0, 0.1) == pytest.approx(0.1)
    assert temperature(3.0, 1.0, 0.1) == pytest.approx(0.1)


def test_gradients_flow_from_keep_weights_to_w1_and_a():
    run = build_run()
    w1, w2, meta = run.levels["w1"], run.levels["w2"], run.levels["meta"]
    run.engine.train()
    batch = w2.get_batch()
    p, _ = w2.allocation(batch["x_val"], batch["y_val"], batch["idx_val"])
    classes = sample_classes(p, batch["class_uniforms"])
    b = keep_weights(p[classes], batch["logistic"], batch["temperature"])
    b.sum().backward()
    for level in (w1, meta):
        grads = [q.grad for q in level.trainable_parameters() if q.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0, level.name
    assert all(q.grad is None for q in w2.trainable_parameters())  # b does not depend on W2


def test_w2_loss_reaches_w1_a_and_g():
    run = build_run()
    w2 = run.levels["w2"]
    run.engine.train()
    loss = w2.training_step(w2.get_batch())
    for name in ("w1", "meta", "gen", "w2"):
        params = run.levels[name].trainable_parameters()
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name


@pytest.mark.parametrize("t", [1.0, 0.3, 0.1])
def test_expected_keep_matches_monte_carlo_and_the_closed_form_at_t1(t):
    g = torch.Generator().manual_seed(3)
    n = 200_000
    p = torch.tensor([0.02, 0.1, 0.3, 0.7])
    expected = expected_keep(p, t)
    for i, p_o in enumerate(p):
        b = keep_weights(torch.full((n,), float(p_o)), logistic_noise((n,), g, "cpu"), t)
        assert abs(b.mean() - expected[i]) < 4 * b.std() / np.sqrt(n), (t, float(p_o))
    if t == 1.0:  # E[σ(logit p + L)] = r/(r−1) · (1 − ln r/(r−1)), r = p/(1−p)
        r = p.double() / (1 - p.double())
        assert torch.allclose(expected.double(), r / (r - 1) * (1 - torch.log(r) / (r - 1)), rtol=1e-4)
    assert torch.equal(expected_keep(p, t, "straight_through"), p)


@pytest.mark.parametrize("t", [1.0, 0.3, 0.1])
def test_the_counted_budget_gives_class_c_m_p_c_and_the_squared_one_m_p_c_times_its_keep_rate(t):
    """Σ b per class over M draws: M p_c with the counted budget (the paper's Table 3, sequential's count)
    at any temperature; M p_c E[b | p_c] with the squared one (M p_c² as T → 0)."""
    g = torch.Generator().manual_seed(4)
    m = 100_000
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    classes = sample_classes(p, uniform_noise((m, 4), g, "cpu"))
    noise = logistic_noise((m,), g, "cpu")
    for budget, target in (("counted", m * p), ("squared", m * p * expected_keep(p, t))):
        w = budget_weights(p, classes, noise, t, budget=budget)
        for c in range(4):
            per_draw = torch.where(classes == c, w, torch.zeros_like(w))  # class c's weight of each draw
            sd = per_draw.std() * np.sqrt(m)
            assert abs(per_draw.sum() - target[c]) < 4 * sd, (budget, t, c, float(per_draw.sum()), float(target[c]))
    if t == 0.1:
        squared = budget_weights(p, classes, noise, t, budget="squared")
        total = squared.sum() / m
        assert abs(total - (p ** 2).sum()) < 0.02  # all generated images together: about M Σ p²


def test_the_counted_budget_keeps_the_relaxed_gradient_class_by_class():
    """The counted weights differ from b_m by a positive constant per class (1/E[b | p_c], no gradient),
    so their gradient to p is the relaxed one's, class by class, divided by that constant."""
    g = torch.Generator().manual_seed(5)
    m = 512
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], requires_grad=True)
    classes = sample_classes(p, uniform_noise((m, 4), g, "cpu"))
    noise, losses = logistic_noise((m,), g, "cpu"), torch.rand(m, generator=g)
    (relaxed,) = torch.autograd.grad((budget_weights(p, classes, noise, 0.5, budget="squared") * losses).sum(), p)
    (counted,) = torch.autograd.grad((budget_weights(p, classes, noise, 0.5, budget="counted") * losses).sum(), p)
    assert torch.allclose(counted, relaxed / expected_keep(p, 0.5), rtol=1e-5)
    assert (torch.sign(counted) == torch.sign(relaxed)).all() and relaxed.abs().min() > 0


def test_end2end_weighs_generated_classes_by_the_counted_budget_by_default():
    run = build_run("train.mode=end2end")
    w2 = run.levels["w2"]
    assert w2.budget == "counted" and build_run("train.gen_budget=squared").levels["w2"].budget == "squared"
    run.engine.train()
    batch = w2.get_batch()
    _, classes, keep, p, _ = w2.generate(batch)
    assert torch.allclose(keep, budget_weights(p, classes, batch["logistic"], batch["temperature"]))


def test_the_score_budget_weighs_every_drawn_image_1_and_gives_p_the_expected_losss_gradient():
    """``score``: forward weights exactly 1 (class c gets its draws, M p_c in expectation, an effective sample
    size of M, where counted's 0-or-1/p weights give about M/C at low temperature); the gradient to p,
    averaged over draws, is that of the expected generated loss Σ_c p_c L_c, i.e. L itself."""
    g = torch.Generator().manual_seed(6)
    m = 200_000
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], requires_grad=True)
    per_class_loss = torch.tensor([0.2, 1.0, 2.0, 3.0])
    classes = sample_classes(p, uniform_noise((m, 4), g, "cpu"))
    noise = logistic_noise((m,), g, "cpu")
    w = budget_weights(p, classes, noise, 0.1, budget="score")
    assert torch.equal(w.detach(), torch.ones(m))
    (grad,) = torch.autograd.grad((w * per_class_loss[classes]).sum() / m, p)
    assert torch.allclose(grad, per_class_loss, rtol=0.03), grad

    def effective_fraction(weights):
        return float(weights.sum() ** 2 / (weights ** 2).sum() / m)

    counted = budget_weights(p, classes, noise, 0.1, budget="counted").detach()
    assert effective_fraction(w.detach()) == pytest.approx(1.0) and effective_fraction(counted) < 0.3
    assert build_run("train.gen_budget=score").levels["w2"].budget == "score"
