"""GAN objectives as small pure functions, and the regularizers and cost reducers that act on them.

An objective (``GANObjective``) is what a generator type brings besides its networks: how the
discriminator D and the generator are scored. Its losses are functions of a discriminator callable
``D(x, y)`` (the level binds the meta block A), the images, their labels and pre-drawn noise, so a
level's ``training_step`` stays a pure function of its batch.

- adversarial forms: ``hinge`` (BigGAN), ``js`` (non-saturating), ``wasserstein``;
- an auxiliary classifier (AC-GAN): D also returns class logits, and both players add the class
  cross-entropy of real and fake images;
- the gradient penalty of WGAN-GP, at interpolates whose coefficients come with the batch;
- top-k generator updates (Sinha et al., 2020), core-set batches (greedy k-center on cheap
  features) and LeCam regularization (Tseng et al., 2021).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from mlo.hypergradient import twice_differentiable

Discriminator = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class AdversarialLoss:
    """Per-image losses of one adversarial formulation, on D's scores (logits)."""
    name: str
    real: Callable[[torch.Tensor], torch.Tensor]       # D's loss on the scores of real images
    fake: Callable[[torch.Tensor], torch.Tensor]       # D's loss on the scores of generated images
    generator: Callable[[torch.Tensor], torch.Tensor]  # G's loss on the scores of generated images


def _hinge_real(s: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - s)


def _hinge_fake(s: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 + s)


def _softplus_neg(s: torch.Tensor) -> torch.Tensor:
    return F.softplus(-s)  # −log σ(s)


def _identity(s: torch.Tensor) -> torch.Tensor:
    return s


HINGE = AdversarialLoss("hinge", real=_hinge_real, fake=_hinge_fake, generator=torch.neg)
JS = AdversarialLoss("js", real=_softplus_neg, fake=F.softplus, generator=_softplus_neg)  # non-saturating G
WASSERSTEIN = AdversarialLoss("wasserstein", real=torch.neg, fake=_identity, generator=torch.neg)
ADVERSARIAL_LOSSES = {loss.name: loss for loss in (HINGE, JS, WASSERSTEIN)}


class DiscriminatorLoss(NamedTuple):
    loss: torch.Tensor
    real_score: torch.Tensor  # D's adversarial scores, for regularizers that anchor them (LeCam)
    fake_score: torch.Tensor


