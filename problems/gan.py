"""H, the discriminator; G, the class-conditional generator; and τ, the learned latent truncation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from mlo.models.gan.diffaugment import diffaugment, sample_params
from mlo.models.gan.losses import GANObjective, cheap_features, k_center, lecam_penalty, top_k_fraction, top_k_mean
from mlo.models import has_batch_norm
from problems.base import LevelProblem, unwrap


class DiscriminatorProblem(LevelProblem):
    """H: ``max_H`` of the GAN objective on real training images vs G's images of the same classes.

    Cost reducers and regularizers, all off by default:
    - core-set batches: the loader yields ``coreset_factor`` times more candidates than
      ``batch_size``, and ``prepare_batch`` keeps a greedy k-center subset of them (no randomness);
    - LeCam: ``lecam_weight · ‖D(real) − α_fake‖² + ‖D(fake) − α_real‖²`` with α moving averages of
      D's mean scores. The scores of an own step are folded into α at the start of the next one,
      so the hypergradient hops that re-evaluate a step see the anchors the step saw.
    """

    def __init__(self, name, config, module, optimizer, scheduler=None, train_data_loader=None, *,
                 objective: GANObjective, diffaugment_policy: tuple[str, ...], batch_size: int,
                 lecam_weight: float = 0.0, lecam_decay: float = 0.99, **kwargs):
        super().__init__(name, config, module, optimizer, scheduler, train_data_loader, **kwargs)
        self.objective = objective
        self.policy = diffaugment_policy
        self.batch_size = batch_size
        self.lecam_weight = lecam_weight
        self.lecam_decay = lecam_decay
        self.lecam_anchors = torch.zeros(2)  # moving averages of D's mean score on (real, fake) images
        self.pending_scores = None           # (real, fake) mean scores of the last own step, not yet folded in

    def initialize(self):
        super().initialize()
        self.lecam_anchors = self.lecam_anchors.to(self.device)

    def forward(self, x, y):
        return self.module(x, y, self.shared_meta)

    def get_batch(self):
        if self.pending_scores is not None:  # a skipped (non-finite) step moves nothing; decided on the device
            moved = self.lecam_anchors.lerp(self.pending_scores, 1.0 - self.lecam_decay)
            self.lecam_anchors = torch.where(self._loss_finite, moved, self.lecam_anchors)
            self.pending_scores = None
        return super().get_batch()

    def prepare_batch(self, data):
        x, y = data
        if x.shape[0] > self.batch_size:  # core-set candidates
            keep = k_center(cheap_features(x), self.batch_size)
            x, y = x[keep], y[keep]
        n, size, dev = x.shape[0], x.shape[-1], self.device
        return {
            "x": x, "y": y,
            "z": torch.randn(n, unwrap(self.gen.module).z_dim, generator=self.noise, device=dev),
            "aug_real": sample_params(self.policy, n, size, self.noise, dev),
            "aug_fake": sample_params(self.policy, n, size, self.noise, dev),
            "loss_noise": self.objective.sample_noise(n, self.noise, dev),
        }

    def training_step(self, batch):
        with torch.no_grad():
            fake = self.gen.module(batch["z"], batch["y"])
        y = batch["y"]
        out = self.objective.discriminator_loss(self, diffaugment(batch["x"], batch["aug_real"]), y,
                                                diffaugment(fake, batch["aug_fake"]), y, batch["loss_noise"])
        if not self.lecam_weight:
            return out.loss
        if self._own_step:
            self.pending_scores = torch.stack([out.real_score.mean(), out.fake_score.mean()]).detach().float()
        real_anchor, fake_anchor = self.lecam_anchors
        return out.loss + self.lecam_weight * lecam_penalty(out.real_score, out.fake_score, real_anchor, fake_anchor)

    def process_state(self):
        # each process's anchors follow D's scores on its share of the batches
        return {**super().process_state(), "lecam_anchors": self.lecam_anchors, "pending_scores": self.pending_scores}

    def load_level_state(self, state):
        super().load_level_state(state)
        self.lecam_anchors = state["lecam_anchors"].to(self.device)
        self.pending_scores = state["pending_scores"]


class GeneratorProblem(LevelProblem):
    """G: ``min_G`` of the GAN objective for uniformly drawn classes; keeps an EMA copy for sampling.

    Top-k updates (off at ``topk_min_fraction=1``): only the fraction of fakes D scores highest
    counts, annealed from 1 by ``topk_decay`` per generator step down to ``topk_min_fraction``.
    """

    def __init__(self, name, config, module, optimizer, scheduler=None, train_data_loader=None, *,
                 objective: GANObjective, diffaugment_policy: tuple[str, ...], batch_size: int, num_classes: int,
                 image_size: int, ema_decay: float, topk_min_fraction: float = 1.0, topk_decay: float = 0.99,
                 **kwargs):
        super().__init__(name, config, module, optimizer, scheduler, train_data_loader, **kwargs)
        self.objective = objective
        self.policy = diffaugment_policy
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.image_size = image_size
        self.ema_decay = ema_decay
        self.topk = (topk_decay, topk_min_fraction)
        self.ema = None
        self.ema_count = 0  # updates of the EMA so far (also its n_averaged, on the device)
        self._ema_tensors = None  # (the EMA, its tensors and G's paired): see ema_tensors
        self.with_real = False  # set in initialize: D sees G's images beside real ones

    def initialize(self):
        super().initialize()
        self.ema = AveragedModel(unwrap(self.module), use_buffers=True)  # updated by update_ema
        # a D with batch statistics sees G's images beside real ones, as in its own step
        self.with_real = has_batch_norm(self.disc.module, self.shared_meta)

    @torch.no_grad()
    def update_ema(self) -> None:
        """The moving average of G's weights and buffers. Its counter is read on the host (torch's
        ``AveragedModel.update_parameters`` reads its device counter twice per update: a wait for the device
        at every G step); the first update copies, then warm-up as in TF's ExponentialMovingAverage, so
        early averages are not swamped by the initialisation."""
        n = self.ema_count
        copied, averaged = (self.ema_tensors("all"), None) if n == 0 else (
            self.ema_tensors("counters"), self.ema_tensors("floats"))  # counters: BN's batch counter
        if copied[0]:
            torch._foreach_copy_(*copied)
        if averaged and averaged[0]:
            weight = 1.0 - min(self.ema_decay, (1.0 + n) / (10.0 + n))
            torch._foreach_lerp_(*averaged, weight)
        self.ema.n_averaged += 1
        self.ema_count += 1

    def ema_tensors(self, which: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The EMA's tensors and G's, paired (``all``, the ``floats`` it averages, the integer ``counters`` it
        copies); listed once per EMA (walking G's modules at every G step costs milliseconds on a large G)."""
        if self._ema_tensors is None or self._ema_tensors[0] is not self.ema:
            module = unwrap(self.module)
            pairs = list(zip([*self.ema.module.parameters(), *self.ema.module.buffers()],
                             [*module.parameters(), *module.buffers()]))
            split = lambda keep: ([a for a, c in pairs if keep(a)], [c for a, c in pairs if keep(a)])  # noqa: E731
            self._ema_tensors = (self.ema, {"all": split(lambda a: True), "floats": split(torch.is_floating_point),
                                            "counters": split(lambda a: not a.is_floating_point())})
        return self._ema_tensors[1][which]

    def prepare_batch(self, data):
        n, dev = self.batch_size, self.device
        batch = {
            "z": torch.randn(n, unwrap(self.module).z_dim, generator=self.noise, device=dev),
            "y": torch.randint(0, self.num_classes, (n,), generator=self.noise, device=dev),
            "aug": sample_params(self.policy, n, self.image_size, self.noise, dev),
            "topk_fraction": top_k_fraction(self._count - 1, *self.topk),  # Betty counted this step already
        }
        if self.with_real:  # the real images of D's last step
            real = self.disc.cur_batch
            batch.update(real=real["x"], y_real=real["y"],
                         aug_real=sample_params(self.policy, len(real["y"]), self.image_size, self.noise, dev))
        return batch

    def gan_loss(self, fake, batch):
        """G's per-image GAN loss and D's scores of ``fake`` (augmented as D sees it, beside real
        images where D has batch statistics)."""
        real = diffaugment(batch["real"], batch["aug_real"]) if "real" in batch else None
        return self.objective.generator_loss(self.disc, diffaugment(fake, batch["aug"]), batch["y"], real=real,
                                             y_real=batch.get("y_real"))

    def training_step(self, batch):
        out = self.gan_loss(self.module(batch["z"], batch["y"]), batch)
        return top_k_mean(out.per_sample, out.score, batch["topk_fraction"])

    def param_callback(self):
        self.update_ema()

    def level_state(self):
        return {**super().level_state(), "ema": self.ema.state_dict()}

    def load_level_state(self, state):
        super().load_level_state(state)
        self.ema.load_state_dict(state["ema"])
        self.ema_count = int(self.ema.n_averaged)


