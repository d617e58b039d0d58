"""Generators (vcgan, acgan, wacgan_gp), their objectives, latent truncation (fixed and learned) and
the GAN cost reducers (top-k, core-set, LeCam, DeCov), on tiny CPU models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mlo.config import GANConfig
from mlo.errors import ConfigError
from mlo.hypergradient import path_gradients
from mlo.losses import decov
from mlo.models import MetaHead, create_model
from mlo.models.gan.diffaugment import diffaugment
from mlo.models.gan.losses import (HINGE, JS, WASSERSTEIN, GANObjective, gradient_penalty, k_center, lecam_penalty,
                                   top_k_fraction, top_k_mean)
from mlo.models.gan.sampling import LearnedTruncation, truncate
from mlo.trainer import Phase, Trainer
from problems.base import frozen_statistics
from tests.conftest import SMOOTH, build_run
from tests.test_hypergradient import run_and_compare

GENERATORS = ("vcgan", "acgan", "wacgan_gp")


def adam_steps(problem) -> int:
    state = problem.optimizer.state[problem.trainable_parameters()[0]]
    return int(state["step"]) if state else 0


# ----- generators -------------------------------------------------------------------------------
@pytest.mark.parametrize("generator", GENERATORS)
def test_generator_trains_inside_end2end_and_follows_the_class(generator):
    run = build_run(f"gan.generator={generator}", "train.meta_every=2", "train.epochs=10")
    gen = run.levels["gen"]
    before = [p.detach().clone() for p in gen.trainable_parameters()]
    Trainer(run.engine, [Phase("end2end", 4)], progress=False).run()
    assert {n: adam_steps(p) for n, p in run.levels.items()} == {"disc": 4, "w1": 4, "gen": 2, "w2": 4, "meta": 2}
    assert all(torch.isfinite(rec["loss"]) for rec in (p.records for p in run.levels.values()))
    assert any(not torch.equal(a, b) for a, b in zip(before, gen.trainable_parameters()))
    ema = gen.ema.module.eval()
    z = torch.randn(1, ema.z_dim).repeat(3, 1)
    images = ema(z, torch.tensor([0, 5, 9]))
    assert images.shape == (3, *run.data.image_shape) and images.abs().max() <= 1
    assert not torch.allclose(images[0], images[1]) and not torch.allclose(images[1], images[2])


@pytest.mark.parametrize("mode,generator", [("sequential", "vcgan"), ("separate", "acgan"), ("mtl", "wacgan_gp"),
                                            ("adversarial", "acgan")])
def test_generators_run_in_the_other_generating_modes(mode, generator, tmp_path):
    run = build_run(f"train.mode={mode}", f"gan.generator={generator}", "gan.gan_pretrain_steps=2",
                    "train.meta_every=2")
    metrics = run.execute(tmp_path)
    assert np.isfinite(metrics["top1"]) and adam_steps(run.levels["gen"]) > 0


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("size", [8, 16, 32])
def test_dcgan_tables_per_resolution(generator, size):
    gan = create_model("gan", generator, image_shape=(3, size, size), num_classes=5, feature_dim=12,
                       cfg=GANConfig(gan_ch=4, z_dim=6, shared_dim=4))
    y = torch.tensor([0, 1, 4])
    images = gan.generator(torch.randn(3, 6), y)
    assert images.shape == (3, 3, size, size)
    out = gan.discriminator(images, y, MetaHead(12, 5))
    if gan.objective.auxiliary_classifier:
        assert out[0].shape == (3,) and out[1].shape == (3, 5)
    else:
        assert out.shape == (3,)


@pytest.mark.parametrize("generator", GENERATORS)
def test_unsupported_resolution_is_a_config_error(generator):
    with pytest.raises(ConfigError, match=f"{generator} has no DCGAN-style architecture for 64x64"):
        create_model("gan", generator, image_shape=(3, 64, 64), num_classes=3, feature_dim=8, cfg=GANConfig())


def test_vcgan_discriminator_takes_the_label_with_the_image():
    gan = create_model("gan", "vcgan", image_shape=(1, 8, 8), num_classes=4, feature_dim=8,
                       cfg=GANConfig(gan_ch=4, z_dim=8))
    x = torch.randn(1, 1, 8, 8).repeat(2, 1, 1, 1)
    scores = gan.discriminator(x, torch.tensor([0, 3]), MetaHead(8, 4))
    assert scores[0] != scores[1]
    assert gan.objective.adversarial is JS and not gan.objective.auxiliary_classifier


@pytest.mark.parametrize("generator", ["acgan", "wacgan_gp"])
def test_ac_discriminator_class_head_is_a(generator):
    """The adversarial score reads A's first layer; the class logits are A's output."""
    gan = create_model("gan", generator, image_shape=(1, 8, 8), num_classes=4, feature_dim=8,
                       cfg=GANConfig(gan_ch=4, z_dim=8))
    meta = MetaHead(8, 4)
    x = torch.randn(4, 1, 8, 8)
    gan.discriminator.eval()  # no spectral-norm power iteration between the two calls
    scores, logits = gan.discriminator(x, torch.zeros(4, dtype=torch.long), meta)
    assert torch.allclose(logits, meta(gan.discriminator.body(x)), atol=1e-6)
    grads = torch.autograd.grad(scores.sum(), list(meta.fc1.parameters()), retain_graph=True)
    assert all(g.abs().sum() > 0 for g in grads)
    grads = torch.autograd.grad(logits.pow(2).sum(), list(meta.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)


# ----- objectives -------------------------------------------------------------------------------
class LinearCritic(nn.Module):
    """``D(x) = w · x + b``: its input gradient is w everywhere, so the penalty is ``(‖w‖ − 1)²``."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 1)

    def forward(self, x, y):
        return self.linear(x.flatten(1)).squeeze(1)


