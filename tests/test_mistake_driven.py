"""The mistake-driven scheme's pieces: per-class light GANs, SAM steps, fine-tuning W2 from W1."""
from __future__ import annotations

import pytest
import torch

from mlo.config import GANConfig
from mlo.errors import ConfigError
from mlo.models import create_model
from mlo.trainer import Trainer
from tests.conftest import build_run

SCHEME = ("train.mode=sequential", "train.allocator=worstk", "train.worstk_k=3", "gan.generator=light_per_class",
          "gan.gan_ch=8", "train.w2_init=w1", "train.sam_rho=0.05", "train.epochs=1", "gan.gan_pretrain_steps=4",
          "train.meta_every=2")


@pytest.mark.parametrize("size", [8, 16, 32])
def test_light_per_class_gan_shapes_and_independent_classes(size):
    gan = create_model("gan", "light_per_class", image_shape=(3, size, size), num_classes=4, feature_dim=8,
                       cfg=GANConfig(gan_ch=8, z_dim=16))
    z, y = torch.randn(8, 16), torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    images = gan.generator(z, y)
    assert images.shape == (8, 3, size, size) and gan.discriminator(images, y).shape == (8,)
    alone = gan.generator(z[[2]], y[[2]])  # a class's image does not depend on the rest of the batch
    assert torch.allclose(images[2], alone[0], atol=1e-6)
    moved = [p for p in gan.generator.members[2].parameters()]
    grads = torch.autograd.grad(images[y == 2].sum(), moved + list(gan.generator.members[0].parameters()))
    assert all(g.abs().sum() > 0 for g in grads[:len(moved)]) and all(g.abs().sum() == 0 for g in grads[len(moved):])
    assert sum(p.numel() for p in gan.generator.members[0].parameters()) < 10_000  # light: few parameters a class


def test_light_per_class_refuses_other_sizes_and_tying():
    with pytest.raises(ConfigError, match="light_per_class supports 8, 16, 32"):
        create_model("gan", "light_per_class", image_shape=(1, 64, 64), num_classes=2, feature_dim=8, cfg=GANConfig())
    with pytest.raises(ConfigError, match="model.tie_encoders"):
        build_run("gan.generator=light_per_class", "model.tie_encoders=true")


def test_sam_step_uses_the_gradient_at_the_ascent_point():
    run = build_run("train.mode=vanilla", "train.sam_rho=0.05", "train.optimizer=sgd", "train.momentum=0")
    w1 = run.levels["w1"]
    run.engine.train()
    before = [p.detach().clone() for p in w1.trainable_parameters()]
    bn_stats = [b.detach().clone() for b in w1.module.buffers()]
    w1.step(global_step=1)
    # the same step by hand, from the same weights and batch
    reference = build_run("train.mode=vanilla", "train.sam_rho=0.05", "train.optimizer=sgd", "train.momentum=0")
    r1 = reference.levels["w1"]
    reference.engine.train()
    r1.cur_batch = w1.cur_batch
    params = r1.trainable_parameters()
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    from problems.base import frozen_statistics
    with frozen_statistics(reference.levels["w1"].graph_modules):
        g = torch.autograd.grad(r1.training_step_exec(r1.cur_batch), params)
    e = [0.05 * gi / torch.sqrt(sum((x ** 2).sum() for x in g)) for gi in g]
    with torch.no_grad():
        for p, ei in zip(params, e):
            p.add_(ei)
    g_sharp = torch.autograd.grad(r1.training_step_exec(r1.cur_batch), params)
    lr = run.cfg.train.lr
    for p_after, p0, gs in zip(w1.trainable_parameters(), before, g_sharp):
        assert torch.allclose(p_after, p0 - lr * gs, atol=1e-6)
    # the second evaluation is no own step: BN statistics moved once, as in a plain step
    plain = build_run("train.mode=vanilla", "train.optimizer=sgd", "train.momentum=0")
    plain.engine.train()
    plain.levels["w1"].step(global_step=1)
    for b_sam, b_plain in zip(w1.module.buffers(), plain.levels["w1"].module.buffers()):
        assert torch.equal(b_sam, b_plain)
    assert any(not torch.equal(a, b) for a, b in zip(bn_stats, w1.module.buffers()))


def test_mistake_driven_scheme_runs_and_fine_tunes_w2_from_w1(tmp_path):
    run = build_run(*SCHEME)
    run.run_dir = tmp_path
    phases = run.trainer.phases
    Trainer(run.engine, phases[:3], progress=False).run()  # W1, then the per-class GANs
    w1_state = {k: v.clone() for k, v in run.levels["w1"].module.state_dict().items()}
    phases[3].setup()
    w2_state = run.levels["w2"].module.state_dict()
    assert all(torch.equal(v, w2_state[k.replace("norms.w1.", "norms.w2.")]) for k, v in w1_state.items())
    generated = run.pregenerated["generated"]
    assert int((generated > 0).sum()) <= 3
    Trainer(run.engine, [phases[3]], progress=False).run()
    assert run.levels["w2"].count == run.ctx.total_steps


def test_w2_init_only_in_sequential():
    with pytest.raises(ConfigError, match="train.w2_init applies to train.mode=sequential or sequential_real only"):
        build_run("train.w2_init=w1")
