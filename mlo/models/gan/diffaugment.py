"""DiffAugment (Zhao et al., 2020) with its randomness split out: ``sample_params`` draws the
per-image choices (in a problem's ``get_batch``), ``diffaugment`` applies them as a pure,
differentiable function — so finite-difference hops see the same augmentation as the step."""
from __future__ import annotations

import torch
import torch.nn.functional as F

POLICIES = ("color", "translation", "cutout")
TRANSLATION_RATIO, CUTOUT_RATIO = 0.125, 0.5


def parse_policy(text: str) -> tuple[str, ...]:
    return tuple(p for p in text.split(",") if p and p != "none")


def sample_params(policy: tuple[str, ...], n: int, image_size: int, generator: torch.Generator,
                  device) -> dict[str, torch.Tensor]:
    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=device)

    def randint(low, high, *shape):
        return torch.randint(low, high, shape, generator=generator, device=device)

    params: dict[str, torch.Tensor] = {}
    if "color" in policy:
        params["brightness"] = rand(n, 1, 1, 1) - 0.5
        params["saturation"] = rand(n, 1, 1, 1) * 2
        params["contrast"] = rand(n, 1, 1, 1) + 0.5
    if "translation" in policy:
        shift = int(image_size * TRANSLATION_RATIO + 0.5)
        params["shift"] = randint(-shift, shift + 1, n, 2)
    if "cutout" in policy:
        cut = int(image_size * CUTOUT_RATIO + 0.5)
        params["cutout"] = randint(0, image_size + (1 - cut % 2), n, 2)
    return params


def diffaugment(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    if "brightness" in params:
        x = x + params["brightness"]
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * params["saturation"] + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * params["contrast"] + mean
    n, _, h, w = x.shape
    if "shift" in params:
        shift = params["shift"]
        rows = (torch.arange(h, device=x.device)[None, :] + shift[:, :1] + 1).clamp(0, h + 1)  # (n, h)
        cols = (torch.arange(w, device=x.device)[None, :] + shift[:, 1:] + 1).clamp(0, w + 1)  # (n, w)
        padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)
        x = padded[torch.arange(n, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
        x = x.permute(0, 3, 1, 2)
    if "cutout" in params:
        cut_h, cut_w = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
        cy = params["cutout"][:, :1] - cut_h // 2  # top-left corner, may lie outside the image
        cx = params["cutout"][:, 1:] - cut_w // 2
        ys = torch.arange(h, device=x.device)[None, :]
        xs = torch.arange(w, device=x.device)[None, :]
        inside_y = (ys >= cy) & (ys < cy + cut_h)  # (n, h)
        inside_x = (xs >= cx) & (xs < cx + cut_w)  # (n, w)
        mask = ~(inside_y[:, :, None] & inside_x[:, None, :])
        x = x * mask[:, None].to(x.dtype)
    return x.contiguous()
