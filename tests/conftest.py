"""Shared helpers: tiny configs on the bundled digits data, so every test runs on CPU in seconds."""
from __future__ import annotations

import pytest
import torch

from mlo.config import load_config
from tests import smooth_models  # noqa: F401  (registers tiny_tanh, tiny_tanh_gan and tiny_tanh_wacgan_gp)

TINY = [
    "data.dataset=digits", "data.imbalance_factor=4", "data.val_per_class=4", "data.test_per_class=20",
    "data.val_batch_size=20", "model.encoder=small_cnn", "model.width=4", "gan.gan_ch=4", "gan.z_dim=8",
    "gan.shared_dim=4", "gan.gan_pretrain_steps=0", "train.batch_size=16", "train.epochs=1",
    "run.device=cpu", "run.progress=false",
]


def tiny_config(*overrides: str):
    return load_config(None, TINY + list(overrides))


# Smooth networks throughout (A included): finite differences of gradients then cross no kink.
SMOOTH = ["model.encoder=tiny_tanh", "model.width=8", "model.meta_activation=tanh", "gan.generator=tiny_tanh_gan",
          "gan.gan_ch=8", "gan.diffaugment=translation,cutout"]


def build_run(*overrides: str):
    """A configured run (data, levels, engine, phases) without a run directory."""
    from experiments.runner import Run
    return Run(tiny_config(*overrides))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
