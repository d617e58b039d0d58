"""Classifier encoders: image → feature vector (``out_dim`` features).

Each factory takes ``in_channels``, ``image_size`` and ``width`` (ignored where the architecture
fixes it) and returns a module with an ``out_dim`` attribute. Besides the small encoders here,
every timm model is an encoder as ``timm:<name>`` (timm is imported only when one is used).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlo.checkpoint import UnreadableFile, read_torch_file
from mlo.errors import ConfigError
from mlo.models.registry import register_family, register_model


ACTIVATION_LAYERS = {"relu": nn.ReLU, "selu": nn.SELU, "gelu": nn.GELU}


def activation_layer(name: str) -> nn.Module:
    """``model.activation`` as a module (in place where it can be)."""
    return ACTIVATION_LAYERS[name](inplace=True) if name in ("relu", "selu") else ACTIVATION_LAYERS[name]()


def _conv_bn_act(c_in: int, c_out: int, activation: str) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), activation_layer(activation)]


class SmallCNN(nn.Module):
    """Stages of two 3x3 conv-BN-activation layers and a 2x2 max-pool; channels double per stage."""

    def __init__(self, in_channels: int, image_size: int, width: int, activation: str = "relu"):
        super().__init__()
        stages = min(3, max(1, int(math.log2(image_size)) - 1))
        layers, c_in = [], in_channels
        for i in range(stages):
            c_out = width * 2 ** i
            layers += (_conv_bn_act(c_in, c_out, activation) + _conv_bn_act(c_out, c_out, activation)
                       + [nn.MaxPool2d(2)])
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.out_dim = c_in

    def forward(self, x):
        return self.features(x).mean(dim=(2, 3))


@register_model("encoder")
def small_cnn(in_channels: int = 3, image_size: int = 32, width: int = 32, activation: str = "relu") -> SmallCNN:
    return SmallCNN(in_channels, image_size, width, activation)


class _ShortcutA(nn.Module):
    """ResNet option-A shortcut: subsample and zero-pad channels (no parameters)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, activation: str = "relu"):
        super().__init__()
        self.act = activation_layer(activation)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _ShortcutA(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers, 16/32/64 channels, option-A shortcuts), as LDAM-DRW uses it."""

    def __init__(self, depth: int, in_channels: int = 3, activation: str = "relu"):
        super().__init__()
        assert (depth - 2) % 6 == 0, "CIFAR ResNet depth must be 6n+2"
        self.act = activation_layer(activation)
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1, activation))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.out_dim = 64
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        return self.layers(self.act(self.bn1(self.conv1(x)))).mean(dim=(2, 3))


@register_model("encoder")
def resnet32(in_channels: int = 3, image_size: int = 32, width: int = 16, activation: str = "relu") -> CifarResNet:
    return CifarResNet(32, in_channels, activation)


def _is_timm_model(name: str) -> bool:
    import timm
    return timm.is_model(name)


def _timm_models() -> list[str]:
    import timm
    return timm.list_models()


@register_family("encoder", "timm", is_member=_is_timm_model, members=_timm_models)
def timm_encoder(name: str, in_channels: int = 3, image_size: int = 224, width: int = 0,
                 activation: str = "relu") -> nn.Module:
    """A timm model without its classifier, randomly initialised (weights come only from
    ``model.pretrained_path``). Models whose input size is fixed by position embeddings (ViT,
    Swin, ...) are built for ``image_size``; the others take any size. ``width`` is ignored;
    ``activation`` other than relu is passed as timm's ``act_layer`` (refused by models without one)."""
    import timm
    from timm.models import get_pretrained_cfg_value

    size = {"img_size": image_size} if get_pretrained_cfg_value(name, "fixed_input_size") else {}
    act = {} if activation == "relu" else {"act_layer": ACTIVATION_LAYERS[activation]}
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels, **size, **act)
    except TypeError as exc:
        if not act:
            raise
        raise ConfigError(f"model.activation={activation}: timm model '{name}' takes no act_layer ({exc}); "
                          f"use model.activation=relu") from None
    # forward() returns the pre-logits features: wider than num_features where the model has a
    # hidden head layer (MobileNetV3's 1280), num_features elsewhere
    model.out_dim = getattr(model, "head_hidden_size", None) or model.num_features
    return model


def load_encoder_weights(encoder: nn.Module, path: str) -> None:
    """Load a local weights file into ``encoder``: a state_dict, or a dict holding one under
    ``state_dict`` or ``model``. A timm model's classifier keys are dropped (the encoder has none);
    missing and unexpected keys are reported in one line on stderr."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"model.pretrained_path: '{file}' does not exist; give a local weights file "
                          f"(nothing is downloaded)")
    try:
        state = read_torch_file(file)
    except UnreadableFile as exc:
        raise ConfigError(f"model.pretrained_path: '{file}' is not a readable torch weights file ({exc})") from None
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.pretrained_path: '{file}' holds no state_dict (a mapping of names to tensors)")
    heads = getattr(encoder, "pretrained_cfg", {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    state = {k: v for k, v in state.items() if not any(k.startswith(f"{h}.") for h in heads)}
    own = encoder.state_dict()
    for key, value in state.items():
        if key in own and value.shape != own[key].shape:
            raise ConfigError(f"model.pretrained_path: '{file}' does not fit the encoder: {key} is "
                              f"{tuple(value.shape)} there and {tuple(own[key].shape)} here "
                              f"(check data.image_size and the image channels)")
    if not set(state) & set(own):
        raise ConfigError(f"model.pretrained_path: no key of '{file}' names a parameter of the encoder "
                          f"(its keys look like '{next(iter(state), '')}', the encoder's like '{next(iter(own))}')")
    result = encoder.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        some = lambda keys: ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        print(f"warning: model.pretrained_path: {len(result.missing_keys)} encoder keys missing from '{file}' "
              f"({some(result.missing_keys)}), {len(result.unexpected_keys)} keys of the file unused "
              f"({some(result.unexpected_keys)})", file=sys.stderr)
