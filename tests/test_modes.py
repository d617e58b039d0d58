"""Every mode builds the levels, edges, allocator and phases it claims, on tiny data."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from scipy import stats

from experiments.modes import BUILT_IN
from experiments.phases import build_phases, pregenerate
from mlo.budget import ClassStats, WorstKAllocator, create_allocator, discount_by_quality
from mlo.data.loaders import make_loader, to_uint8
from mlo.gan_metrics import per_class_accuracy
from mlo.metrics import predict
from mlo.models.gan.sampling import generate
from mlo.trainer import Phase, Trainer
from problems import (AdversarialClassifierProblem, AdversarialGeneratorProblem, ClassifierProblem, RefinedClassifierProblem)
from problems.base import frozen_statistics, stateful_layers
from problems.multitask import MultiTaskGeneratorProblem
from problems.sequential import PregeneratedClassifierProblem
from tests.conftest import build_run

FAST = ("train.epochs=2", "gan.gan_pretrain_steps=4", "train.meta_every=2")


def wiring(run) -> dict:
    return {p.name: sorted(c.name for c in p.children) for p in run.engine.problems}


def adam_steps(problem) -> int:
    state = problem.optimizer.state[problem.trainable_parameters()[0]]
    return int(state["step"]) if state else 0


def test_end2end_graph():
    run = build_run(*FAST)
    assert wiring(run) == {"disc": [], "w1": [], "gen": ["disc"], "w2": ["gen", "w1"], "meta": ["w1", "w2"]}
    assert len(run.levels["meta"].paths) == 5
    assert isinstance(run.levels["w2"], RefinedClassifierProblem)
    assert [p.name for p in run.trainer.phases] == ["GAN pre-training", "end2end"]


def test_sequential_graph_phases_and_no_feedback_into_w1_or_g(tmp_path):
    run = build_run("train.mode=sequential", *FAST)
    assert isinstance(run.levels["w2"], PregeneratedClassifierProblem)
    assert wiring(run) == {"w1": [], "disc": [], "gen": ["disc"], "w2": []}
    assert [p.name for p in run.trainer.phases] == ["W1", "GAN pre-training", "GAN", "W2"]
    run.run_dir = tmp_path
    run.trainer.run()
    total = run.ctx.total_steps
    steps = {n: adam_steps(p) for n, p in run.levels.items()}
    # W1 and W2 each train for their epochs; the GAN gets end2end's updates (pre-training, then G every 2)
    assert steps == {"w1": total, "disc": 4 + total, "gen": 4 + total // 2, "w2": total}
    w2 = run.levels["w2"]
    run.engine.train()
    loss = w2.training_step(w2.get_batch())
    for name in ("w1", "gen"):
        grads = torch.autograd.grad(loss, run.levels[name].trainable_parameters(), retain_graph=True, allow_unused=True)
        assert all(g is None or not g.any() for g in grads), name
    assert run.pregenerated["generated"].sum() == run.ctx.allocator.images_per_epoch(run.data.train_counts)


def test_separate_trains_the_gan_first_and_freezes_it():
    run = build_run("train.mode=separate", *FAST)
    assert wiring(run) == {"disc": [], "w1": [], "gen": ["disc"], "w2": ["w1"], "meta": ["w1", "w2"]}
    assert {">".join(p.name for p in path) for path in run.levels["meta"].paths} == {
        "meta>w1>meta", "meta>w2>w1>meta", "meta>w2>meta"}
    gan_phases, mlo_phase = run.trainer.phases[:2], run.trainer.phases[2]
    Trainer(run.engine, gan_phases, progress=False).run()
    generator = [p.detach().clone() for p in run.levels["gen"].trainable_parameters()]
    Trainer(run.engine, [mlo_phase], progress=False).run()
    assert all(torch.equal(a, b) for a, b in zip(generator, run.levels["gen"].trainable_parameters()))
    total = run.ctx.total_steps
    assert adam_steps(run.levels["w2"]) == total and adam_steps(run.levels["meta"]) == total // 2


def test_mtl_generator_objective_includes_w2s_loss():
    run = build_run("train.mode=mtl", *FAST)
    gen = run.levels["gen"]
    assert isinstance(gen, MultiTaskGeneratorProblem) and "meta" not in run.levels
    assert wiring(run) == {"disc": [], "w1": [], "gen": ["disc"], "w2": ["gen", "w1"]}
    run.engine.train()
    batch = gen.get_batch()
    with_classifier = gen.training_step(batch)
    gen.classifier_weight = 0.0
    gan_only = gen.training_step(batch)
    assert not torch.isclose(with_classifier, gan_only)
    grads = torch.autograd.grad(with_classifier, run.levels["w2"].trainable_parameters(), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)  # W2's loss really reads G's images
    Trainer(run.engine, [Phase("mtl", 4)], progress=False).run()
    assert adam_steps(gen) == 2 and adam_steps(run.levels["w2"]) == 4


def test_vanilla_has_one_plain_classifier():
    run = build_run("train.mode=vanilla")
    assert type(run.levels["w1"]) is ClassifierProblem and wiring(run) == {"w1": []}


def test_meta_weight_net_is_a_two_level_vanilla_baseline():
    run = build_run("train.mode=vanilla", "train.loss=mwn")
    assert wiring(run) == {"w1": [], "mwn": ["w1"]}
    weights_before = [p.detach().clone() for p in run.levels["mwn"].trainable_parameters()]
    Trainer(run.engine, [Phase("mwn", 3)], progress=False).run()
    assert adam_steps(run.levels["w1"]) == 3 and adam_steps(run.levels["mwn"]) == 3
    assert any(not torch.equal(a, b) for a, b in zip(weights_before, run.levels["mwn"].trainable_parameters()))


def test_meta_weight_net_only_in_vanilla():
    from mlo.errors import ConfigError
    with pytest.raises(ConfigError, match="train.loss=mwn is Meta-Weight-Net, which weighs the samples of a mode's one classifier"):
        build_run("train.loss=mwn")


def test_adversarial_generator_plays_against_critic_and_classifier(tmp_path):
    run = build_run("train.mode=adversarial", *FAST)
    gen, w2 = run.levels["gen"], run.levels["w2"]
    assert isinstance(gen, AdversarialGeneratorProblem) and isinstance(w2, AdversarialClassifierProblem)
    assert wiring(run) == {"w2": [], "disc": [], "gen": ["disc", "w2"]}
    assert all(not p.paths for p in run.engine.problems)  # first order: no hypergradients
    assert gen.objective.adversarial.name == run.levels["disc"].objective.adversarial.name == "wasserstein"
    run.engine.train()
    batch = gen.get_batch()
    loss = gen.training_step_exec(batch)
    gen.adversarial_lambda = 0.0  # what is left is −ℓ(C(G(z, y)), y): G maximises the classifier's loss
    with torch.no_grad(), frozen_statistics(gen.graph_modules):
        classifier_loss = torch.nn.functional.cross_entropy(w2(gen.module(batch["z"], batch["y"])), batch["y"])
    assert torch.isclose(gen.training_step_exec(batch), -classifier_loss)
    for level in ("disc", "w2"):
        grads = torch.autograd.grad(loss, run.levels[level].trainable_parameters(), retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads), level  # G's loss reads both
    gen.adversarial_lambda = 1.0
    metrics = run.execute(tmp_path)
    total = run.ctx.total_steps
    assert {n: adam_steps(p) for n, p in run.levels.items()} == {"w2": total, "disc": total, "gen": total}
    assert metrics["mode"] == "adversarial" and metrics["before"] is None and metrics["final_classifier"] == "w2"
    assert (tmp_path / "metrics.json").exists()


def test_every_built_in_mode_is_covered_here():
    assert {m.name for m in BUILT_IN} == {"end2end", "sequential", "sequential_real", "separate", "mtl", "vanilla",
                                          "vanilla_meta", "adversarial"}


def _stats(acc, loss, counts):
    t = lambda v: torch.tensor(v, dtype=torch.float)
    return ClassStats(val_loss=t(loss), val_acc=t(acc), train_counts=t(counts))


def test_budgets_of_the_allocators():
    counts = [100, 50, 20, 10, 5]
    assert create_allocator("needs", gen_per_real=1.0).images_per_epoch(counts) == 185
    assert create_allocator("equal", gen_per_real=0.5).images_per_epoch(counts) == 92
    worstk = create_allocator("worstk", k=2, fraction=0.5)
    assert worstk.images_per_epoch(counts) == round(0.5 * (10 + 5))  # before statistics: the rarest
    s = _stats(acc=[0.2, 0.9, 0.9, 1.0, 1.0], loss=[2.0, 0.5, 0.6, 0.1, 0.1], counts=counts)
    assert worstk.images_per_epoch(counts, s) == round(0.5 * (100 + 20))  # the worst: classes 0 and 2


def test_worstk_touches_only_the_k_worst_classes():
    alloc = WorstKAllocator(k=2, fraction=0.5)
    s = _stats(acc=[0.5, 0.9, 0.5, 1.0, 0.8], loss=[1.0, 0.2, 1.5, 0.1, 0.3], counts=[100, 50, 20, 10, 5])
    p = alloc(s)
    assert (p > 0).nonzero().flatten().tolist() == [0, 2]
    assert torch.allclose(p[[0, 2]], torch.tensor([100.0, 20.0]) / 120)


def test_sequential_generation_follows_the_allocator():
    run = build_run("train.mode=sequential", "train.allocator=equal", "train.gen_per_real=10")
    pregenerate(run)
    counts = run.pregenerated["generated"].numpy()
    assert counts.sum() == 10 * sum(run.data.train_counts)
    assert stats.chisquare(counts).pvalue > 1e-3  # equal shares
    run = build_run("train.mode=sequential", "train.allocator=reciprocal", "train.gen_per_real=10")
    pregenerate(run)
    counts = run.pregenerated["generated"].numpy()
    inv = 1 / np.asarray(run.data.train_counts, dtype=float)
    assert stats.chisquare(counts, counts.sum() * inv / inv.sum()).pvalue > 1e-3
    run = build_run("train.mode=sequential", "train.allocator=worstk", "train.worstk_k=3")
    pregenerate(run)
    assert (run.pregenerated["generated"] > 0).sum() <= 3


def test_discount_by_quality_scales_p_by_laplace_smoothed_success_and_renormalises():
    p = torch.tensor([0.5, 0.25, 0.25])
    out = discount_by_quality(p, right=torch.tensor([0.0, 10.0, 4.0]), total=torch.tensor([10.0, 10.0, 10.0]))
    expected = p * torch.tensor([1 / 12, 11 / 12, 5 / 12])
    assert torch.allclose(out, expected / expected.sum()) and torch.isclose(out.sum(), torch.tensor(1.0))
    assert out[0] > 0  # a class nobody got right keeps a share: 10 images are too few to cut it off


def test_sequential_generation_discounted_by_the_generators_gan_train_on_the_validation_set():
    plain = build_run("train.mode=sequential", "train.gen_per_real=10")
    pregenerate(plain)
    run = build_run("train.mode=sequential", "train.gen_per_real=10", "train.alloc_discount=gan_train")
    pregenerate(run)
    quality, p = run.pregenerated["quality"], run.pregenerated["allocation"]
    n_val = np.bincount(run.data.val_labels, minlength=run.data.num_classes)
    right = quality.numpy() * (n_val + 2) - 1  # (right + 1) / (n + 2), right a count of validation images
    assert np.allclose(right, np.round(right), atol=1e-4) and (right >= -1e-4).all() and (right <= n_val + 1e-4).all()
    expected = plain.pregenerated["allocation"] * quality
    assert torch.allclose(p, expected / expected.sum(), atol=1e-6)  # the needs split, scaled and renormalised
    counts = run.pregenerated["generated"].numpy()
    assert counts.sum() == plain.pregenerated["generated"].sum()  # the same budget M, split another way
    assert stats.chisquare(counts, counts.sum() * p.numpy()).pvalue > 1e-3
    again = build_run("train.mode=sequential", "train.gen_per_real=10", "train.alloc_discount=gan_train")
    pregenerate(again)  # seeded: a resumed run rebuilds the same set
    assert torch.equal(again.pregenerated["quality"], quality)
    assert torch.equal(again.levels["w2"].train_data_loader[1].images, run.levels["w2"].train_data_loader[1].images)
    assert run.gan_cache_key() == plain.gan_cache_key()  # it acts after pre-training: one pre-trained GAN for both


def test_sequential_generation_filtered_by_w1_keeps_only_images_w1_reads_as_their_class():
    def generated_set(run):
        loader = run.levels["w2"].train_data_loader[1]
        return loader.images, loader.labels

    def w1_right(run, images, labels):
        run.engine.eval()  # as pregenerate reads it (it leaves the engine training)
        _, right = per_class_accuracy(run.levels["w1"], images, labels.numpy(), "cpu")
        run.engine.train()
        return torch.from_numpy(right)

    import torch.nn.functional as F

    run = build_run("train.mode=sequential", "train.gen_per_real=10", "train.gen_filter=w1_agrees")
    # a W1 that reads the untrained generator's classes now and then, so that some redraws are accepted
    w1, labels = run.levels["w1"], torch.arange(400) % run.data.num_classes
    images = to_uint8(generate(run.levels["gen"].ema.module.eval(), labels, 123, "cpu"))
    optimizer = torch.optim.Adam(w1.module.parameters(), 1e-2)
    w1.module.train()
    for _ in range(2):
        for x, y in make_loader("shuffle", images, labels.numpy(), 32, seed=0):
            optimizer.zero_grad()
            F.cross_entropy(w1(x), y).backward()
            optimizer.step()
    plain = build_run("train.mode=sequential", "train.gen_per_real=10")
    plain.levels["w1"].module.load_state_dict(w1.module.state_dict())
    pregenerate(plain)
    pregenerate(run)
    images, labels = generated_set(run)
    assert len(labels) > 0 and w1_right(run, images, labels).all()  # nothing W1 reads as another class
    first_images, first_labels = generated_set(plain)  # the first draws are the unfiltered set
    first_right = w1_right(plain, first_images, first_labels).float()
    drawn = torch.bincount(first_labels, minlength=run.data.num_classes).float()
    first_accepted = torch.zeros_like(drawn).index_add_(0, first_labels, first_right)
    assert torch.allclose(run.pregenerated["acceptance"], first_accepted / drawn.clamp(min=1))
    kept = run.pregenerated["generated"]
    assert torch.equal(kept, torch.bincount(labels, minlength=run.data.num_classes).float())
    assert kept.sum() > first_accepted.sum()  # redraws refill some of the rejected
    again = build_run("train.mode=sequential", "train.gen_per_real=10", "train.gen_filter=w1_agrees")
    again.levels["w1"].module.load_state_dict(run.levels["w1"].module.state_dict())
    pregenerate(again)  # seeded: a resumed run rebuilds the same set
    assert torch.equal(generated_set(again)[0], images)
    assert run.gan_cache_key() == plain.gan_cache_key()  # it acts after pre-training: one pre-trained GAN for both


def test_a_generated_set_w1_rejects_whole_is_refused_by_name():
    """An untrained W1 reads every image as one class; the worst class alone gets the budget, and it is another."""
    from mlo.errors import DataError
    run = build_run("train.mode=sequential", "train.gen_filter=w1_agrees", "train.allocator=worstk", "train.worstk_k=1")
    with pytest.raises(DataError, match="train.gen_filter=w1_agrees: W1 read none of the .* drop the filter"):
        pregenerate(run)


@pytest.mark.parametrize("mode", ["sequential", "end2end"])
def test_class_prior_real_corrects_w2_for_the_real_counts_alone(mode, tmp_path):
    """Balanced softmax on W2 adds the log of the real counts plus λ times the generated weight by default,
    and of the real counts alone with train.class_prior=real (generated images then count as augmentation
    of their class); post-hoc logit adjustment subtracts the matching prior."""
    import torch.nn.functional as F

    real = None
    for prior in ("trained_on", "real"):
        run = build_run(f"train.mode={mode}", "train.loss=balanced_softmax", "train.posthoc=logit_adjust",
                        "train.gen_per_real=4", *FAST, "train.epochs=1", f"train.class_prior={prior}")
        run.run_dir = tmp_path / prior
        run.run_dir.mkdir()
        run.trainer.run()
        w2, real = run.levels["w2"], torch.as_tensor(run.data.train_counts, dtype=torch.float)
        if mode == "sequential":
            counts = w2.class_counts
        else:
            batch = w2.get_batch()
            counts = w2.class_counts(w2.allocation(batch["x_val"], batch["y_val"], batch["idx_val"])[0],
                                     batch["temperature"])
        if prior == "real":
            assert counts is None  # the loss keeps its own counts: the real ones
            assert torch.allclose(run.class_prior("w2"), real / real.sum())
        else:
            assert counts.sum() > 1.5 * real.sum()  # the generated images count, in W2's loss and in the prior
            assert not torch.allclose(run.class_prior("w2"), real / real.sum(), atol=1e-2)
        corrected = real if counts is None else counts.cpu()
        x, y = next(iter(make_loader("sequential", run.data.test_images, run.data.test_labels, 32, device=run.device)))
        run.engine.eval()
        with torch.no_grad():
            losses = w2.per_sample_loss(x, y, 0.5, real=len(y), class_counts=counts)
            expected = F.cross_entropy(w2(x) + torch.log(corrected / corrected.sum()), y, reduction="none")
        assert torch.allclose(losses, expected, atol=1e-5), prior


def test_sequential_set_is_rebuilt_identically_on_resume():
    run = build_run("train.mode=sequential")
    pregenerate(run)
    first = run.levels["w2"].train_data_loader[1].images.clone()
    pregenerate(run)
    assert torch.equal(first, run.levels["w2"].train_data_loader[1].images)


def test_worstk_larger_than_the_classes_is_refused():
    from mlo.errors import ConfigError
    with pytest.raises(ConfigError, match="train.worstk_k=11 exceeds the 10 classes"):
        build_run("train.allocator=worstk", "train.worstk_k=11")


def test_vanilla_with_a_learns_the_head_on_the_validation_set_only(tmp_path):
    """vanilla_meta: W1 owns only its encoder; its logits are A's, and A steps only on validation batches."""
    run = build_run("train.mode=vanilla_meta", *FAST)
    assert wiring(run) == {"w1": [], "meta": ["w1"]}
    w1, meta = run.levels["w1"], run.levels["meta"]
    assert w1.module.meta is None and [[p.name for p in path] for path in meta.paths] == [["meta", "w1", "meta"]]
    assert not set(map(id, meta.trainable_parameters())) & set(map(id, w1.trainable_parameters()))
    run.run_dir = tmp_path
    run.trainer.run()
    assert adam_steps(w1) == run.ctx.total_steps and adam_steps(meta) == run.ctx.total_steps // 2


