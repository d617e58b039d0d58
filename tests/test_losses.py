"""The long-tail losses against their formulas, their schedules, ISDA's online statistics, and
every loss in tiny runs of both modes, with training steps that stay pure for the hypergradients."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mlo.checkpoint import load_checkpoint, save_checkpoint
from mlo.config import help_text
from mlo.losses import LOSSES, class_balanced_weights, create_loss
from mlo.trainer import Phase, Trainer
from tests.conftest import SMOOTH, build_run
from tests.test_hypergradient import run_and_compare

COUNTS = torch.tensor([100.0, 40.0, 10.0, 3.0])


def _batch(n: int = 12, classes: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(n, classes, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def _log_p_target(logits, target):
    return logits.log_softmax(1)[torch.arange(len(target)), target]


def test_ce_is_the_negative_log_softmax_of_the_target():
    logits, y = _batch()
    assert torch.allclose(create_loss("ce", COUNTS)(logits, y, progress=0.0), -_log_p_target(logits, y))


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_against_its_formula(gamma):
    logits, y = _batch()
    p = _log_p_target(logits, y).exp()
    expected = -(1 - p) ** gamma * p.log()
    assert torch.allclose(create_loss("focal", COUNTS, focal_gamma=gamma)(logits, y, progress=0.0), expected, atol=1e-6)


def test_focal_with_gamma_zero_is_cross_entropy():
    logits, y = _batch()
    assert torch.allclose(create_loss("focal", COUNTS, focal_gamma=0.0)(logits, y, progress=0.0),
                          F.cross_entropy(logits, y, reduction="none"))


@pytest.mark.parametrize("beta", [0.9, 0.999, 0.9999])
def test_class_balanced_weights_are_inverse_effective_numbers_summing_to_c(beta):
    effective = [(1 - beta ** n) / (1 - beta) for n in COUNTS.tolist()]
    raw = [1 / e for e in effective]
    expected = torch.tensor([r / sum(raw) * len(raw) for r in raw])
    weights = class_balanced_weights(COUNTS, beta)
    assert torch.allclose(weights, expected, rtol=1e-5)
    assert math.isclose(weights.sum().item(), 4.0, rel_tol=1e-6)
    assert torch.allclose(class_balanced_weights(COUNTS, 0.0), torch.ones(4))  # β = 0: no re-weighting


def test_cb_is_class_weighted_cross_entropy():
    logits, y = _batch()
    weights = class_balanced_weights(COUNTS, 0.99)
    expected = weights[y] * F.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(create_loss("cb", COUNTS, cb_beta=0.99)(logits, y, progress=0.0), expected)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_balanced_softmax_is_cross_entropy_on_prior_adjusted_logits(tau):
    logits, y = _batch()
    prior = COUNTS / COUNTS.sum()
    expected = F.cross_entropy(logits + tau * prior.log(), y, reduction="none")
    loss = create_loss("balanced_softmax", COUNTS, logit_adjust_tau=tau)
    assert torch.allclose(loss(logits, y, progress=0.0), expected, atol=1e-6)


def test_ldam_margins_follow_n_to_the_minus_quarter_with_the_largest_at_the_rarest_class():
    margins = create_loss("ldam_drw", COUNTS).margins
    assert math.isclose(margins.max().item(), 0.5, rel_tol=1e-6) and margins.argmax().item() == 3
    assert torch.allclose(margins * COUNTS.pow(0.25), torch.full((4,), margins[0].item() * 100 ** 0.25))
    assert math.isclose(create_loss("ldam_drw", COUNTS, ldam_margin=0.3).margins.max().item(), 0.3, rel_tol=1e-6)


def test_ldam_drw_against_its_formula_and_the_deferred_reweighting_switch():
    logits, y = _batch()
    loss = create_loss("ldam_drw", COUNTS, ldam_margin=0.5, ldam_scale=30.0, drw_start=0.6, cb_beta=0.999)
    margins = 0.5 * COUNTS.pow(-0.25) / COUNTS.pow(-0.25).max()
    shifted = logits.clone()
    shifted[torch.arange(len(y)), y] -= margins[y]
    ldam = F.cross_entropy(30.0 * shifted, y, reduction="none")
    assert torch.allclose(loss(logits, y, progress=0.0), ldam)
    assert torch.allclose(loss(logits, y, progress=0.599), ldam)
    drw = class_balanced_weights(COUNTS, 0.999)[y] * ldam
    assert torch.allclose(loss(logits, y, progress=0.6), drw)
    assert torch.allclose(loss(logits, y, progress=1.0), drw)


def _feature_batches():
    """Batches of different sizes, some missing a class, with class-dependent means."""
    gen = torch.Generator().manual_seed(1)
    for n, classes in ((7, (0, 1)), (12, (0, 1, 2)), (1, (2,)), (9, (1, 2)), (15, (0, 1, 2))):
        y = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=gen)]
        yield torch.randn(n, 5, generator=gen) + 3 * y[:, None].float(), y


def test_isda_online_statistics_equal_those_of_all_samples_seen():
    loss = create_loss("isda", torch.tensor([30.0, 20.0, 10.0]), feature_dim=5)
    batches = list(_feature_batches())
    for features, y in batches:
        loss.update_statistics(features, y)
    features = torch.cat([f for f, _ in batches]).double()
    y = torch.cat([y for _, y in batches])
    for c in range(3):
        mine = features[y == c]
        assert loss.count[c].item() == len(mine)
        assert torch.allclose(loss.mean[c].double(), mine.mean(0), atol=1e-5)
        assert torch.allclose(loss.covariance[c].double(), torch.cov(mine.T, correction=0), atol=1e-5)


def test_isda_against_its_formula():
    features, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    loss = create_loss("isda", torch.tensor([30.0, 20.0, 10.0]), feature_dim=5, isda_lambda=0.7)
    for f, labels in _feature_batches():
        loss.update_statistics(f, labels)
    head = torch.nn.Linear(5, 3)
    logits, w = head(features), head.weight
    progress = 0.4
    expected = []
    for i in range(len(y)):
        sigma, wy = loss.covariance[y[i]], w[y[i]]
        aug = torch.stack([logits[i, j] + 0.5 * 0.7 * progress * (w[j] - wy) @ sigma @ (w[j] - wy) for j in range(3)])
        expected.append(F.cross_entropy(aug[None], y[i:i + 1]))
    got = loss(logits, y, progress=progress, head_weight=w)
    assert torch.allclose(got, torch.stack(expected), atol=1e-5)
    assert not torch.allclose(got, F.cross_entropy(logits, y, reduction="none"))  # the augmentation matters


def test_isda_with_zero_lambda_is_cross_entropy():
    features, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    head = torch.nn.Linear(5, 3)
    ce = F.cross_entropy(head(features), y, reduction="none")
    for strength, progress in ((0.0, 0.5), (0.5, 0.0)):
        loss = create_loss("isda", torch.tensor([30.0, 20.0, 10.0]), feature_dim=5, isda_lambda=strength)
        for f, labels in _feature_batches():
            loss.update_statistics(f, labels)
        assert torch.allclose(loss(head(features), y, progress=progress, head_weight=head.weight), ce)


@pytest.mark.parametrize("mode", ["end2end", "vanilla"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_trains_in_both_modes(name, mode):
    if name == "mwn" and mode != "vanilla":
        pytest.skip("Meta-Weight-Net is a vanilla-mode baseline (tests/test_modes.py checks the refusal)")
    run = build_run(f"train.loss={name}", f"train.mode={mode}", "train.meta_every=2")
    Trainer(run.engine, [Phase("tiny", 2)], progress=False).run()
    classifiers = [run.levels[n] for n in ("w1", "w2") if n in run.levels]
    assert len(classifiers) == (2 if mode == "end2end" else 1)
    for level in classifiers:
        records = level.pop_records()
        assert records["steps"].item() == 2 and math.isfinite(records["loss"].item())
        assert level.cur_batch["progress"] == 1 / run.ctx.total_steps  # the second step: 1 step done
    if "meta" in run.levels:
        assert run.levels["meta"].pop_records()["steps"].item() == 1  # its hops re-ran every loss


def test_isda_statistics_belong_to_each_classifier_and_count_real_training_images_only():
    run = build_run("train.loss=isda", "train.meta_every=2")
    Trainer(run.engine, [Phase("tiny", 3)], progress=False).run()
    w1, w2 = run.levels["w1"], run.levels["w2"]
    assert w1.loss_fn is not w2.loss_fn
    batch = run.cfg.train.batch_size
    for level in (w1, w2):  # the features of steps 1 and 2 are folded in; those of step 3 wait
        assert level.loss_fn.count.sum().item() == 2 * batch
        assert level.pending_features[0].shape[0] == batch
    assert not torch.allclose(w1.loss_fn.covariance, w2.loss_fn.covariance)


def test_re_evaluating_a_step_changes_no_loss_state():
    """What a hop does: the same batch again, with the level's state and value unchanged."""
    run = build_run("train.loss=isda", "train.mode=vanilla", "train.isda_lambda=50")
    Trainer(run.engine, [Phase("tiny", 3)], progress=False).run()
    w1 = run.levels["w1"]
    state = {k: v.clone() for k, v in w1.loss_fn.state_dict().items()}
    pending = w1.pending_features[0].clone()
    first = w1.training_step_exec(w1.cur_batch)
    assert torch.equal(first, w1.training_step_exec(w1.cur_batch))
    assert all(torch.equal(v, state[k]) for k, v in w1.loss_fn.state_dict().items())
    assert torch.equal(w1.pending_features[0], pending)


