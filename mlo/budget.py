"""Class needs → allocation p(s) → class samples and relaxed keep-weights b_m.

- ``per_class_val_loss``: mean validation loss ``l_c`` per class (differentiable in W1 and A), over
  the batch and, with a ``ValidationMemory``, over the rest of the validation set as last seen.
- Allocators turn class statistics into ``p(s=c)``; ``needs`` is the method (``p ∝ l_c``); each
  also sets the budget M of generated images per epoch.
- ``sample_classes``: ``o_m ~ p(s)`` by Gumbel-max from uniforms drawn beforehand.
- ``keep_weights``: ``b_m = σ((log p(o_m) − log(1 − p(o_m)) + g1 − g2) / T)``, the binary
  Gumbel-softmax relaxation of keeping sample m with probability ``p(o_m)``; ``g1 − g2`` is
  logistic noise, drawn beforehand too. As Eq. 4 writes it, a class's images are kept with
  probability about p, so a class gets about ``M p²`` of them (``Σ b ≈ M Σ p²``): the ``squared``
  budget. ``counted`` (the default) divides b_m by its expectation given p(o_m) (``expected_keep``,
  no gradient), so class c weighs ``M p_c`` in expectation at every temperature, the count of the
  paper's Table 3 and of the sequential baseline, and b_m still carries the relaxed gradient to p;
  ``straight_through`` keeps the forward value hard (0 or 1) and the relaxed gradient. Counted's weights
  are right in expectation but uneven: 0 or about 1/p(o_m) (E[w²] ≈ C as T → 0, so M images are worth
  about M/C evenly weighted ones, and one image of a class at p = 0.01 weighs 100).
  ``score`` (beyond the paper) gives every drawn image weight 1 (class c gets M p_c as drawn, sequential's
  stream) and p its gradient by the score function ``p(o_m)/sg(p(o_m))``: unbiased for the gradient of the
  expected generated loss ``M Σ_c p_c L_c``, with no keep-weights.
- ``temperature``: exponential anneal from ``T0`` to ``T1``.

All noise is an argument, so these are pure functions (finite-difference hops depend on it).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlo.distributed import all_reduce_sum

_EPS = 1e-6


@dataclass
class ClassStats:
    """What an allocator may look at; ``val_loss`` carries gradients to W1 and A."""
    val_loss: torch.Tensor      # (C,)
    val_acc: torch.Tensor       # (C,)
    train_counts: torch.Tensor  # (C,)
    batch_losses: torch.Tensor | None = None   # per image of this process's validation batch (detached)
    batch_correct: torch.Tensor | None = None


class ValidationMemory:
    """W1's last loss and correctness on every validation image, so that the per-class statistics
    behind p(s) cover the whole validation set, not one batch: the batch's terms are differentiable
    (fresh), the other images' are the values W1 had when they were last in a batch (for a fixed W1,
    after one pass, exactly the full-set statistics). Updated between steps (``update``), never by a
    hop, so a step and its hypergradient hops see the same memory. Under several processes every
    process keeps the whole memory: the batch's values are summed over the processes' shares."""

    def __init__(self, labels: torch.Tensor, num_classes: int):
        self.labels = labels
        self.num_classes = num_classes
        self.values = torch.zeros(2, len(labels), device=labels.device)  # (loss, correct) per image
        self.seen = torch.zeros(len(labels), device=labels.device)

    def _global(self, indices: torch.Tensor, values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A mask of the images in the batch (every process's share) and, given, their values."""
        mask = torch.zeros_like(self.seen).index_fill_(0, indices, 1.0)
        scattered = None if values is None else torch.zeros_like(self.values).index_copy_(1, indices, values)
        return (all_reduce_sum(mask), None if scattered is None else all_reduce_sum(scattered))

    def class_sums(self, indices: torch.Tensor) -> torch.Tensor:
        """(loss sum, count, hits) per class over the remembered images outside the batch ``indices``."""
        mask, _ = self._global(indices)
        keep = self.seen * (1.0 - mask)
        rows = torch.stack([self.values[0] * keep, keep, self.values[1] * keep])
        return torch.zeros(3, self.num_classes, device=keep.device).index_add_(1, self.labels, rows)

    @torch.no_grad()
    def update(self, indices: torch.Tensor, losses: torch.Tensor, correct: torch.Tensor) -> None:
        mask, values = self._global(indices, torch.stack([losses.float(), correct.float()]))
        self.values = torch.where(mask.bool(), values, self.values)
        self.seen = torch.maximum(self.seen, mask)

    def state_dict(self) -> dict:
        return {"values": self.values, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.values, self.seen = state["values"].to(self.seen.device), state["seen"].to(self.seen.device)


def per_class_val_loss(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       memory: ValidationMemory | None = None, indices: torch.Tensor | None = None) -> ClassStats:
    """Mean cross-entropy and accuracy per class on a (class-balanced) validation batch, and with a
    ``memory``, on the remembered rest of the validation set (``indices``: the batch's images in it).
    Under several processes, of the batch all of them hold a share of, so every process gets the same
    statistics. Differentiable in the logits, also across processes; no host sync."""
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    correct = (logits.argmax(1) == labels).to(losses.dtype)
    per_class = torch.zeros(3, num_classes, device=logits.device, dtype=losses.dtype)
    sums = all_reduce_sum(per_class.index_add(1, labels, torch.stack([losses, torch.ones_like(losses), correct])))
    if memory is not None:
        sums = sums + memory.class_sums(indices)
    loss_sum, count, hits = sums.unbind()
    count = count.clamp(min=1)
    return ClassStats(val_loss=loss_sum / count, val_acc=hits / count, train_counts=torch.zeros_like(count),
                      batch_losses=losses.detach(), batch_correct=correct)


class Allocator:
    """Maps class statistics to ``p(s)``, a distribution over classes, and sets the budget M."""
    name = ""

    def __init__(self, gen_per_real: float = 1.0):
        self.gen_per_real = gen_per_real

    def __call__(self, stats: ClassStats) -> torch.Tensor:
        raise NotImplementedError

    def images_per_epoch(self, train_counts, stats: ClassStats | None = None) -> int:
        """Budget M: ``gen_per_real`` generated images per real training image."""
        return round(self.gen_per_real * sum(train_counts))


ALLOCATORS: dict[str, type[Allocator]] = {}


def register_allocator(cls: type[Allocator]) -> type[Allocator]:
    ALLOCATORS[cls.name] = cls
    return cls


@register_allocator
class NeedsAllocator(Allocator):
    """The method: ``p(s=c) = l_c / Σ_b l_b`` — classes the classifier does worst on get more."""
    name = "needs"

    def __call__(self, stats: ClassStats) -> torch.Tensor:
        loss = stats.val_loss.clamp(min=_EPS)
        return loss / loss.sum()


@register_allocator
class EqualAllocator(Allocator):
    """The same share for every class."""
    name = "equal"

    def __call__(self, stats: ClassStats) -> torch.Tensor:
        return torch.full_like(stats.val_loss, 1.0 / stats.val_loss.numel()).detach()


@register_allocator
class ReciprocalAllocator(Allocator):
    """``p(s=c) ∝ 1 / n_c``: rarer classes get more, whatever the classifier does."""
    name = "reciprocal"

    def __call__(self, stats: ClassStats) -> torch.Tensor:
        inv = 1.0 / stats.train_counts.clamp(min=1)
        return (inv / inv.sum()).detach()


@register_allocator
class WorstKAllocator(Allocator):
    """Mistake-driven: only the k classes with the lowest validation accuracy (ties: higher loss)
    get images, each grown by ``fraction`` of its real training images."""
    name = "worstk"

    def __init__(self, gen_per_real: float = 1.0, k: int = 3, fraction: float = 0.5):
        super().__init__(gen_per_real)
        self.k, self.fraction = k, fraction

    def worst(self, stats: ClassStats) -> torch.Tensor:
        # accuracy steps are >= 1e-3 apart for up to 1000 validation images a class; tanh(loss) < 1
        score = (1 - stats.val_acc.detach()) * 1e3 + torch.tanh(stats.val_loss.detach())
        return torch.topk(score, self.k).indices

    def __call__(self, stats: ClassStats) -> torch.Tensor:
        weights = torch.zeros_like(stats.val_loss).detach()
        worst = self.worst(stats)
        weights[worst] = self.fraction * stats.train_counts[worst].to(weights.dtype)
        return weights / weights.sum()

    def images_per_epoch(self, train_counts, stats: ClassStats | None = None) -> int:
        """``fraction`` of the real images of the worst k classes; before any statistics exist
        (the per-step budget of end2end is fixed when it is built) the k rarest stand in for them."""
        counts = torch.as_tensor(list(train_counts), dtype=torch.float)
        chosen = self.worst(stats) if stats is not None else torch.topk(-counts, self.k).indices
        return round(self.fraction * float(counts[chosen.cpu()].sum()))


class AllocationLogits(nn.Module):
    """Per-class logits whose softmax is p(s); zeros at the start (the equal allocation)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_classes))

    def forward(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=0)


@register_allocator
class LearnedAllocator(Allocator):
    """Beyond the paper: ``p(s) = softmax(logits)``, the logits an upper level of W2 (``alloc``) learned on
    the validation set through the hypergradient of W2's validation loss; the statistics are not read."""
    name = "learned"

    def __init__(self, gen_per_real: float = 1.0, num_classes: int = 2):
        super().__init__(gen_per_real)
        self.module = AllocationLogits(num_classes)

    def __call__(self, stats: ClassStats) -> torch.Tensor:
        return self.module()


def create_allocator(name: str, **options) -> Allocator:
    """``options``: those of ``TrainConfig`` an allocator's constructor names (``gen_per_real``; ``k`` and
    ``fraction`` for worstk) and ``num_classes``."""
    accepted = inspect.signature(ALLOCATORS[name]).parameters
    return ALLOCATORS[name](**{k: v for k, v in options.items() if k in accepted})


def uniform_noise(shape, generator: torch.Generator, device) -> torch.Tensor:
    """Uniforms in (0, 1), kept away from the ends so their logs are finite."""
    return torch.rand(shape, generator=generator, device=device).clamp_(_EPS, 1 - _EPS)


def logistic_noise(shape, generator: torch.Generator, device) -> torch.Tensor:
    """``g1 − g2`` for two independent Gumbel(0, 1) draws, i.e. a standard logistic sample."""
    u = uniform_noise(shape, generator, device)
    return torch.log(u) - torch.log1p(-u)


def sample_classes(p: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Gumbel-max sampling: ``o_m = argmax_c log p_c + G_mc`` with ``G = −log(−log U)``."""
    gumbel = -torch.log(-torch.log(uniforms))
    return torch.argmax(torch.log(p.detach().clamp(min=1e-30))[None, :] + gumbel, dim=1)


def success_rate(right: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Each class's estimated rate of success ``(right + 1) / (total + 2)`` (Laplace's rule: never 0, so a few
    validation images cannot cut a class off by chance)."""
    return (right + 1) / (total + 2)


def discount_by_quality(p: torch.Tensor, right: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``p`` scaled by each class's ``success_rate``, renormalised."""
    scaled = p * success_rate(right, total)
    return scaled / scaled.sum()


KEEP_FORMS = ("relaxed", "straight_through")
BUDGETS = ("counted", "squared", "score")
# nodes of the trapezoid rule behind expected_keep, in the logistic variable l = g1 - g2 (its density
# is below 1e-13 beyond ±30; a spacing of 0.01 resolves the sigmoid's width T down to T = 0.05)
_LOGISTIC_NODES = torch.linspace(-30.0, 30.0, 6001, dtype=torch.float64)


def keep_weights(p_o: torch.Tensor, logistic: torch.Tensor, temperature: float | torch.Tensor,
                 form: str = "relaxed") -> torch.Tensor:
    """Relaxed Bernoulli(p_o): ``P(b > 1/2) = p_o`` at any temperature; ``b → {0, 1}`` as T → 0.
    ``straight_through``: the forward value is ``b > 1/2`` (0 or 1), the gradient the relaxed one's."""
    p = p_o.clamp(_EPS, 1 - _EPS)
    relaxed = torch.sigmoid((torch.log(p) - torch.log1p(-p) + logistic) / temperature)
    if form == "straight_through":
        return (relaxed > 0.5).to(relaxed.dtype) + relaxed - relaxed.detach()
    return relaxed


def expected_keep(p_o: torch.Tensor, temperature: float | torch.Tensor, form: str = "relaxed") -> torch.Tensor:
    """``E[b | p(o) = p_o]`` over the logistic noise, no gradient: ``p_o`` itself for the hard forward
    value of ``straight_through``; for the relaxed b, ``∫ σ((logit p + l)/T) dF(l)`` (F the standard
    logistic), by the trapezoid rule; above p_o at high temperatures (×3 at p = 0.02, T = 1), p_o as T → 0."""
    p = p_o.detach().clamp(_EPS, 1 - _EPS)
    if form == "straight_through":
        return p
    nodes = _LOGISTIC_NODES.to(p.device)
    density = torch.sigmoid(nodes) * torch.sigmoid(-nodes)
    logit = (torch.log(p) - torch.log1p(-p)).double()
    values = torch.sigmoid((logit[..., None] + nodes) / torch.as_tensor(temperature, dtype=torch.float64))
    return torch.trapezoid(values * density, nodes).to(p.dtype)


def budget_weights(p: torch.Tensor, classes: torch.Tensor, logistic: torch.Tensor, temperature: float | torch.Tensor,
                   form: str = "relaxed", budget: str = "counted") -> torch.Tensor:
    """The weight of each generated image (of class ``classes[m]`` drawn from ``p``) in W2's loss:
    ``keep_weights``, and with the ``counted`` budget divided by its expectation (``expected_keep``), so
    that class c weighs ``M p_c`` in expectation (``squared``: ``≈ M p_c²``). The gradient to p is b_m's,
    scaled by a positive constant per class. ``score``: 1 forward, the score function's gradient."""
    if budget == "score":
        drawn = p[classes]
        return drawn / drawn.detach()
    keep = keep_weights(p[classes], logistic, temperature, form)
    if budget == "squared":
        return keep
    return keep / expected_keep(p, temperature, form)[classes]  # once per class, not per image


def temperature(progress: float, start: float, end: float) -> float:
    """Exponential anneal: ``start`` at progress 0, ``end`` at progress 1."""
    progress = min(max(progress, 0.0), 1.0)
    return start * (end / start) ** progress