def test_logit_adjustment_subtracts_tau_log_prior_from_the_evaluated_logits():
    plain, adjusted = build_run("train.mode=vanilla"), build_run("train.mode=vanilla", "train.posthoc=logit_adjust",
                                                                 "train.posthoc_tau=0.5")
    adjusted.levels["w1"].module.load_state_dict(plain.levels["w1"].module.state_dict())
    for run in (plain, adjusted):
        run.engine.eval()
    data = plain.data
    (a, y), (b, _) = (run.predict(run.levels["w1"], data.test_images, data.test_labels) for run in (plain, adjusted))
    prior = torch.tensor(data.train_counts, dtype=torch.float) / sum(data.train_counts)
    assert torch.allclose(b, a - 0.5 * prior.log(), atol=1e-5)


@pytest.mark.parametrize("mode,retrained", [("vanilla", "w1"), ("end2end", "w2"), ("sequential", "w2")])
def test_crt_retrains_a_fresh_head_on_the_reported_encoder_with_class_balanced_batches(mode, retrained):
    run = build_run(f"train.mode={mode}", "train.posthoc=crt", "train.crt_epochs=2", "train.epochs=2")
    base, crt = run.levels[retrained], run.levels["crt"]
    assert run.mode.reported == "crt" and run.trainer.phases[-1].name == "cRT"
    assert crt.module.encoder is base.module.encoder and crt.module.meta is not base.module.meta
    assert {id(p) for p in crt.trainable_parameters()} == {id(p) for p in crt.module.meta.parameters()}
    Trainer(run.engine, run.trainer.phases[:-1], progress=False).run()
    assert adam_steps(crt) == 0  # not stepped while the others train
    encoder = {k: v.clone() for k, v in base.module.encoder.state_dict().items()}
    Trainer(run.engine, run.trainer.phases[-1:], progress=False).run()
    assert all(torch.equal(v, base.module.encoder.state_dict()[k]) for k, v in encoder.items())  # weights and BN stats
    assert adam_steps(crt) == 2 * run.ctx.steps_per_epoch
    labels = torch.as_tensor(run.data.train_labels)[torch.cat(crt.train_data_loader[0].batch_indices(0))]
    counts = torch.bincount(labels, minlength=run.data.num_classes).float()
    train = torch.tensor(run.data.train_counts, dtype=torch.float)
    assert counts.std() / counts.mean() < 0.25 < train.std() / train.mean()  # balanced batches of a long tail


