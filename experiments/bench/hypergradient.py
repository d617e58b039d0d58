"""How close the meta level's hypergradient is to the exact one, on a real config's networks.

    python -m experiments.bench.hypergradient [CONFIG] [key=value ...] [--meta-steps 3] [--alphas 0.01,0.001]

For each finite-difference step ``darts_alpha`` (and for ``exact`` hops), trains the end-to-end
MLO from the same seed and, at each meta step, compares the gradient Betty computed for A with
``mlo.hypergradient.reference_gradient`` (direct gradient plus exact double-backward hops on
every path): cosine similarity and relative error. GAN pre-training is skipped.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F


def measure(cfg, meta_steps: int) -> list[tuple[float, float]]:
    from experiments.runner import Run
    from mlo.hypergradient import reference_gradient
    from mlo.trainer import Phase, Trainer

    run = Run(cfg)
    meta = run.levels["meta"]
    reports = []

    def compare():
        betty = torch.cat([p.grad.reshape(-1) for p in meta.trainable_parameters()]).clone()
        exact = torch.cat([g.reshape(-1) for g in reference_gradient(meta)])
        reports.append((F.cosine_similarity(betty, exact, dim=0).item(),
                        ((betty - exact).norm() / exact.norm()).item()))

    meta.grad_callback = compare
    Trainer(run.engine, [Phase("measure", meta_steps * cfg.train.meta_every)], progress=False).run()
    return reports


def main(argv: list[str] | None = None) -> int:
    from experiments.cli import resolve_config_path, split_args
    from mlo.config import load_config

    parser = argparse.ArgumentParser(prog="python -m experiments.bench.hypergradient",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]")
    parser.add_argument("--meta-steps", type=int, default=3, help="meta steps measured per setting")
    parser.add_argument("--alphas", default="0.01,0.001,0.0001", help="darts_alpha values to measure")
    args = parser.parse_args(argv)
    config_arg, overrides = split_args(args.items)
    settings = [("darts", float(a)) for a in args.alphas.split(",")] + [("exact", 0.0)]
    print(f"{'hops':8s} {'alpha':>8s}  cosine to exact (per meta step)          relative error")
    for kind, alpha in settings:
        cfg = load_config(resolve_config_path(config_arg), overrides + [
            "train.mode=end2end", "gan.gan_pretrain_steps=0", "run.progress=false",
            f"train.hypergradient={kind}"] + ([f"train.darts_alpha={alpha}"] if kind == "darts" else []))
        reports = measure(cfg, args.meta_steps)
        cos = " ".join(f"{c:7.4f}" for c, _ in reports)
        rel = " ".join(f"{r:8.2e}" for _, r in reports)
        print(f"{kind:8s} {alpha if kind == 'darts' else '-':>8}  {cos:40s} {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
