"""A as a neural architecture (``model.meta=arch``): the PC-DARTS search space (Xu et al., ICLR 2020).

A cell is a DAG of ``steps`` nodes over the cell's two inputs; every edge mixes the eight
``PRIMITIVES`` with the softmax of its row of α, through a fraction 1/k of the channels (the rest
bypass the edge, and a channel shuffle mixes them for the next cell: *partial channel connections*);
each node sums its incoming edges weighted by the softmax of their β over that node's edges (*edge
normalization*). A = (α_normal, α_reduce, β_normal, β_reduce) is one ``Architecture`` shared by W1, W2
and the discriminator, each of which owns its ``Supernet`` (the operations' weights); the meta level
learns A on the validation set by the same hypergradients as any other A.

At the end of a search ``derive_genotype`` keeps, per node, the two incoming edges with the strongest
non-``none`` operation (α weighted by β) and on each that operation: the ``genotype.json`` written by a
run, drawn by ``draw_cell``; ``model.encoder=darts`` with ``arch.genotype`` builds the network it
describes (``GenotypeNetwork``, with DARTS' drop-path and auxiliary head) to train from scratch.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlo.models.registry import register_model

PRIMITIVES = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
              "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
NONE = PRIMITIVES.index("none")


def edge_count(steps: int) -> int:
    """Edges of a cell: node i reads the two inputs and the i nodes before it."""
    return sum(2 + i for i in range(steps))


# ----- operations ---------------------------------------------------------------------------------
class Zero(nn.Module):
    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return (x if self.stride == 1 else x[:, :, ::self.stride, ::self.stride]).mul(0.0)


def relu_conv_bn(c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(inplace=False), nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False),
                         nn.BatchNorm2d(c_out, affine=affine))


def dil_conv(c_in: int, c_out: int, kernel: int, stride: int, padding: int, dilation: int, affine: bool) -> nn.Sequential:
    """ReLU, a depthwise (dilated) conv, a pointwise conv, BN."""
    return nn.Sequential(nn.ReLU(inplace=False),
                         nn.Conv2d(c_in, c_in, kernel, stride, padding, dilation=dilation, groups=c_in, bias=False),
                         nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out, affine=affine))


def sep_conv(c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool) -> nn.Sequential:
    """Two undilated ``dil_conv``s, the first with the stride."""
    return nn.Sequential(*dil_conv(c_in, c_in, kernel, stride, padding, 1, affine),
                         *dil_conv(c_in, c_out, kernel, 1, padding, 1, affine))


class FactorizedReduce(nn.Module):
    """Halve the resolution without losing pixels: two stride-2 1x1 convs, one shifted by a pixel."""

    def __init__(self, c_in: int, c_out: int, affine: bool):
        super().__init__()
        self.conv_a = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_b = nn.Conv2d(c_in, c_out - c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x):
        x = F.relu(x)
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))  # same output size for odd and even inputs
        return self.bn(torch.cat([self.conv_a(x), self.conv_b(shifted)], dim=1))


OPS = {
    "none": lambda c, stride, affine: Zero(stride),
    "max_pool_3x3": lambda c, stride, affine: nn.MaxPool2d(3, stride, padding=1),
    "avg_pool_3x3": lambda c, stride, affine: nn.AvgPool2d(3, stride, padding=1, count_include_pad=False),
    "skip_connect": lambda c, stride, affine: nn.Identity() if stride == 1 else FactorizedReduce(c, c, affine),
    "sep_conv_3x3": lambda c, stride, affine: sep_conv(c, c, 3, stride, 1, affine),
    "sep_conv_5x5": lambda c, stride, affine: sep_conv(c, c, 5, stride, 2, affine),
    "dil_conv_3x3": lambda c, stride, affine: dil_conv(c, c, 3, stride, 2, 2, affine),
    "dil_conv_5x5": lambda c, stride, affine: dil_conv(c, c, 5, stride, 4, 2, affine),
}


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class MixedOp(nn.Module):
    """One edge of the supernet: the α-weighted sum of every operation on the first 1/k of the
    channels; the other channels bypass it (max-pooled where the edge reduces), then a shuffle."""

    def __init__(self, channels: int, stride: int, partial: int):
        super().__init__()
        if channels % partial:
            raise ValueError(f"{channels} channels do not split into 1/{partial}")
        self.partial = partial
        part = channels // partial
        # pooling has no weights to scale its output: an affine-free BN puts it on the convs' scale
        self.ops = nn.ModuleList(
            nn.Sequential(OPS[name](part, stride, False), nn.BatchNorm2d(part, affine=False)) if "pool" in name
            else OPS[name](part, stride, False) for name in PRIMITIVES)
        self.bypass = nn.MaxPool2d(2, 2, ceil_mode=True) if stride == 2 else nn.Identity()  # odd sizes as the ops

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        part = x.shape[1] // self.partial
        mixed = sum(w * op(x[:, :part]) for w, op in zip(weights, self.ops))
        return channel_shuffle(torch.cat([mixed, self.bypass(x[:, part:])], dim=1), self.partial)


class SearchCell(nn.Module):
    """A normal or reduction cell of the supernet: ``steps`` nodes, the output the concatenation of them."""

    def __init__(self, steps: int, c_prev_prev: int, c_prev: int, channels: int, reduction: bool,
                 reduction_prev: bool, partial: int):
        super().__init__()
        self.steps, self.reduction = steps, reduction
        self.preprocess0 = (FactorizedReduce(c_prev_prev, channels, False) if reduction_prev
                            else relu_conv_bn(c_prev_prev, channels, 1, 1, 0, False))
        self.preprocess1 = relu_conv_bn(c_prev, channels, 1, 1, 0, False)
        self.edges = nn.ModuleList(MixedOp(channels, 2 if reduction and j < 2 else 1, partial)
                                   for i in range(steps) for j in range(2 + i))
        self.out_channels = steps * channels

    def forward(self, s0, s1, op_weights: torch.Tensor, edge_weights: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.steps):
            states.append(sum(edge_weights[offset + j] * self.edges[offset + j](h, op_weights[offset + j])
                              for j, h in enumerate(states)))
            offset += len(states) - 1
        return torch.cat(states[2:], dim=1)


# ----- A ------------------------------------------------------------------------------------------
class Architecture(nn.Module):
    """A as an architecture: α (edges × operations) and β (edges) of the normal and the reduction cell.

    It sits inside the networks that read it (``inside_encoder``): their encoder takes it as an argument
    and their own class head reads the encoder's features, which A passes on unchanged."""

    inside_encoder = True
    head = None

    def __init__(self, steps: int = 4):
        super().__init__()
        self.steps = steps
        edges = edge_count(steps)
        # small random values (as DARTS): near-uniform mixtures that still break ties between edges
        self.alpha_normal = nn.Parameter(1e-3 * torch.randn(edges, len(PRIMITIVES)))
        self.alpha_reduce = nn.Parameter(1e-3 * torch.randn(edges, len(PRIMITIVES)))
        self.beta_normal = nn.Parameter(1e-3 * torch.randn(edges))
        self.beta_reduce = nn.Parameter(1e-3 * torch.randn(edges))

    def features(self, h: torch.Tensor, stream: str | None = None) -> torch.Tensor:
        return h

    def weights(self, reduction: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(operation weights: softmax of α per edge, edge weights: softmax of β over each node's edges)."""
        alpha, beta = (self.alpha_reduce, self.beta_reduce) if reduction else (self.alpha_normal, self.beta_normal)
        edges, start = [], 0
        for i in range(self.steps):
            edges.append(F.softmax(beta[start:start + 2 + i], dim=0))
            start += 2 + i
        return F.softmax(alpha, dim=-1), torch.cat(edges)

    @torch.no_grad()
    def genotype(self) -> dict:
        """The discrete cells this A stands for (``derive_genotype`` of both cells)."""
        cells = {}
        for name, reduction in (("normal", False), ("reduce", True)):
            op_weights, edge_weights = self.weights(reduction)
            cells[name] = derive_genotype(op_weights * edge_weights[:, None], self.steps)
            cells[f"{name}_concat"] = list(range(2, 2 + self.steps))
        return {"steps": self.steps, **cells}


def derive_genotype(weights: torch.Tensor, steps: int) -> list[tuple[str, int]]:
    """Per node, the two incoming edges whose strongest non-``none`` operation weighs most, each with
    that operation: ``[(operation, input index), ...]``, two per node (inputs 0 and 1 are the cell's)."""
    gene, start = [], 0
    for i in range(steps):
        rows = weights[start:start + 2 + i].clone()
        rows[:, NONE] = -float("inf")
        strongest, ops = rows.max(dim=1)
        for j in sorted(torch.argsort(strongest, descending=True, stable=True)[:2].tolist()):
            gene.append((PRIMITIVES[ops[j]], j))
        start += 2 + i
    return gene


# ----- the stem -----------------------------------------------------------------------------------
class Stem(nn.Module):
    """The first cell's two input states: CIFAR's one 3x3 conv (both states the same, 3 x width
    channels), or ImageNet's three stride-2 convs (the first state at 1/4 of the resolution, the
    second at 1/8, width channels each), as DARTS and PC-DARTS build them."""

    def __init__(self, in_channels: int, width: int, kind: str = "cifar"):
        super().__init__()
        self.reduces = kind == "imagenet"  # the first cell reads states of two resolutions
        if self.reduces:
            self.stem0 = nn.Sequential(
                nn.Conv2d(in_channels, width // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width // 2),
                nn.ReLU(inplace=True), nn.Conv2d(width // 2, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width))
            self.stem1 = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False),
                                       nn.BatchNorm2d(width))
            self.channels = width
        else:
            self.stem0 = nn.Sequential(nn.Conv2d(in_channels, 3 * width, 3, padding=1, bias=False),
                                       nn.BatchNorm2d(3 * width))
            self.stem1 = None
            self.channels = 3 * width

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s0 = self.stem0(x)
        return s0, (s0 if self.stem1 is None else self.stem1(s0))


# ----- the supernet -------------------------------------------------------------------------------
class Supernet(nn.Module):
    """A stem and ``cells`` search cells (reduction cells at 1/3 and 2/3 of the depth), global average
    pooling: image → ``out_dim`` features, given the A to read (``forward(x, arch)``)."""

    reads_architecture = True

    def __init__(self, in_channels: int, width: int, cells: int, steps: int, partial: int, stem: str = "cifar"):
        super().__init__()
        self.steps = steps
        self.stem = Stem(in_channels, width, stem)
        c_prev_prev = c_prev = self.stem.channels
        channels, reduction_prev = width, self.stem.reduces
        self.cells = nn.ModuleList()
        for i in range(cells):
            reduction = i in (cells // 3, 2 * cells // 3)
            channels = channels * 2 if reduction else channels
            cell = SearchCell(steps, c_prev_prev, c_prev, channels, reduction, reduction_prev, partial)
            self.cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, cell.out_channels
        self.out_dim = c_prev

    def forward(self, x: torch.Tensor, arch: Architecture) -> torch.Tensor:
        if arch.steps != self.steps:
            raise ValueError(f"the supernet has {self.steps} nodes per cell, A {arch.steps}")
        weights = {False: arch.weights(False), True: arch.weights(True)}
        s0, s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, *weights[cell.reduction])
        return s1.mean(dim=(2, 3))


@register_model("encoder")
def pc_darts(in_channels: int = 3, image_size: int = 32, width: int = 16, cells: int = 5, steps: int = 4,
             partial: int = 4, stem: str = "cifar") -> Supernet:
    """The PC-DARTS supernet (``model.meta=arch``): ``width`` channels in the first cells, doubled at each
    reduction; 1/``partial`` of the channels through each edge's operations; a CIFAR or ImageNet stem."""
    return Supernet(in_channels, width, cells, steps, partial, stem)


# ----- the network a genotype describes (evaluation) ----------------------------------------------
def drop_path(x: torch.Tensor, p: float) -> torch.Tensor:
    """Zero a whole sample's path with probability ``p`` (scaling the kept ones by 1/(1−p))."""
    keep = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(1 - p)
    return x * keep / (1 - p)


class GenotypeCell(nn.Module):
    """A cell of the searched network: each node sums the two operations the genotype keeps for it."""

    def __init__(self, gene: list, concat: list[int], c_prev_prev: int, c_prev: int, channels: int,
                 reduction: bool, reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = (FactorizedReduce(c_prev_prev, channels, True) if reduction_prev
                            else relu_conv_bn(c_prev_prev, channels, 1, 1, 0, True))
        self.preprocess1 = relu_conv_bn(c_prev, channels, 1, 1, 0, True)
        self.ops = nn.ModuleList(OPS[op](channels, 2 if reduction and i < 2 else 1, True) for op, i in gene)
        self.inputs = [i for _, i in gene]
        self.concat = list(concat)
        self.out_channels = len(concat) * channels

    def forward(self, s0, s1, drop_prob: float) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node in range(len(self.ops) // 2):
            total = 0
            for k in (2 * node, 2 * node + 1):
                out = self.ops[k](states[self.inputs[k]])
                if self.training and drop_prob > 0 and not isinstance(self.ops[k], nn.Identity):
                    out = drop_path(out, drop_prob)
                total = total + out
            states.append(total)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """DARTS' auxiliary classifier, with an adaptive pool so that it fits any resolution."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Conv2d(channels, 128, 1, bias=False), nn.BatchNorm2d(128),
            nn.ReLU(), nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU())
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class GenotypeNetwork(nn.Module):
    """The network a genotype describes, trained from scratch: a stem, ``cells`` cells (reductions at 1/3
    and 2/3), global pooling → ``out_dim`` features; drop-path on the operations, and an auxiliary head
    after the second reduction whose loss (``auxiliary_loss``) the classifier level adds in training."""

    def __init__(self, in_channels: int, width: int, cells: int, genotype: dict, num_classes: int,
                 drop_path: float = 0.0, auxiliary_weight: float = 0.0, stem: str = "cifar"):
        super().__init__()
        self.drop_prob, self.auxiliary_weight = drop_path, auxiliary_weight
        self.stem = Stem(in_channels, width, stem)
        c_prev_prev = c_prev = self.stem.channels
        channels, reduction_prev = width, self.stem.reduces
        self.cells = nn.ModuleList()
        self.auxiliary, self.auxiliary_after = None, 2 * cells // 3
        for i in range(cells):
            reduction = i in (cells // 3, 2 * cells // 3)
            channels = channels * 2 if reduction else channels
            kind = "reduce" if reduction else "normal"
            cell = GenotypeCell(genotype[kind], genotype[f"{kind}_concat"], c_prev_prev, c_prev, channels,
                                reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, cell.out_channels
            if i == self.auxiliary_after and auxiliary_weight > 0:
                self.auxiliary = AuxiliaryHead(c_prev, num_classes)
        self.out_dim = c_prev
        self.auxiliary_logits = None  # of the last forward in training mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.auxiliary_logits = None
        s0, s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_prob)
            if i == self.auxiliary_after and self.auxiliary is not None and self.training:
                self.auxiliary_logits = self.auxiliary(s1)
        return s1.mean(dim=(2, 3))

    def auxiliary_loss(self, labels: torch.Tensor) -> torch.Tensor | float:
        """The weighted cross-entropy of the auxiliary head on the last training forward (0 without one)."""
        if self.auxiliary_logits is None:
            return 0.0
        return self.auxiliary_weight * F.cross_entropy(self.auxiliary_logits, labels)


SHIPPED_GENOTYPES = Path(__file__).parent / "genotypes"  # published cells, by name (pc_darts_cifar10)


def read_genotype(path: str | Path) -> dict:
    """A ``genotype.json`` (or the name of a shipped one) checked against the search space; a
    ConfigError names what is wrong."""
    from mlo.errors import ConfigError

    shipped = SHIPPED_GENOTYPES / f"{path}.json"
    path = shipped if shipped.is_file() else Path(path).expanduser()
    try:
        genotype = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"arch.genotype: '{path}' does not exist; give the genotype.json a search wrote") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"arch.genotype: '{path}' is not a JSON genotype ({str(exc)[:80]})") from None
    for kind in ("normal", "reduce"):
        gene, concat = genotype.get(kind), genotype.get(f"{kind}_concat")
        if not isinstance(gene, list) or not gene or len(gene) % 2 or not isinstance(concat, list):
            raise ConfigError(f"arch.genotype: '{path}' has no valid '{kind}' cell (two (operation, input) "
                              f"pairs per node and '{kind}_concat')")
        for node, (op, i) in enumerate(gene):
            if op not in OPS or op == "none" or not 0 <= i < 2 + node // 2:
                raise ConfigError(f"arch.genotype: '{path}': {kind} edge {node} ({op}, {i}) is not an operation "
                                  f"of the search space on an earlier node")
        if not all(isinstance(c, int) and 0 <= c < 2 + len(gene) // 2 for c in concat):
            raise ConfigError(f"arch.genotype: '{path}': {kind}_concat {concat} names nodes the cell does not have")
    return genotype


@register_model("encoder")
def darts(in_channels: int = 3, image_size: int = 32, width: int = 16, cells: int = 8, genotype: str | None = None,
          num_classes: int = 10, drop_path: float = 0.0, auxiliary_weight: float = 0.0,
          stem: str = "cifar") -> GenotypeNetwork:
    """The network of a searched genotype (``arch.genotype``), trained from scratch (DARTS' evaluation)."""
    if genotype is None:
        from mlo.errors import ConfigError
        raise ConfigError("model.encoder=darts: give arch.genotype=RUN_DIR/genotype.json")
    return GenotypeNetwork(in_channels, width, cells, read_genotype(genotype), num_classes, drop_path,
                           auxiliary_weight, stem)


# ----- the genotype on disk and drawn -------------------------------------------------------------
def write_genotype(path: Path, genotype: dict) -> None:
    from mlo.checkpoint import atomic_write
    atomic_write(Path(path), lambda f: f.write(json.dumps(genotype, indent=2).encode()))


def draw_cell(path: Path, gene: list, steps: int, title: str) -> None:
    """The cell as a graph: the two inputs on the left, the nodes in a column, the output on the right;
    each kept edge labelled with its operation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["c_{k-2}", "c_{k-1}", *map(str, range(steps))]
    pos = {0: (0.0, 0.75), 1: (0.0, 0.25), **{2 + i: (1.0 + 0.6 * (i % 2), 1 - (i + 0.5) / steps) for i in range(steps)}}
    out = (2.4, 0.5)
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.9 * steps))
    for i in range(steps):
        for op, src in gene[2 * i:2 * i + 2]:
            (x0, y0), (x1, y1) = pos[src], pos[2 + i]
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops={"arrowstyle": "-|>", "color": "0.4", "shrinkA": 12, "shrinkB": 12})
            ax.text((x0 + x1) / 2, (y0 + y1) / 2, op, fontsize=7, ha="center", va="center",
                    bbox={"boxstyle": "round", "fc": "white", "ec": "none", "alpha": 0.8})
        ax.annotate("", xy=out, xytext=pos[2 + i], arrowprops={"arrowstyle": "-|>", "color": "0.75", "shrinkA": 12, "shrinkB": 18})
    for k, (x, y) in pos.items():
        ax.text(x, y, names[k], ha="center", va="center", bbox={"boxstyle": "circle", "fc": "lightblue" if k > 1 else "lightgreen"})
    ax.text(*out, "c_{k}", ha="center", va="center", bbox={"boxstyle": "circle", "fc": "khaki"})
    ax.set_xlim(-0.3, 2.7)
    ax.set_ylim(-0.1, 1.1)
    ax.axis("off")
    ax.set_title(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