def test_logit_adjustment_of_w2_uses_the_classes_it_trained_on_real_and_generated(tmp_path):
    """In a generating mode the prior is W2's own training distribution: the real images of its batches
    and the generated ones at their weight λ b_m (allocation_log.csv), summed over the run; the reported
    classifier alone is adjusted."""
    run = build_run("train.mode=end2end", "train.posthoc=logit_adjust", "train.epochs=2", "train.lambda_gen=0.5")
    run.run_dir = tmp_path
    run.trainer.run()
    labels, loader = torch.as_tensor(run.data.train_labels), run.levels["w2"].train_data_loader[0]
    real = sum(torch.bincount(labels[torch.cat(loader.batch_indices(e))], minlength=run.data.num_classes)
               for e in range(2)).float()
    generated = torch.zeros(run.data.num_classes)
    for row in csv.DictReader((tmp_path / "allocation_log.csv").open()):
        generated[int(row["class"])] += float(row["generated"])
    expected = real + 0.5 * generated
    assert torch.allclose(run.class_prior("w2"), expected / expected.sum(), atol=1e-3)
    assert not torch.allclose(run.class_prior("w2"), run.class_prior("w1"), atol=1e-2)
    data = run.data
    run.engine.eval()
    for name, adjusted in (("w2", True), ("w1", False)):
        batches = make_loader("sequential", data.test_images, data.test_labels, 500, device=run.device)
        raw = predict(run.levels[name], batches)[0]
        shift = run.class_prior(name).log() if adjusted else 0.0
        adjusted = run.predict(run.levels[name], data.test_images, data.test_labels)[0]
        assert torch.allclose(adjusted, raw - shift, atol=1e-5)


