"""The few adjustments Betty 0.2.1 needs on current torch, in one place.

- Mixed precision: Betty wraps ``training_step`` in ``torch.cuda.amp.autocast`` (deprecated, and
  silently fp32 on CPU) and builds ``torch.cuda.amp.GradScaler`` (asserting CUDA). Here autocast is
  ``torch.autocast(device_type=...)`` and fp16's scaler is ``torch.amp.GradScaler``.
- Devices: Betty's strategies pick ``"cpu"`` or ``"cuda"``; the engine here takes any device.
- Logging: Betty logs problem wiring at INFO on stdout; it is lowered to WARNING so a run's own
  progress output stays readable.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
from betty.engine import Engine
from betty.logging.logger_base import get_logger
from betty.problems import ImplicitProblem
from betty.utils import get_dtype

get_logger().setLevel(logging.WARNING)  # Betty sets INFO when it first creates its logger


def device_type(device) -> str:
    return torch.device(device).type


def autocast(device, precision: str):
    """Autocast for bf16/fp16 on any device type; a no-op context for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device_type(device), dtype=get_dtype(precision))


class CompatProblem(ImplicitProblem):
    """``ImplicitProblem`` with device-generic autocast and gradient scaling."""

    def initialize(self):
        precision = self.precision
        self.precision = "fp32" if precision == "fp16" else precision  # keep Betty's CUDA-only scaler out
        try:
            super().initialize()
        finally:
            self.precision = precision
        if precision == "fp16":
            self.scaler = torch.amp.GradScaler(device_type(self.device), init_scale=self.initial_dynamic_scale,
                                               growth_factor=self.scale_factor)

    def training_step_exec(self, batch):
        with autocast(self.device, self.precision):
            return self.training_step(batch)


class CompatEngine(Engine):
    """Betty's Engine on an explicit device: Betty's strategies only know ``"cpu"`` and ``"cuda"``
    (no ``cuda:N``)."""

    def __init__(self, problems, config=None, dependencies=None, device="cpu"):
        self._requested_device = torch.device(device)
        super().__init__(problems, config=config, dependencies=dependencies)

    def configure_systems(self):
        dist_dict = super().configure_systems()
        if self._strategy not in ("distributed", "zero", "fsdp"):
            self.device = self._requested_device
        return dist_dict
