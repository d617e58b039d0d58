"""Per-resolution architecture tables (BigGAN-PyTorch's G_arch / D_arch), in multiples of ``ch``."""
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
