"""timm backbones as encoders: names, shapes, local pretrained weights, tying by default, a short MLO run."""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parameters_to_vector

from mlo.config import load_config
from mlo.errors import ConfigError
from mlo.models import Classifier, MetaHead, create_model, list_models
from mlo.models.encoders import load_encoder_weights
from mlo.trainer import Phase, Trainer
from tests.conftest import build_run
from tests.test_cadence import optimizer_steps


@pytest.mark.parametrize("name,channels,size,out_dim", [
    ("timm:resnet18", 1, 8, 512),                 # any input size; 8x8 pools down to 1x1
    ("timm:vit_tiny_patch16_224", 3, 32, 192),    # position embeddings built for 32x32 (2x2 patches)
])
def test_timm_encoders_give_pooled_features(name, channels, size, out_dim):
    encoder = create_model("encoder", name, in_channels=channels, image_size=size)
    assert encoder.out_dim == out_dim
    assert encoder(torch.randn(2, channels, size, size)).shape == (2, out_dim)
    classifier = Classifier(encoder, stream="w1", meta=MetaHead(out_dim, 5))
    assert classifier(torch.randn(2, channels, size, size)).shape == (2, 5)


def test_out_dim_is_the_width_of_what_forward_returns():
    encoder = create_model("encoder", "timm:mobilenetv3_small_050", in_channels=3, image_size=32)
    assert encoder.out_dim != encoder.num_features  # a hidden head layer after the pooled features
    assert encoder.eval()(torch.randn(1, 3, 32, 32)).shape == (1, encoder.out_dim)


def test_timm_names_are_validated_with_a_suggestion():
    assert "timm:<name>" in list_models("encoder")
    assert load_config(None, ["model.encoder=timm:resnet18"]).model.encoder == "timm:resnet18"
    with pytest.raises(ConfigError, match=r"model.encoder: unknown timm model 'resnet5' \(did you mean 'timm:resnet50'"):
        load_config(None, ["model.encoder=timm:resnet5"])
    with pytest.raises(ConfigError, match=r"did you mean 'timm:resnet50'"):  # a timm name without the prefix
        load_config(None, ["model.encoder=resnet50"])


def test_pretrained_weights_load_from_a_local_file(tmp_path, capsys):
    source = create_model("encoder", "timm:resnet18", in_channels=1, image_size=8)
    # a checkpoint as training scripts write it: nested under "state_dict", with a classifier
    weights = {**source.state_dict(), "fc.weight": torch.randn(10, 512), "fc.bias": torch.randn(10)}
    torch.save({"state_dict": weights, "epoch": 3}, tmp_path / "r18.pth")
    target = create_model("encoder", "timm:resnet18", in_channels=1, image_size=8)
    assert not torch.equal(target.conv1.weight, source.conv1.weight)
    load_encoder_weights(target, str(tmp_path / "r18.pth"))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    assert capsys.readouterr().err == ""  # the classifier keys are dropped, not reported