class TruncationProblem(LevelProblem):
    """τ, the truncation of the latents of W2's generated images (``z_τ = sign(z)·min(|z|, τ)``):
    ``min_τ CE(W2(G(z_τ, y)), y)`` for uniformly drawn classes.

    An upper level of W2 (``u2l = {trunc: [w2]}``, ``l2u = {w2: [..., trunc]}``): τ's gradient is
    the direct one, through G on truncated latents, plus the hypergradient through W2, whose
    training images are drawn at τ.
    """

    def __init__(self, name, config, module, optimizer, scheduler=None, train_data_loader=None, *,
                 batch_size: int, num_classes: int, **kwargs):
        super().__init__(name, config, module, optimizer, scheduler, train_data_loader, **kwargs)
        self.batch_size = batch_size
        self.num_classes = num_classes

    def prepare_batch(self, data):
        n, dev = self.batch_size, self.device
        return {
            "z": torch.randn(n, unwrap(self.gen.module).z_dim, generator=self.noise, device=dev),
            "y": torch.randint(0, self.num_classes, (n,), generator=self.noise, device=dev),
        }

    def training_step(self, batch):
        fake = self.gen.module(self.module(batch["z"]), batch["y"])
        loss = F.cross_entropy(self.w2(fake), batch["y"])
        self.record("tau", unwrap(self.module).tau)
        return loss