def test_gradient_penalty_of_a_linear_critic_is_closed_form():
    critic = LinearCritic(12)
    real, fake, y = torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2), torch.zeros(5, dtype=torch.long)
    mix = torch.rand(5)
    w = critic.linear.weight
    penalty = gradient_penalty(lambda x: critic(x, y), real, fake, mix)
    assert torch.isclose(penalty, (w.norm() - 1) ** 2, rtol=1e-5)
    (grad,) = torch.autograd.grad(penalty, w)  # the penalty trains the critic: double backward
    assert torch.allclose(grad, 2 * (w.norm() - 1) * w / w.norm(), rtol=1e-4)
    objective = GANObjective(WASSERSTEIN, gp_weight=10.0)
    loss = objective.discriminator_loss(critic, real, y, fake, y, {"gp_mix": mix}).loss
    expected = critic(fake, y).mean() - critic(real, y).mean() + 10.0 * (w.norm() - 1) ** 2
    assert torch.isclose(loss, expected, rtol=1e-5)


def test_gp_coefficients_are_drawn_with_the_batch_so_the_step_is_pure():
    run = build_run("gan.generator=wacgan_gp", "gan.gan_pretrain_steps=1")
    Trainer(run.engine, run.trainer.phases[:1], progress=False).run()
    disc = run.levels["disc"]
    mix = disc.cur_batch["loss_noise"]["gp_mix"]
    assert mix.shape == (len(disc.cur_batch["y"]),) and ((mix >= 0) & (mix <= 1)).all()
    assert torch.equal(disc.training_step_exec(disc.cur_batch), disc.training_step_exec(disc.cur_batch))