def test_isda_statistics_survive_a_checkpoint(tmp_path):
    def tiny_run():
        return build_run("train.loss=isda", "train.mode=vanilla", "train.isda_lambda=50")

    run = tiny_run()
    Trainer(run.engine, [Phase("tiny", 3)], progress=False).run()
    w1 = run.levels["w1"]
    save_checkpoint(tmp_path / "ckpt.pt", {"w1": w1.level_state()})
    resumed = tiny_run()
    resumed.levels["w1"].load_level_state(load_checkpoint(tmp_path / "ckpt.pt")["w1"])
    r1 = resumed.levels["w1"]
    for key, value in w1.loss_fn.state_dict().items():
        assert torch.equal(r1.loss_fn.state_dict()[key], value), key
    assert all(torch.equal(a, b) for a, b in zip(r1.pending_features, w1.pending_features))
    for r in (run, resumed):  # the next step folds the pending features in and trains identically
        Trainer(r.engine, [Phase("one more", 1)], progress=False).run()
    assert torch.equal(r1.loss_fn.covariance, w1.loss_fn.covariance)
    assert torch.equal(r1.pop_records()["loss"], w1.pop_records()["loss"])


@pytest.mark.parametrize("overrides", [
    ("train.loss=ldam_drw", "train.drw_start=0.03"),  # re-weighting starts at the third of four steps
    ("train.loss=isda", "train.isda_lambda=20"),      # λ ≈ 1 by the fourth step
])
def test_losses_keep_the_hypergradient_exact(overrides):
    run = build_run(*SMOOTH, "train.meta_every=2", *overrides)
    reports = run_and_compare(run, iterations=4)
    assert run.levels["w1"].cur_batch["progress"] > 0.03
    assert len(reports) == 2
    for cos, rel in reports:
        assert cos >= 0.999, (cos, rel)


def test_help_lists_every_loss_and_its_keys():
    loss_help = next(line for line in help_text().splitlines() if line.strip().startswith("train.loss="))
    for name in LOSSES:
        assert name in loss_help, name
    for key in ("focal_gamma", "cb_beta", "logit_adjust_tau", "ldam_margin", "ldam_scale", "drw_start", "isda_lambda"):
        assert f"train.{key}=" in help_text(), key