@pytest.mark.parametrize("overrides,message", [
    (("train.mode=vanilla", "train.posthoc_tau=2"), "applies to train.posthoc=logit_adjust only"),
    (("train.mode=vanilla", "train.keep_weights=straight_through"), "weighs the images W2 draws as it trains"),
    (("train.mode=sequential", "train.gen_budget=squared"), "sequential trains on M p_c images generated once"),
    (("train.mode=sequential", "train.allocator=learned"), "train.allocator=learned learns p.s. through W2"),
    (("train.mode=end2end", "train.alloc_lr=0.1"), "applies to train.allocator=learned only"),
    (("train.mode=vanilla", "train.meta_weight_decay=0.1"), "this run has no meta level"),
    (("train.mode=sequential", "train.meta_data=val_and_train"), "this run has no meta level"),
    (("train.mode=end2end", "train.alloc_discount=gan_train"), "scales the split of the set sequential generates"),
    (("train.mode=end2end", "train.gen_filter=w1_agrees"), "filters the set sequential generates"),
    (("train.mode=sequential_real", "data.dataset=synthetic", "data.image_size=4", "data.n_max=20",
      "train.gen_filter=w1_agrees"), "filters the set sequential generates once, before W2 trains, which "
                                     "train.mode=sequential_real does not make"),
    (("train.mode=vanilla", "train.class_prior=real"), "train.mode=vanilla trains on none"),
    (("train.mode=sequential_real", "data.dataset=synthetic", "data.image_size=4", "data.n_max=20",
      "train.alloc_discount=gan_train"), "train.mode=sequential_real does not make"),
])
def test_options_that_would_do_nothing_are_refused(overrides, message):
    from mlo.errors import ConfigError
    with pytest.raises(ConfigError, match=message):
        build_run(*overrides)


