"""Registered models: ResNet-32's size, BigGAN shapes per resolution, A in both forms, DiffAugment."""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils.parametrize import is_parametrized

from mlo.config import GANConfig
from mlo.errors import ConfigError
import torch.nn as nn

from mlo.models import Classifier, MetaHead, MetaNeck, SpinalHead, create_model, list_models
from mlo.models.gan.diffaugment import POLICIES, diffaugment, sample_params


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_resnet32_with_a_10_way_head_has_464154_parameters():
    encoder = create_model("encoder", "resnet32", in_channels=3, image_size=32)
    assert encoder.out_dim == 64
    classifier = Classifier(encoder, stream="w1", meta=MetaNeck(64, ("w1",)), own_head=nn.Linear(64, 10))
    assert count(classifier.encoder) + count(classifier.own_head) == 464_154
    assert classifier(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_a_as_the_last_two_layers_makes_the_logits():
    """Head form: the classifier owns only its encoder; its logits are A's output."""
    encoder = create_model("encoder", "small_cnn", in_channels=1, image_size=8, width=4)
    meta = MetaHead(encoder.out_dim, 5)
    classifier = Classifier(encoder, stream="w1")
    x = torch.randn(3, 1, 8, 8)
    logits, features = classifier(x, meta, with_features=True)
    assert torch.equal(logits, meta(encoder(x))) and features.shape == (3, encoder.out_dim)
    assert classifier.head_weight(meta) is meta.head.weight and count(classifier) == count(encoder)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in meta.modules())
    assert count(meta) == encoder.out_dim ** 2 + encoder.out_dim + encoder.out_dim * 5 + 5


@pytest.mark.parametrize("size,channels", [(8, 1), (32, 1), (32, 3)])
def test_small_cnn_encodes_any_size(size, channels):
    encoder = create_model("encoder", "small_cnn", in_channels=channels, image_size=size, width=8)
    assert encoder(torch.randn(3, channels, size, size)).shape == (3, encoder.out_dim)


@pytest.mark.parametrize("size", [8, 16, 32, 64, 128])
def test_biggan_shapes_per_resolution(size):
    ch = 16 if size <= 32 else 8
    gan = create_model("gan", "biggan", image_shape=(3, size, size), num_classes=5, feature_dim=24,
                       cfg=GANConfig(gan_ch=ch, z_dim=20, shared_dim=8))
    g, d = gan.generator, gan.discriminator
    assert g.z_dim % (len(g.blocks) + 1) == 0 and g.z_dim <= 20
    z, y = torch.randn(4, g.z_dim), torch.tensor([0, 1, 2, 4])
    images = g(z, y)
    assert images.shape == (4, 3, size, size) and images.abs().max() <= 1
    assert d(images, y, MetaHead(24, 5)).shape == (4,)
    assert d.body(images).shape == (4, 24)
    assert is_parametrized(d.psi) and is_parametrized(g.linear)  # spectral norm
    has_attention = any(type(m).__name__ == "SelfAttention" for m in g.modules())
    assert has_attention == (size >= 64)


def test_biggan_refuses_an_unknown_resolution():
    with pytest.raises(ConfigError, match="no BigGAN architecture for 28x28"):
        create_model("gan", "biggan", image_shape=(1, 28, 28), num_classes=3, feature_dim=8, cfg=GANConfig())


def test_generator_is_class_conditional_through_the_shared_embedding():
    gan = create_model("gan", "biggan", image_shape=(1, 8, 8), num_classes=4, feature_dim=8,
                       cfg=GANConfig(gan_ch=4, z_dim=8, shared_dim=4))
    g = gan.generator.eval()
    z = torch.randn(1, g.z_dim).repeat(2, 1)
    a, b = g(z, torch.tensor([0, 3]))
    assert not torch.allclose(a, b)


def test_meta_neck_keeps_statistics_per_stream():
    block = MetaNeck(6, ("w1", "disc")).train()
    block(torch.randn(32, 6) + 5, "w1")
    block(torch.randn(32, 6) - 5, "disc")
    assert block.norms["w1"].running_mean.mean() != block.norms["disc"].running_mean.mean()
    assert count(block) == 6 * 6 + 6 * 2 + 6 * 6 + 6


