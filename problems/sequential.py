"""W2 of the sequential baseline: real images plus a set generated once, before W2 trains."""
from __future__ import annotations

import torch

from mlo.data.loaders import make_loader
from problems.classifier import ClassifierProblem


class PregeneratedClassifierProblem(ClassifierProblem):
    """``L_cls(W2, D_tr) + λ · L_cls(W2, D_gen)`` with ``D_gen`` made once from a frozen p(s);
    W2 reads neither W1 nor G, so nothing flows back to them. A count-aware loss corrects for the real
    counts plus λ times the generated set's, or for the real counts alone (``count_generated=False``).

    Its second loader is a placeholder until ``set_generated`` installs the generated set (the
    phase that trains W2 does so when it starts, and again when a run resumes inside it)."""

    def __init__(self, name, config, module, optimizer, scheduler=None, train_data_loader=None, *,
                 lambda_gen: float, gen_per_step: int, train_counts, count_generated: bool = True, **kwargs):
        super().__init__(name, config, module, optimizer, scheduler, train_data_loader, **kwargs)
        self.lambda_gen = lambda_gen
        self.gen_per_step = gen_per_step
        self.train_counts = torch.as_tensor(train_counts, dtype=torch.float)
        self.count_generated = count_generated
        # per epoch, real plus λ times the generated set's (set with it); None: the loss's own real counts
        self.class_counts = None

    def set_generated(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
        """Install the generated set, keeping the loader position (epoch, batch) of a resumed run; under
        torchrun every process builds the same set and takes its share of each batch."""
        n = self.world_size
        if self.count_generated:
            generated = torch.zeros_like(self.train_counts).index_add_(0, labels.cpu(), torch.ones(len(labels)))
            self.class_counts = (self.train_counts + self.lambda_gen * generated).to(self.device)
        loader = make_loader("shuffle", images, labels.cpu().numpy(), self.gen_per_step * n, seed=seed,
                             device=self.device, rank=self._rank, world_size=n)
        loader.load_state_dict(self.train_data_loader[1].state_dict())
        self.train_data_loader[1] = loader
        self.train_data_iterator[1] = iter(loader)

    def prepare_batch(self, data):
        (x, y), (x_gen, y_gen) = data
        return {"x": x, "y": y, "x_gen": x_gen, "y_gen": y_gen}

    def training_step(self, batch):
        n, y = batch["y"].shape[0], torch.cat([batch["y"], batch["y_gen"]])
        self.record_trained_on(y, torch.cat([torch.ones(n, device=y.device),
                                             torch.full_like(batch["y_gen"], self.lambda_gen, dtype=torch.float)]))
        losses = self.per_sample_loss(torch.cat([batch["x"], batch["x_gen"]]), y, batch["progress"], real=n,
                                      class_counts=self.class_counts)
        return losses[:n].mean() + self.lambda_gen * losses[n:].mean()