def test_frozen_statistics_copies_only_the_buffers_a_forward_writes():
    """A step or hop that is not a level's own runs with scratch copies of the buffers forwards write (batch
    norm's statistics, spectral norm's vectors) and leaves every other buffer in place: one copy per such
    buffer per evaluation, not one per buffer of every module."""
    from torch.nn.utils.parametrizations import spectral_norm

    module = torch.nn.Sequential(spectral_norm(torch.nn.Linear(3, 3)), torch.nn.BatchNorm1d(3))
    module.register_buffer("constant", torch.arange(3.0))  # e.g. a position index
    outside = dict(module.named_buffers())
    with frozen_statistics([module]):
        inside = dict(module.named_buffers())
        module(torch.randn(5, 3))
    assert inside["constant"] is outside["constant"]
    assert all(inside[k] is not outside[k] for k in outside if k != "constant")
    assert all(torch.equal(b, outside[k]) for k, b in module.named_buffers())  # nothing moved


def test_a_level_finds_the_layers_it_freezes_once_and_again_when_its_graph_changes():
    """The stateful layers a level's evaluations leave alone are listed once per kind (own step: all but its
    own; hop: all), not walked at every step, hop and chunk; a new graph is walked again."""
    run = build_run("train.mode=end2end")
    w2, gen = run.levels["w2"], run.levels["gen"]
    hop = w2.layers_to_freeze()
    assert w2.layers_to_freeze() is hop  # listed once
    w2._own_step = True
    try:
        own = w2.layers_to_freeze()
    finally:
        w2._own_step = False
    own_layers = {id(m) for m in stateful_layers([w2.module])}
    assert own_layers and own_layers <= {id(m) for m in hop} and not own_layers & {id(m) for m in own}
    w2.graph_modules = [gen.module]
    assert w2.layers_to_freeze() == stateful_layers([gen.module]) and w2.layers_to_freeze()