def test_hinge_objective_is_biggans():
    real, fake, y = torch.randn(6), torch.randn(6), torch.zeros(6, dtype=torch.long)
    D = lambda x, y: x  # noqa: E731  (scores are the inputs)
    out = GANObjective(HINGE).discriminator_loss(D, real, y, fake, y, {})
    assert torch.equal(out.loss, F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    assert torch.equal(GANObjective(HINGE).generator_loss(D, fake, y).per_sample.mean(), -fake.mean())


def test_auxiliary_classifier_adds_the_class_cross_entropy_of_real_and_fake():
    real_scores, fake_scores, logits = torch.randn(4), torch.randn(4), torch.randn(4, 3)
    y = torch.tensor([0, 2, 1, 2])
    D = lambda x, y: (x[:, 0], x[:, 1:])  # noqa: E731  (an "image" holds its score and logits)
    real, fake = torch.cat([real_scores[:, None], logits], 1), torch.cat([fake_scores[:, None], 2 * logits], 1)
    objective = GANObjective(JS, auxiliary_classifier=True)
    loss = objective.discriminator_loss(D, real, y, fake, y, {}).loss
    expected = (F.softplus(-real_scores).mean() + F.softplus(fake_scores).mean() + F.cross_entropy(logits, y)
                + F.cross_entropy(2 * logits, y))
    assert torch.isclose(loss, expected)
    per_sample = objective.generator_loss(D, fake, y).per_sample
    assert torch.allclose(per_sample, F.softplus(-fake_scores) + F.cross_entropy(2 * logits, y, reduction="none"))


def test_discriminator_sees_real_and_fake_images_in_one_batch():
    """A D with batch statistics normalises real and generated images together, in its own step and in
    G's loss when G passes real images along (only the fakes' scores count for G)."""
    bn = nn.BatchNorm1d(1, affine=False)
    D = lambda x, y: bn(x[:, None]).squeeze(1)  # noqa: E731
    real, fake, y = torch.randn(8) + 3, torch.randn(8) - 3, torch.zeros(8, dtype=torch.long)
    out = GANObjective(WASSERSTEIN).discriminator_loss(D, real, y, fake, y, {})
    joint = bn(torch.cat([real, fake])[:, None]).squeeze(1)
    assert torch.allclose(out.real_score, joint[:8]) and torch.allclose(out.fake_score, joint[8:])
    assert out.real_score.mean() > 0.5 > -0.5 > out.fake_score.mean()  # separately each would be centred at 0
    alone = GANObjective(WASSERSTEIN).generator_loss(D, fake, y).score
    with_real = GANObjective(WASSERSTEIN).generator_loss(D, fake, y, real=real, y_real=y).score
    assert alone.mean().abs() < 1e-5 and torch.allclose(with_real, joint[8:])


def test_meta_gradient_matches_exact_reference_with_wacgan_gp_losses():
    """Betty's darts hops through the Wasserstein, class and gradient-penalty terms of D and G
    (tests/smooth_models.py). Step 1e-4: at 1e-3 the finite differences of W2's gradient cross the
    ReLU kinks of A on some states (see README, *Measured*)."""
    run = build_run(*SMOOTH, "gan.generator=tiny_tanh_wacgan_gp", "train.meta_every=2", "train.darts_alpha=0.0001")
    assert run.levels["disc"].objective.gp_weight == 10.0
    reports = run_and_compare(run, iterations=4)
    assert len(reports) == 2 and all(cos >= 0.999 for cos, _ in reports), reports


def test_exact_hops_through_a_gradient_penalty_need_a_discriminator_without_batch_norm():
    """The exact hop through H differentiates WGAN-GP's penalty three times: fine through A as the last two
    layers and the DCGAN critic; refused where batch norm is on the way (torch has no third derivative)."""
    with pytest.raises(ConfigError, match="no third derivative of batch norm"):
        build_run("gan.generator=wacgan_gp", "train.hypergradient=exact", "model.meta=neck")
    run = build_run("gan.generator=wacgan_gp", "train.hypergradient=exact", "train.meta_every=2")
    meta, grads = run.levels["meta"], []
    meta.grad_callback = lambda: grads.append(torch.cat([p.grad.reshape(-1) for p in meta.trainable_parameters()]))
    Trainer(run.engine, [Phase("check", 2)], progress=False).run()
    assert len(grads) == 1 and grads[0].isfinite().all() and grads[0].abs().sum() > 0


# ----- truncation -------------------------------------------------------------------------------
def test_truncation_clips_values_and_keeps_signs():
    z = 3 * torch.randn(200)
    out = truncate(z, 1.5)
    assert out.abs().max() == 1.5 and torch.equal(out.sign(), z.sign())
    inside = z.abs() <= 1.5
    assert torch.equal(out[inside], z[inside]) and (out[~inside].abs() == 1.5).all()


def test_learned_truncation_starts_at_tau_and_gets_a_gradient_through_the_clipped_entries():
    trunc = LearnedTruncation(1.5)
    assert torch.isclose(trunc.tau, torch.tensor(1.5))
    z = torch.tensor([-3.0, -0.5, 0.2, 2.0, 4.0])
    (trunc(z) * torch.tensor([1.0, 1.0, 1.0, 2.0, 3.0])).sum().backward()
    # d/dτ = −1 + 2 + 3 for the clipped entries, times dτ/dρ = σ(ρ)
    assert torch.isclose(trunc.rho.grad, 4.0 * torch.sigmoid(trunc.rho.detach()))


def test_fixed_truncation_applies_to_w2s_generated_images():
    run = build_run("gan.truncation=0.5")
    z = 3 * torch.randn(10, 4)
    assert torch.equal(run.levels["w2"].latents(z), truncate(z, 0.5))
    assert "trunc" not in run.levels


def test_learned_truncation_is_an_upper_level_of_w2_and_learns():
    run = build_run("gan.truncation=1.0", "gan.learn_truncation=true", "gan.truncation_lr=0.05",
                    "train.meta_every=2", "train.epochs=10")
    trunc, w2 = run.levels["trunc"], run.levels["w2"]
    assert run.mode.u2l["trunc"] == ("w2",) and run.mode.l2u["w2"] == ("meta", "trunc")
    assert [[p.name for p in path] for path in trunc.paths] == [["trunc", "w2", "trunc"]]
    z = 3 * torch.randn(10, 4)
    assert torch.equal(w2.latents(z), truncate(z, trunc.module.tau))
    grads = []
    trunc.grad_callback = lambda: grads.append(trunc.module.rho.grad.item())
    Trainer(run.engine, [Phase("end2end", 8)], progress=False).run()
    assert adam_steps(trunc) == 4 and len(grads) == 4 and all(g != 0 for g in grads)
    assert not torch.isclose(trunc.module.tau, torch.tensor(1.0))


def test_learned_truncation_gradient_matches_exact_reference_and_has_a_hypergradient():
    run = build_run(*SMOOTH, "gan.truncation=1.0", "gan.learn_truncation=true", "train.meta_every=2")
    reports = run_and_compare(run, iterations=6, level="trunc")
    assert len(reports) == 3 and all(total >= 0.9999 and hyper >= 0.999 for total, hyper in reports), reports
    grads = path_gradients(run.levels["trunc"], kind="exact")
    assert set(grads) == {"direct", "trunc>w2>trunc"}
    assert grads["trunc>w2>trunc"][0].abs() > 0  # W2's response to τ enters the gradient


# ----- cost reducers ----------------------------------------------------------------------------
def test_top_k_keeps_the_highest_scored_fakes():
    per_sample = torch.arange(6.0)
    scores = torch.tensor([0.1, 5.0, -1.0, 3.0, 2.0, 0.0])
    assert top_k_mean(per_sample, scores, 0.5) == (1 + 3 + 4) / 3
    assert top_k_mean(per_sample, scores, 1.0) == per_sample.mean()
    assert top_k_mean(per_sample, scores, 0.0) == 1.0
    assert [top_k_fraction(s, 0.5, 0.25) for s in range(4)] == [1.0, 0.5, 0.25, 0.25]


def test_generator_step_uses_the_annealed_top_k():
    run = build_run("gan.topk_min_fraction=0.25", "gan.topk_decay=0.5", "gan.gan_pretrain_steps=3")
    Trainer(run.engine, run.trainer.phases[:1], progress=False).run()
    gen = run.levels["gen"]
    batch = gen.cur_batch
    assert batch["topk_fraction"] == 0.25  # third generator step: 0.5², then the floor
    with frozen_statistics(gen.graph_modules):
        out = gen.gan_loss(gen.module(batch["z"], batch["y"]), batch)
        k = len(batch["y"]) // 4
        assert torch.isclose(gen.training_step(batch), out.per_sample[out.score.topk(k).indices].mean())
        assert not torch.isclose(gen.training_step(batch), out.per_sample.mean())


def test_k_center_picks_the_farthest_points():
    points = torch.tensor([[0.0], [1.0], [10.0], [11.0], [5.0]])
    assert k_center(points, 3).tolist() == [0, 3, 4]  # 0, then 11 (farthest), then 5 (5 from both)


def test_core_set_batch_of_the_discriminator():
    run = build_run("gan.coreset_factor=2")
    disc = run.levels["disc"]
    assert disc.train_data_loader[0].batch_size == 2 * disc.batch_size
    disc.batch_size = 3
    x = torch.tensor([0.0, 0.1, 1.0, -1.0])[:, None, None, None].expand(4, 1, 8, 8)
    batch = disc.prepare_batch((x, torch.arange(4)))
    assert batch["y"].tolist() == [0, 2, 3] and batch["z"].shape[0] == 3


def test_decov_is_half_the_squared_off_diagonal_covariance():
    features = torch.randn(7, 4)
    cov = torch.from_numpy(np.cov(features.numpy().T, bias=True)).float()
    off_diagonal = cov - torch.diag(cov.diagonal())
    assert torch.isclose(decov(features), 0.5 * off_diagonal.pow(2).sum())
    uncorrelated = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert decov(uncorrelated) == 0


def test_decov_is_added_to_w2s_loss_on_the_features_of_generated_images():
    run = build_run("train.decov_weight=50", "train.meta_every=2")
    Trainer(run.engine, [Phase("end2end", 1)], progress=False).run()
    w2 = run.levels["w2"]
    batch = w2.cur_batch
    with_decov = w2.training_step_exec(batch)
    w2.decov_weight = 0.0
    without = w2.training_step_exec(batch)
    n = len(batch["y"])
    with frozen_statistics(w2.graph_modules), torch.no_grad():
        generated, classes, *_ = w2.generate(batch)
        _, features = w2.per_sample_loss(torch.cat([batch["x"], generated]), torch.cat([batch["y"], classes]),
                                         batch["progress"], real=n, with_features=True)
    assert torch.isclose(with_decov - without, 50 * decov(features[n:]), rtol=1e-4)


def test_lecam_penalty_formula():
    real, fake = torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 0.0])
    assert lecam_penalty(real, fake, torch.tensor(0.5), torch.tensor(-0.5)) == (1.5 ** 2 + 2.5 ** 2) / 2 + (
        1.5 ** 2 + 0.5 ** 2) / 2


