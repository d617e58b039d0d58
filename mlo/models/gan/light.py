"""Per-class light GANs (the mistake-driven scheme): one small unconditional GAN per class, with
FastGAN's skip-layer excitation in the generator, wrapped so the pair looks class-conditional
(``G(z, y)``, ``D(x, y)``) to every mode.

Few parameters per class and no batch normalisation, so a class's images do not depend on which
other classes share the batch.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mlo.errors import ConfigError
from mlo.models.gan import GAN
from mlo.models.gan.layers import snconv2d
from mlo.models.gan.losses import HINGE, GANObjective
from mlo.models.registry import register_model

LIGHT_RESOLUTIONS = (8, 16, 32)


class SkipLayerExcitation(nn.Module):
    """FastGAN's SLE: a low-resolution feature map gates the channels of a high-resolution one."""

    def __init__(self, c_low: int, c_high: int):
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Conv2d(c_low, c_high, 4), nn.SiLU(),
                                  nn.Conv2d(c_high, c_high, 1), nn.Sigmoid())

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return high * self.gate(low)


class LightGenerator(nn.Module):
    """z → 4x4 → ... → image: nearest-upsampling conv blocks; SLE from the 4x4 map to the 16x16 one
    (resolution 32) or to the last map (smaller resolutions)."""

    def __init__(self, z_dim: int, ch: int, resolution: int, out_channels: int):
        super().__init__()
        self.z_dim = z_dim
        self.initial = nn.Sequential(nn.ConvTranspose2d(z_dim, 2 * ch, 4), nn.LeakyReLU(0.2))
        blocks, c = [], 2 * ch
        size = 4
        while size < resolution:
            blocks.append(nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(c, ch, 3, padding=1), nn.LeakyReLU(0.2)))
            c, size = ch, size * 2
        self.blocks = nn.ModuleList(blocks)
        self.excite_at = min(len(blocks), 2) - 1  # the block whose output the 4x4 map gates
        self.excitation = SkipLayerExcitation(2 * ch, ch)
        self.to_image = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        low = h = self.initial(z[:, :, None, None])
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == self.excite_at:
                h = self.excitation(h, low)
        return torch.tanh(self.to_image(h))


class LightDiscriminator(nn.Module):
    """Spectral-normed strided convs down to 4x4, then one logit."""

    def __init__(self, ch: int, resolution: int, in_channels: int):
        super().__init__()
        layers, c, size = [], in_channels, resolution
        while size > 4:
            layers += [snconv2d(c, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c, size = ch, size // 2
        self.features = nn.Sequential(*layers)
        self.logit = snconv2d(c, 1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logit(self.features(x)).flatten()


class PerClass(nn.Module):
    """Class c's inputs go to ``members[c]``; outputs are put back in the input's order."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def route(self, inputs: torch.Tensor, y: torch.Tensor, out_shape: tuple[int, ...]) -> torch.Tensor:
        out = inputs.new_zeros((len(y), *out_shape))
        for c in torch.unique(y).tolist():
            idx = (y == c).nonzero().flatten()
            out = out.index_copy(0, idx, self.members[c](inputs[idx]))
        return out


class PerClassGenerator(PerClass):
    def __init__(self, num_classes: int, z_dim: int, ch: int, resolution: int, channels: int):
        super().__init__([LightGenerator(z_dim, ch, resolution, channels) for _ in range(num_classes)])
        self.z_dim = z_dim
        self.num_classes = num_classes
        self.image_shape = (channels, resolution, resolution)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.route(z, y, self.image_shape)


class PerClassDiscriminator(PerClass):
    """Each class's discriminator judges only its own class; no meta block (the per-class GANs of
    the mistake-driven scheme stand apart from the classifier)."""

    def __init__(self, num_classes: int, ch: int, resolution: int, channels: int):
        super().__init__([LightDiscriminator(ch, resolution, channels) for _ in range(num_classes)])

    def forward(self, x: torch.Tensor, y: torch.Tensor, shared_meta=None) -> torch.Tensor:
        return self.route(x, y, ())


def light_resolution(image_size: int) -> int:
    if image_size not in LIGHT_RESOLUTIONS:
        raise ConfigError(f"gan.generator: light_per_class supports {', '.join(map(str, LIGHT_RESOLUTIONS))} pixel "
                          f"images, not {image_size}")
    return image_size


@register_model("gan")
def light_per_class(image_shape, num_classes: int, feature_dim: int, cfg, encoder: nn.Module | None = None,
                    meta=None, owns_class_head: bool = False, meta_features: int | None = None) -> GAN:
    """One light GAN per class (hinge loss); ``gan_ch`` is each GAN's width, ``z_dim`` its latent size."""
    if encoder is not None:
        raise ConfigError("model.tie_encoders: gan.generator=light_per_class has a small discriminator per class, "
                          "which cannot share the classifier's encoder; set model.tie_encoders=false")
    channels, size, _ = image_shape
    resolution = light_resolution(size)
    return GAN(generator=PerClassGenerator(num_classes, cfg.z_dim, cfg.gan_ch, resolution, channels),
               discriminator=PerClassDiscriminator(num_classes, cfg.gan_ch, resolution, channels),
               objective=GANObjective(HINGE))