def test_partial_weights_are_reported_in_one_line(tmp_path, capsys):
    encoder = create_model("encoder", "timm:resnet18", in_channels=1, image_size=8)
    weights = {k: v for k, v in encoder.state_dict().items() if not k.startswith("layer4.")}
    torch.save({"model": {**weights, "extra.weight": torch.zeros(1)}}, tmp_path / "partial.pt")
    load_encoder_weights(encoder, str(tmp_path / "partial.pt"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: model.pretrained_path" in err
    missing = sum(k.startswith("layer4.") and not k.endswith("num_batches_tracked") for k in encoder.state_dict())
    assert f"{missing} encoder keys missing" in err and "1 keys of the file unused (extra.weight)" in err


def test_pretrained_file_errors_name_the_field(tmp_path):
    encoder = create_model("encoder", "timm:resnet18", in_channels=1, image_size=8)
    with pytest.raises(ConfigError, match="model.pretrained_path: '.*absent.pth' does not exist"):
        load_encoder_weights(encoder, str(tmp_path / "absent.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="model.pretrained_path: '.*junk.pth' is not a readable torch weights file"):
        load_encoder_weights(encoder, str(tmp_path / "junk.pth"))
    rgb = create_model("encoder", "timm:resnet18", in_channels=3, image_size=8)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pth")
    with pytest.raises(ConfigError, match=r"does not fit the encoder: conv1.weight is \(64, 3, 7, 7\) there"):
        load_encoder_weights(encoder, str(tmp_path / "rgb.pth"))
    torch.save({f"module.{k}": v for k, v in encoder.state_dict().items()}, tmp_path / "ddp.pth")
    with pytest.raises(ConfigError, match="no key of .* names a parameter of the encoder"):
        load_encoder_weights(encoder, str(tmp_path / "ddp.pth"))


def test_the_run_loads_pretrained_weights_into_the_encoder(tmp_path):
    encoder = create_model("encoder", "small_cnn", in_channels=1, image_size=8, width=4)
    torch.save(encoder.state_dict(), tmp_path / "cnn.pth")
    run = build_run("train.mode=vanilla", f"model.pretrained_path={tmp_path / 'cnn.pth'}")
    for key, value in encoder.state_dict().items():
        assert torch.equal(run.levels["w1"].module.encoder.state_dict()[key], value), key
    with pytest.raises(ConfigError, match="model.pretrained_path"):
        build_run("train.mode=vanilla", f"model.pretrained_path={tmp_path / 'absent.pth'}")


def test_tying_is_on_by_default_for_timm_and_off_for_small_encoders():
    small = build_run()
    assert small.cfg.model.tie_encoders is None and not small.cfg.model.encoders_tied
    assert small.levels["w1"].module.encoder is not small.levels["w2"].module.encoder
    timm_run = build_run("model.encoder=timm:resnet18")
    encoders = [timm_run.levels["w1"].module.encoder, timm_run.levels["w2"].module.encoder,
                timm_run.levels["disc"].module.body]
    assert all(e.shared is encoders[0].shared for e in encoders)  # one encoder, and a layer of each network's own
    assert len({id(e.own) for e in encoders}) == 3
    untied = build_run("model.encoder=timm:resnet18", "model.tie_encoders=false")
    assert untied.levels["w2"].module.encoder is not untied.levels["w1"].module.encoder
    tied_neck = build_run("model.tie_encoders=true", "model.meta=neck")  # own class heads tell the networks apart
    assert tied_neck.levels["disc"].module.body is tied_neck.levels["w1"].module.encoder


def test_two_mlo_iterations_with_a_timm_encoder_on_digits():
    # timm's own 0.4M-parameter test network: a real timm ResNet, cheap enough for two CPU cores
    run = build_run("model.encoder=timm:test_resnet", "train.batch_size=8", "train.meta_every=2")
    encoder = run.levels["w1"].module.encoder
    before = parameters_to_vector(encoder.parameters()).detach().clone()
    Trainer(run.engine, [Phase("timm", 2)], progress=False).run()
    steps = {name: optimizer_steps(p) for name, p in run.levels.items()}
    # tied encoders and A as the head: W2 steps the layer it owns between the shared encoder and A
    assert steps == {"w1": 2, "disc": 2, "w2": 2, "gen": 1, "meta": 1}
    assert not torch.equal(parameters_to_vector(encoder.parameters()), before)
    assert all(torch.isfinite(p).all() for p in run.levels["meta"].module.parameters())


def test_a_tied_encoder_is_stepped_once_per_iteration_by_its_owner():
    """One optimizer state for the shared encoder (W1's), which adds the gradients H and W2 lend it;
    their optimizers leave it out, and only W1's steps move its BN statistics."""
    run = build_run("model.tie_encoders=true", "train.meta_every=2", "model.meta=neck")
    w1, w2, disc = run.levels["w1"], run.levels["w2"], run.levels["disc"]
    encoder = w1.module.encoder
    shared = {id(p) for p in encoder.parameters()}
    assert shared <= {id(p) for p in w1.trainable_parameters()}
    for level in (w2, disc):
        assert level.lender == "w1" and not shared & {id(p) for p in level.trainable_parameters()}
        assert not shared & {id(p) for group in level.optimizer.param_groups for p in group["params"]}
    bn = next(m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = {}

    def watch(level, name):
        def wrapped(*args, _original=level.one_step_descent, **kwargs):
            before = bn.running_mean.clone()
            out = _original(*args, **kwargs)
            seen.setdefault(name, []).append(not torch.equal(before, bn.running_mean))
            return out
        level.one_step_descent = wrapped

    for level, name in ((w1, "w1"), (w2, "w2"), (disc, "disc")):
        watch(level, name)
    Trainer(run.engine, [Phase("tied", 4)], progress=False).run()
    assert all(seen["w1"]) and not any(seen["w2"]) and not any(seen["disc"])  # statistics: W1's steps only
    first = next(iter(encoder.parameters()))
    assert int(w1.optimizer.state[first]["step"]) == 4  # one Adam state, one step per iteration
    assert w1.lent  # W2's gradient of its last step waits for W1's next one


def test_the_encoder_step_sums_what_the_borrowers_lent():
    run = build_run("model.tie_encoders=true", "train.meta_every=2", "model.meta=neck")
    w1 = run.levels["w1"]
    first = next(iter(w1.module.encoder.parameters()))
    lent = []
    lend = w1.lend

    def record(params, grads):  # what H and W2 hand over, for the first encoder weight
        lent.extend(g.clone() for p, g in zip(params, grads) if p is first and g is not None)
        return lend(params, grads)

    w1.lend = record
    Trainer(run.engine, [Phase("warm", 2)], progress=False).run()
    seen = {}
    average = w1.average_gradients

    def at_the_step(*args, **kwargs):  # inside W1's optimizer_step, before its update
        own = torch.autograd.grad(w1.training_step_exec(w1.cur_batch), first)[0]
        seen["lent"], seen["expected"] = first.grad - own, sum(lent[-2:])  # W2's last step's and H's of now
        return average(*args, **kwargs)

    w1.average_gradients = at_the_step
    Trainer(run.engine, [Phase("one", 1)], progress=False).run()
    assert len(lent) == 3 * 2  # H and W2 in each iteration (W2 after W1: its gradient waits for the next)
    assert torch.allclose(seen["lent"], seen["expected"], atol=1e-5)


def test_tied_encoders_with_a_as_the_head_keep_w1_and_w2_distinct(tmp_path):
    """Tied encoders and A the shared head: each network owns a layer between the shared encoder and A, so W2
    is not W1 ("before" differs from "after"), the hypergradient paths through W2 carry something, and they
    match the exact reference; GAN pre-training does not move the shared encoder (W1 does not step in it)."""
    from tests.test_hypergradient import run_and_compare
    from mlo.hypergradient import path_gradients

    run = build_run("model.tie_encoders=true", "train.meta_every=2", "gan.gan_pretrain_steps=3")
    w1, w2 = run.levels["w1"], run.levels["w2"]
    own = {id(p) for p in w2.module.encoder.own.parameters()}
    assert {id(p) for p in w2.trainable_parameters()} == own and w2.optimizer is not None
    shared = [p.detach().clone() for p in w1.module.encoder.shared.parameters()]
    Trainer(run.engine, run.trainer.phases[:1], progress=False).run()  # GAN pre-training
    assert not w1.lent and all(torch.equal(a, b) for a, b in zip(shared, w1.module.encoder.shared.parameters()))
    reports = run_and_compare(run, iterations=4)
    assert len(reports) == 2 and all(total >= 0.99 and hyper >= 0.99 for total, hyper in reports), reports
    paths = path_gradients(run.levels["meta"], kind="exact")
    assert sum(g.abs().sum() for g in paths["meta>w2>meta"]) > 0
    run.engine.eval()
    x = torch.as_tensor(run.data.test_images[:50]).float().div(127.5).sub(1)
    with torch.no_grad():
        assert not torch.allclose(w1(x), w2(x))