def test_lecam_anchors_follow_their_ema_and_move_only_in_ds_own_step():
    # frozen GAN weights (learning rates 0, no spectral norm), so a step's scores can be recomputed after it
    run = build_run("gan.generator=wacgan_gp", "gan.d_lr=0", "gan.g_lr=0", "gan.lecam_weight=1",
                    "gan.lecam_decay=0.9", "gan.gan_pretrain_steps=3")
    disc = run.levels["disc"]
    pretrain = run.trainer.phases[0]
    expected = torch.zeros(2)
    for _ in range(3):
        Trainer(run.engine, [Phase("step", 1, leaves=pretrain.leaves, unroll=pretrain.unroll)], progress=False).run()
        assert torch.allclose(disc.lecam_anchors, expected)
        batch = disc.cur_batch
        with frozen_statistics(disc.graph_modules):
            with torch.no_grad():
                fake = disc.gen.module(batch["z"], batch["y"])
            out = disc.objective.discriminator_loss(disc, diffaugment(batch["x"], batch["aug_real"]), batch["y"],
                                                    diffaugment(fake, batch["aug_fake"]), batch["y"],
                                                    batch["loss_noise"])
        scores = torch.stack([out.real_score.mean(), out.fake_score.mean()]).detach()
        assert torch.allclose(disc.pending_scores, scores, atol=1e-6)
        weights = disc.trainable_parameters()
        saved = [p.detach().clone() for p in weights]
        with torch.no_grad():  # a hop re-evaluates the step at perturbed weights: that moves nothing
            torch._foreach_mul_(weights, 1.5)
        disc.training_step_exec(batch)
        with torch.no_grad():
            torch._foreach_copy_(weights, saved)
        assert torch.allclose(disc.lecam_anchors, expected) and torch.allclose(disc.pending_scores, scores, atol=1e-6)
        expected = 0.9 * expected + 0.1 * scores
    state = disc.level_state()
    assert torch.equal(state["lecam_anchors"], disc.lecam_anchors)
    fresh = build_run("gan.generator=wacgan_gp", "gan.lecam_weight=1", "gan.gan_pretrain_steps=3").levels["disc"]
    fresh.load_level_state(state)
    assert torch.equal(fresh.lecam_anchors, disc.lecam_anchors) and torch.equal(fresh.pending_scores, disc.pending_scores)