def test_sequential_real_gives_w2_distinct_real_images_that_no_split_uses():
    """sequential_real (analysis: sequential with a perfect generator): W2's extra set is the budget sequential
    would generate (M images, classes drawn from W1's p(s)), each a different real image of its class from the
    pool that neither the training, validation, held-out nor test sets use."""
    from mlo.errors import DataError
    from experiments.phases import spare_pool_images

    run = build_run("train.mode=sequential_real", "data.dataset=synthetic", "data.image_size=4", "data.n_max=20",
                    "data.imbalance_factor=4", "data.val_per_class=4")
    assert "gen" not in run.levels and run.data.spare_images is not None
    Trainer(run.engine, build_phases(run), progress=False).run()
    generated = run.levels["w2"].train_data_loader[1]
    images, labels = generated.images, generated.labels
    assert len(labels) == sum(run.data.train_counts)  # M: one per real image (train.gen_per_real=1)
    assert torch.equal(torch.bincount(labels, minlength=10).float(), run.pregenerated["generated"])
    flat = lambda x: {bytes(v) for v in x.reshape(len(x), -1).numpy()}  # noqa: E731
    spare = run.data.spare_images.reshape(len(run.data.spare_images), -1)
    for c in range(10):
        mine = images[labels == c]
        assert len(flat(mine)) == len(mine)  # no image twice
        assert flat(mine) <= flat(run.data.spare_images[torch.as_tensor(run.data.spare_labels) == c])
    used = flat(run.data.train_images) | flat(run.data.val_images) | flat(run.data.holdout_images)
    assert not flat(spare) & used
    few = torch.full((10_000,), 3)
    with pytest.raises(DataError, match="class synthetic3 gets 10000 images and its unused pool has"):
        spare_pool_images(run.data, few, seed=0)