def test_projection_discriminator_is_psi_of_a_features_plus_the_logit_of_a():
    """``H(x, y) = ψ(a(φ(x))) + A(φ(x))[y]``."""
    gan = create_model("gan", "biggan", image_shape=(1, 8, 8), num_classes=3, feature_dim=8,
                       cfg=GANConfig(gan_ch=4, z_dim=8, shared_dim=4))
    d, meta = gan.discriminator.eval(), MetaHead(8, 3)  # eval: no spectral-norm power iteration between calls
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    out = d(x, y, meta)
    h = d.body(x)
    expected = d.psi(meta.features(h)).squeeze(1) + meta(h).gather(1, y[:, None]).squeeze(1)
    assert torch.allclose(out, expected, atol=1e-6) and d.own_head is None
    out.sum().backward()
    assert all(p.grad is not None for p in meta.parameters())


def test_neck_form_discriminator_owns_its_class_head():
    gan = create_model("gan", "biggan", image_shape=(1, 8, 8), num_classes=3, feature_dim=8,
                       cfg=GANConfig(gan_ch=4, z_dim=8, shared_dim=4), owns_class_head=True)
    d, neck = gan.discriminator, MetaNeck(8, ("disc",))
    out = d(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), neck)
    out.sum().backward()
    assert d.own_head is not None and all(p.grad is not None for p in neck.parameters())


def test_diffaugment_is_deterministic_given_its_parameters():
    x = torch.randn(6, 3, 16, 16)
    params = sample_params(POLICIES, 6, 16, torch.Generator().manual_seed(0), "cpu")
    a, b = diffaugment(x, params), diffaugment(x, params)
    assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)
    cut = sample_params(("cutout",), 6, 16, torch.Generator().manual_seed(1), "cpu")
    zeros = (diffaugment(torch.ones_like(x), cut) == 0).float().mean(dim=(1, 2, 3))
    assert ((zeros > 0) & (zeros <= 0.25 + 1e-6)).all()  # a square of half the side, clipped at borders


def test_translation_moves_content_by_the_sampled_shift():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3, 3] = 1
    out = diffaugment(x, {"shift": torch.tensor([[1, -1]])})
    assert out[0, 0, 2, 4] == 1 and out.sum() == 1  # out[r, c] = x[r + dy, c + dx]


def test_registry_lists_what_exists():
    assert {"resnet32", "small_cnn"} <= set(list_models("encoder"))
    assert "biggan" in list_models("gan")
    with pytest.raises(ConfigError, match="unknown encoder"):
        create_model("encoder", "resnet9000")


def test_spinal_head_reads_alternate_halves_and_the_layer_before():
    """Progressive SpinalNet: layer i reads half i % 2 of the features and layer i−1's output; the
    classifier reads every layer's output."""
    head = SpinalHead(10, 3, width=4, depth=3)
    assert [layer.in_features for layer in head.layers] == [5, 5 + 4, 5 + 4] and head.head.in_features == 12
    h = torch.randn(2, 10, requires_grad=True)
    features = head.features(h)
    assert features.shape == (2, 12) and head(h).shape == (2, 3)
    # the first layer's output depends on the first half only
    (grad,) = torch.autograd.grad(features[:, :4].sum(), h)
    assert grad[:, :5].abs().sum() > 0 and grad[:, 5:].abs().sum() == 0


@pytest.mark.parametrize("name", ["small_cnn", "resnet32", "timm:resnet18"])
def test_encoders_take_the_configured_activation(name):
    encoder = create_model("encoder", name, in_channels=3, image_size=16, width=4, activation="selu")
    kinds = {type(m) for m in encoder.modules()}
    assert nn.SELU in kinds and nn.ReLU not in kinds
    assert encoder(torch.randn(2, 3, 16, 16)).shape == (2, encoder.out_dim)


def test_an_encoder_without_a_choice_of_activation_is_refused_one():
    """Registered encoders that take no ``activation`` still build; asking one for SELU is a config error."""
    from tests.conftest import build_run
    assert build_run("model.encoder=tiny_tanh", "model.width=8") is not None
    with pytest.raises(ConfigError, match="model.activation=selu: encoder tiny_tanh has no choice of activation"):
        build_run("model.encoder=tiny_tanh", "model.width=8", "model.activation=selu")