# ----- options that would do nothing are refused ------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (("train.mode=vanilla", "gan.lecam_weight=0.1"), "gan.lecam_weight acts on the GAN"),
    (("train.mode=sequential", "train.decov_weight=1"), "train.decov_weight acts on the features"),
    (("train.mode=vanilla", "gan.truncation=1"), "gan.truncation truncates the latents"),
    (("gan.learn_truncation=true",), "gan.learn_truncation: needs gan.truncation"),
    (("train.mode=sequential", "gan.truncation=1", "gan.learn_truncation=true"), "use a fixed gan.truncation"),
    (("train.adversarial_lambda=2",), "train.adversarial_lambda applies to train.mode=adversarial only"),
    (("gan.gp_weight=5",), "gan.gp_weight: gan.generator=biggan has no gradient penalty"),
    (("gan.generator=vcgan", "model.tie_encoders=true"), "vcgan feeds the label to D's input"),
])
def test_idle_or_impossible_options_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_run(*overrides)


def test_the_generators_moving_average_is_torchs_averaged_model_with_warm_up():
    """The EMA update counts on the host (no wait for the device per G step) and computes what torch's
    AveragedModel does with the TF-style warm-up: a copy first, then lerp by 1 − min(decay, (1+n)/(10+n))."""
    from torch.optim.swa_utils import AveragedModel

    from problems.base import unwrap
    run = build_run("gan.ema_decay=0.9")
    gen = run.levels["gen"]
    module = unwrap(gen.module)

    def warm_up(averaged, current, n):
        if not torch.is_floating_point(averaged[0]):
            torch._foreach_copy_(averaged, current)
            return
        n = float(n)
        torch._foreach_lerp_(averaged, current, 1.0 - min(0.9, (1.0 + n) / (10.0 + n)))

    reference = AveragedModel(module, multi_avg_fn=warm_up, use_buffers=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        gen.update_ema()
        reference.update_parameters(module)
    assert gen.ema_count == 5 and int(gen.ema.n_averaged) == 5
    for a, b in zip(gen.ema.state_dict().values(), reference.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
