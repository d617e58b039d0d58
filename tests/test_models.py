"""Registered models: ResNet-32's size, BigGAN shapes per resolution, the meta block, DiffAugment."""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils.parametrize import is_parametrized

from mlo.config import GANConfig
from mlo.errors import ConfigError
from mlo.models import Classifier, MetaBlock, create_model, list_models
from mlo.models.gan.diffaugment import POLICIES, diffaugment, sample_params


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_resnet32_with_a_10_way_head_has_464154_parameters():
    encoder = create_model("encoder", "resnet32", in_channels=3, image_size=32)
    assert encoder.out_dim == 64
    classifier = Classifier(encoder, 10, stream="w1")
    assert count(classifier) == 464_154
    assert classifier(torch.randn(2, 3, 32, 32)).shape == (2, 10)


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
    neck = MetaBlock(24, ("disc",))
    assert d(images, y, neck).shape == (4,)
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


def test_meta_block_keeps_statistics_per_stream():
    block = MetaBlock(6, ("w1", "disc")).train()
    block(torch.randn(32, 6) + 5, "w1")
    block(torch.randn(32, 6) - 5, "disc")
    assert block.norms["w1"].running_mean.mean() != block.norms["disc"].running_mean.mean()
    assert count(block) == 6 * 6 + 6 * 2 + 6 * 6 + 6


def test_projection_discriminator_class_term_reads_through_a():
    gan = create_model("gan", "biggan", image_shape=(1, 8, 8), num_classes=3, feature_dim=8,
                       cfg=GANConfig(gan_ch=4, z_dim=8, shared_dim=4))
    d, neck = gan.discriminator, MetaBlock(8, ("disc",))
    x = torch.randn(4, 1, 8, 8)
    out = d(x, torch.zeros(4, dtype=torch.long), neck)
    out.sum().backward()
    assert all(p.grad is not None for p in neck.parameters())


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
