"""A, the shared meta-parameters, in its two forms, and the networks that read it.

- ``MetaHead`` (``model.meta=head``, the paper's Section 4.1): the last two layers,
  ``Linear(d, d) – activation – Linear(d, C)``. It produces the logits of W1 and W2, so their
  classification head is learned on the balanced validation set by the top level, and their own
  parameters are the encoders only. No BatchNorm: nothing in A depends on the batch.
- ``MetaNeck`` (``model.meta=neck``, the ablation of our first reading): a ``Linear–BN–activation–
  Linear`` block (d → d) between encoder and a head that every network owns and trains on its own
  data. The BN affine weights belong to A; the running statistics are kept per *stream* (one per
  network reading features through A), because each encoder has its own feature distribution.

A network reads A through ``ReadsA``: ``A.features(h)`` are the features before the class head,
and the class head is A's own (head form) or the network's (neck form). Where a run has no meta
level, each network owns a module of A's shape instead, so capacities match.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlo.errors import ConfigError

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "selu": F.selu}
META_FORMS = ("head", "neck", "arch")
HEADS = ("linear", "spinal")


class MetaHead(nn.Module):
    """A as the last two layers: ``head(activation(fc1(h)))``, the logits."""

    inside_encoder = False  # A reads the encoder's output (an architecture-form A sits inside the encoder)

    def __init__(self, dim: int, num_classes: int, activation: str = "relu"):
        super().__init__()
        self.activation = ACTIVATIONS[activation]
        self.fc1 = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def features(self, h: torch.Tensor, stream: str | None = None) -> torch.Tensor:
        """``a(h)``: the first layer and its activation (the features before the class head)."""
        return self.activation(self.fc1(h))

    def forward(self, h: torch.Tensor, stream: str | None = None) -> torch.Tensor:
        return self.head(self.features(h, stream))


class SpinalHead(nn.Module):
    """The Progressive SpinalNet head (Kabir et al., 2020): the input split into two halves; a stack of
    ``depth`` small fully connected layers of ``width`` units, layer i reading one half (alternately)
    and the output of layer i−1; all layers' outputs concatenated into the final classifier ``head``.
    As A (``model.meta=head``, ``model.head=spinal``) A is this whole head: the spinal stack and the
    classifier, learned on the validation set."""

    inside_encoder = False

    def __init__(self, dim: int, num_classes: int, width: int, depth: int, activation: str = "relu"):
        super().__init__()
        self.activation = ACTIVATIONS[activation]
        self.half = dim // 2
        halves = (self.half, dim - self.half)
        self.layers = nn.ModuleList(nn.Linear(halves[i % 2] + (width if i else 0), width) for i in range(depth))
        self.head = nn.Linear(width * depth, num_classes)

    def features(self, h: torch.Tensor, stream: str | None = None) -> torch.Tensor:
        halves = (h[:, :self.half], h[:, self.half:])
        outputs = []
        for i, layer in enumerate(self.layers):
            x = halves[i % 2] if not outputs else torch.cat([halves[i % 2], outputs[-1]], dim=1)
            outputs.append(self.activation(layer(x)))
        return torch.cat(outputs, dim=1)

    def forward(self, h: torch.Tensor, stream: str | None = None) -> torch.Tensor:
        return self.head(self.features(h, stream))


class MetaNeck(nn.Module):
    """A as a feature block ``Linear–BN–activation–Linear`` (d → d), with BN statistics per stream;
    it has no class head (``head`` is None: the network reading it owns one)."""

    head = None
    inside_encoder = False

    def __init__(self, dim: int, streams: tuple[str, ...], activation: str = "relu"):
        super().__init__()
        self.activation = ACTIVATIONS[activation]
        self.fc1 = nn.Linear(dim, dim, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(dim))
        self.norm_bias = nn.Parameter(torch.zeros(dim))
        self.norms = nn.ModuleDict({s: nn.BatchNorm1d(dim, affine=False) for s in streams})
        self.fc2 = nn.Linear(dim, dim)

    def features(self, h: torch.Tensor, stream: str) -> torch.Tensor:
        h = self.norms[stream](self.fc1(h)) * self.norm_weight + self.norm_bias
        return self.fc2(self.activation(h))

    forward = features


class TiedEncoder(nn.Module):
    """A network's encoder when W1, W2 and H share one (parameter tying) and A is the shared head: the
    shared encoder, then a layer of the network's own, ``activation(Linear(d, d))``. Without it W1 and W2
    would be one network (the same encoder under the same A): "before" equal to "after", and every
    hypergradient path through W2 empty. It is the paper's tying (Section 3.2: a shared encoder, different
    heads) read with A as the shared last two layers (Section 4.1): the networks differ in the layer
    between the two, and still share the encoder that holds nearly all parameters and compute."""

    def __init__(self, shared: nn.Module, activation: str = "relu"):
        super().__init__()
        self.shared = shared
        self.out_dim = shared.out_dim
        self.own = nn.Linear(self.out_dim, self.out_dim)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.own(self.shared(x)))


def create_meta(form: str, dim: int, num_classes: int, streams: tuple[str, ...], activation: str,
                head: str = "linear", spinal: tuple[int, int] = (32, 4), nodes: int = 4) -> nn.Module:
    """A module of A's shape: ``form`` is ``model.meta`` (head, neck or arch); a head-form A with
    ``head=spinal`` is a SpinalNet head of ``spinal`` = (width, depth); an arch-form A has cells of ``nodes``."""
    if form == "arch":
        from mlo.models.nas import Architecture
        return Architecture(nodes)
    if form == "head" and head == "spinal":
        return SpinalHead(dim, num_classes, *spinal, activation)
    if form == "head":
        return MetaHead(dim, num_classes, activation)
    if form == "neck":
        return MetaNeck(dim, streams, activation)
    raise ConfigError(f"model.meta: unknown form '{form}' (choices: {', '.join(META_FORMS)})")


def create_head(head: str, dim: int, num_classes: int, activation: str, spinal: tuple[int, int] = (32, 4)) -> nn.Module:
    """The class head a network owns after a neck-form A: linear, or a SpinalNet head."""
    return SpinalHead(dim, num_classes, *spinal, activation) if head == "spinal" else nn.Linear(dim, num_classes)


class ReadsA(nn.Module):
    """A network whose last layers go through A: shared (passed to ``forward`` by its level) or owned
    (``meta``, where the run has no meta level); with a neck-form A it owns a class head ``own_head``."""

    def __init__(self, stream: str, meta: nn.Module | None = None, own_head: nn.Module | None = None):
        super().__init__()
        self.stream = stream
        self.meta = meta
        self.own_head = own_head

    def a(self, shared_meta: nn.Module | None) -> nn.Module:
        """The A this network reads: its own, or the shared one."""
        meta = self.meta if self.meta is not None else shared_meta
        if meta is None:
            raise ValueError(f"the {self.stream} network reads a shared A, and none was given")
        return meta

    def encode(self, body: nn.Module, x: torch.Tensor, shared_meta: nn.Module | None) -> torch.Tensor:
        """``body(x)``; an architecture-form A is read by the body itself."""
        meta = self.a(shared_meta)
        return body(x, meta) if meta.inside_encoder else body(x)

    def through_a(self, h: torch.Tensor, shared_meta: nn.Module | None) -> tuple[torch.Tensor, nn.Module | None]:
        """``(features, class head)``: A's features of ``h`` and the head that turns them into logits."""
        meta = self.a(shared_meta)
        return meta.features(h, self.stream), self.own_head if self.own_head is not None else meta.head


class Classifier(ReadsA):
    """``A(encoder(x))``: the logits come out of A's head (head form) or of the classifier's own
    linear head after A's features (neck form)."""

    def __init__(self, encoder: nn.Module, stream: str, meta: nn.Module | None = None,
                 own_head: nn.Module | None = None):
        super().__init__(stream, meta, own_head)
        self.encoder = encoder

    def forward(self, x: torch.Tensor, shared_meta: nn.Module | None = None, with_features: bool = False):
        """Logits, or ``(logits, features before the head)`` for losses that read features (ISDA)."""
        features, head = self.through_a(self.encode(self.encoder, x, shared_meta), shared_meta)
        logits = head(features)
        return (logits, features) if with_features else logits

    def head_weight(self, shared_meta: nn.Module | None = None) -> torch.Tensor:
        """The weight (C, d) of the linear layer that makes the logits."""
        return (self.own_head if self.own_head is not None else self.a(shared_meta).head).weight


class WeightingNet(nn.Module):
    """Meta-Weight-Net's weighting function: a per-sample loss → a weight in (0, 1), an MLP 1→h→1."""

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(losses[:, None])).squeeze(1)
