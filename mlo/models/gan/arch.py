"""Per-resolution architecture tables (BigGAN-PyTorch's G_arch / D_arch), in multiples of ``ch``:
BigGAN's, and the DCGAN-style ones of the VCGAN, AC-GAN and WAC-GAN-GP."""
from __future__ import annotations

from mlo.errors import ConfigError

BOTTOM_WIDTH = 4

# resolution → in/out channel multipliers per block, and the resolutions with self-attention
G_ARCH = {
    8: {"in": [4], "out": [4], "attention": []},
    16: {"in": [4, 4], "out": [4, 4], "attention": []},
    32: {"in": [4, 4, 4], "out": [4, 4, 4], "attention": []},
    64: {"in": [16, 16, 8, 4], "out": [16, 8, 4, 2], "attention": [32]},
    128: {"in": [16, 16, 8, 4, 2], "out": [16, 8, 4, 2, 1], "attention": [64]},
}

# in-channel multipliers after the image channels; "down" marks the blocks that halve the size
D_ARCH = {
    8: {"in": [4, 4], "out": [4, 4, 4], "down": [True, False, False], "attention": []},
    16: {"in": [4, 4], "out": [4, 4, 4], "down": [True, True, False], "attention": []},
    32: {"in": [4, 4, 4], "out": [4, 4, 4, 4], "down": [True, True, False, False], "attention": []},
    64: {"in": [1, 2, 4, 8], "out": [1, 2, 4, 8, 16], "down": [True, True, True, True, False], "attention": [32]},
    128: {"in": [1, 2, 4, 8, 16], "out": [1, 2, 4, 8, 16, 16], "down": [True] * 5 + [False], "attention": [64]},
}


def gan_resolution(image_size: int) -> int:
    if image_size not in G_ARCH:
        raise ConfigError(f"gan.generator: no BigGAN architecture for {image_size}x{image_size} images "
                          f"(tables exist for {', '.join(map(str, sorted(G_ARCH)))})")
    return image_size


# DCGAN style. G: channel multipliers of the 4x4 map and of each map after a doubling up-convolution;
# D: channel multipliers after each halving convolution, down to a 2x2 map.
DC_G_ARCH = {8: [4, 2], 16: [4, 2, 1], 32: [4, 4, 2, 1]}
DC_D_ARCH = {8: [2, 4], 16: [1, 2, 4], 32: [1, 2, 4, 4]}
DC_BOTTOM_WIDTH, DC_TOP_WIDTH = 4, 2


def dcgan_resolution(generator: str, image_size: int) -> int:
    if image_size not in DC_G_ARCH:
        raise ConfigError(f"gan.generator: {generator} has no DCGAN-style architecture for {image_size}x{image_size} "
                          f"images (tables exist for {', '.join(map(str, sorted(DC_G_ARCH)))}; biggan also has 64 and 128)")
    return image_size