class GeneratorLoss(NamedTuple):
    per_sample: torch.Tensor  # G's loss per generated image (reduced by the level, e.g. top-k)
    score: torch.Tensor       # D's adversarial score per generated image


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                     mix: torch.Tensor) -> torch.Tensor:
    """``mean (‖∇_x̂ critic(x̂)‖₂ − 1)²`` at ``x̂ = mix·real + (1 − mix)·fake`` (Gulrajani et al., 2017).

    ``mix`` (one coefficient per image, uniform in [0, 1]) is drawn with the batch. The input
    gradient keeps its graph, so the penalty trains the critic (a double backward).
    """
    x = torch.lerp(fake, real, mix.view(-1, *[1] * (real.dim() - 1)))
    if not x.requires_grad:
        x.requires_grad_(True)
    with twice_differentiable():  # a ViT critic: attention on the backend that can be differentiated twice
        (grad,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    norm = grad.flatten(1).pow(2).sum(1).add(1e-12).sqrt()  # the offset keeps the backward finite at 0
    return (norm - 1.0).pow(2).mean()


@dataclass(frozen=True)
class GANObjective:
    """The losses of one GAN type.

    ``D(x, y)`` returns one score per image, or ``(scores, class logits)`` when
    ``auxiliary_classifier`` (AC-GAN). ``gp_weight > 0`` adds WGAN-GP's penalty to D's loss; its
    interpolation coefficients are the ``noise`` that ``sample_noise`` draws with the batch.
    """
    adversarial: AdversarialLoss
    auxiliary_classifier: bool = False
    gp_weight: float = 0.0

    def sample_noise(self, n: int, generator: torch.Generator, device) -> dict[str, torch.Tensor]:
        """What ``discriminator_loss`` needs drawn beforehand, for a batch of ``n`` real images."""
        return {"gp_mix": torch.rand(n, generator=generator, device=device)} if self.gp_weight else {}

    def _split(self, out):
        return out if self.auxiliary_classifier else (out, None)

    def score(self, D: Discriminator, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._split(D(x, y))[0]

    def _scores(self, D: Discriminator, x: torch.Tensor, y: torch.Tensor, n_first: int):
        """D's outputs on ``x`` (one batch), split after the first ``n_first`` images."""
        score, logits = self._split(D(x, y))
        first = (score[:n_first], None if logits is None else logits[:n_first])
        return first, (score[n_first:], None if logits is None else logits[n_first:])

    def discriminator_loss(self, D: Discriminator, real: torch.Tensor, y_real: torch.Tensor, fake: torch.Tensor,
                           y_fake: torch.Tensor, noise: dict[str, torch.Tensor]) -> DiscriminatorLoss:
        """Real and generated images go through D as one batch, so that a layer with batch statistics
        (a tied encoder's BatchNorm) normalises both alike and cannot tell them apart by their statistics."""
        n = real.shape[0]
        (real_score, real_class), (fake_score, fake_class) = self._scores(
            D, torch.cat([real, fake.to(real.dtype)]), torch.cat([y_real, y_fake]), n)
        loss = self.adversarial.real(real_score).mean() + self.adversarial.fake(fake_score).mean()
        if self.auxiliary_classifier:
            loss = loss + F.cross_entropy(real_class, y_real) + F.cross_entropy(fake_class, y_fake)
        if self.gp_weight:
            critic = lambda x: self.score(D, x, y_real)  # noqa: E731
            loss = loss + self.gp_weight * gradient_penalty(critic, real, fake, noise["gp_mix"])
        return DiscriminatorLoss(loss, real_score, fake_score)

    def generator_loss(self, D: Discriminator, fake: torch.Tensor, y_fake: torch.Tensor,
                       real: torch.Tensor | None = None, y_real: torch.Tensor | None = None) -> GeneratorLoss:
        """G's loss on D's outputs for ``fake``; with ``real``, D sees both in one batch as in its own
        step (for a D with batch statistics), and only the fakes' outputs count."""
        if real is None:
            score, fake_class = self._split(D(fake, y_fake))
        else:
            _, (score, fake_class) = self._scores(D, torch.cat([real.to(fake.dtype), fake]),
                                                  torch.cat([y_real, y_fake]), real.shape[0])
        per_sample = self.adversarial.generator(score)
        if self.auxiliary_classifier:
            per_sample = per_sample + F.cross_entropy(fake_class, y_fake, reduction="none")
        return GeneratorLoss(per_sample, score)


# ----- cost reducers and regularizers ------------------------------------------------------------
def top_k_mean(per_sample: torch.Tensor, scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of ``per_sample`` over the ``round(fraction · n)`` (at least one) generated images that
    D scores highest (Sinha et al.'s top-k generator update); the plain mean at fraction 1."""
    k = max(1, round(fraction * per_sample.shape[0]))
    if k >= per_sample.shape[0]:
        return per_sample.mean()
    return per_sample[scores.detach().topk(k).indices].mean()


def top_k_fraction(generator_steps: int, decay: float, minimum: float) -> float:
    """The top-k fraction after ``generator_steps`` steps: annealed from 1 by ``decay`` per step, down to ``minimum``."""
    return max(minimum, decay ** max(0, generator_steps))


def lecam_penalty(real_score: torch.Tensor, fake_score: torch.Tensor, anchor_real: torch.Tensor,
                  anchor_fake: torch.Tensor) -> torch.Tensor:
    """Tseng et al.'s ``E(D(real) − α_fake)² + E(D(fake) − α_real)²``, with ``α`` moving averages of
    D's scores on real and fake images (state of the discriminator's level)."""
    return (real_score - anchor_fake).pow(2).mean() + (fake_score - anchor_real).pow(2).mean()


def cheap_features(images: torch.Tensor, side: int = 8) -> torch.Tensor:
    """Images average-pooled to at most ``side``×``side`` and flattened: the features of core-set selection."""
    size = min(side, images.shape[-1])
    return F.adaptive_avg_pool2d(images.float(), size).flatten(1)


def k_center(features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of ``k`` rows chosen by greedy k-center (Sener & Savarese): the first row, then
    repeatedly the row farthest from those chosen. Deterministic given the rows."""
    k = min(k, features.shape[0])
    chosen = torch.zeros(k, dtype=torch.long, device=features.device)
    distance = (features - features[0]).norm(dim=1)
    for i in range(1, k):  # the choices stay on the device: no wait for it per chosen row
        chosen[i] = distance.argmax()
        distance = torch.minimum(distance, (features - features.index_select(0, chosen[i:i + 1])).norm(dim=1))
    return chosen
