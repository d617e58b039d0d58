"""How right is the meta level's hypergradient? Per path and per hop, on a real config's networks.

    python -m experiments.bench.hypergradient [CONFIG] [key=value ...] [--seeds 0,1,2] [--meta-steps 3]
                                              [--hops darts,exact]

For each hop type (default: the config's ``train.hypergradient``), trains the end-to-end MLO from each
seed and, at each of the first meta steps, reads the gradient the engine gave A (the sweep of
``mlo.hypergradient``) and compares it with references computed path by path on the same weights
and batches (``mlo.hypergradient.path_gradients``):

- per path: the norm of its contribution with exact hops and its cosine to the direct gradient;
- per hop along the path: the cosine of this hop type's output to the exact hop's on the same input;
- the total: cosine and relative error of A's gradient to the exact total (direct + exact paths), and
  the same for the hypergradient part alone (total minus direct).

GAN pre-training runs first if the config asks for it (``gan.gan_pretrain_steps``).
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import torch


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """In fp64 and without F.cosine_similarity's floor of 1e-8 on the norms (far hops are smaller)."""
    a, b = a.double(), b.double()
    if a.norm() == 0 or b.norm() == 0:
        return float("nan")
    return (a @ b / (a.norm() * b.norm())).item()


def path_report(meta, kind: str) -> dict:
    """Per path: norm (exact hops), cosine to the direct gradient, and per hop the cosine of ``kind``'s
    output to the exact hop's on the same (exact) input vector."""
    from mlo.hypergradient import hop, path_gradients

    exact = path_gradients(meta, kind="exact")
    direct = _flat(exact["direct"])
    report = {}
    for path in meta.paths:
        name = ">".join(level.name for level in path)
        first = path[1].trainable_parameters()
        loss = meta.training_step_exec(meta.cur_batch)  # anew: a darts hop writes the weights it perturbed back
        vector = [g if g is not None else torch.zeros_like(p)
                  for g, p in zip(torch.autograd.grad(loss, first, allow_unused=True), first)]
        hops = []
        for curr, prev in zip(path[1:-1], path[2:]):
            reference = hop(curr, vector, [prev], kind="exact")[0]
            estimate = hop(curr, vector, [prev], kind=kind)[0]
            hops.append((f"{curr.name}>{prev.name}", _cosine(_flat(estimate), _flat(reference))))
            vector = reference
        contribution = _flat(exact[name])
        report[name] = {"norm": contribution.norm().item(), "cos_direct": _cosine(contribution, direct), "hops": hops}
    return {"paths": report, "exact_total": direct + sum(_flat(exact[n]) for n in report), "direct": direct}


def measure(cfg, meta_steps: int) -> list[dict]:
    from experiments.phases import build_phases
    from experiments.runner import Run
    from mlo.trainer import Phase, Trainer

    run = Run(cfg)
    meta = run.levels["meta"]
    kind = cfg.train.hypergradient
    reports = []

    def compare():  # called by Betty after meta's backward, before its optimizer step
        engine = _flat([p.grad for p in meta.trainable_parameters()]).clone()
        report = path_report(meta, kind if kind != "first_order" else "exact")
        exact, direct = report["exact_total"], report["direct"]
        report["total_cos"] = _cosine(engine, exact)
        report["total_rel"] = ((engine - exact).norm() / exact.norm()).item()
        report["hyper_cos"] = _cosine(engine - direct, exact - direct)
        report["hyper_rel"] = ((engine - exact).norm() / (exact - direct).norm().clamp(min=1e-30)).item()
        reports.append(report)

    meta.grad_callback = compare
    pretrain = [p for p in build_phases(run) if p.name == "GAN pre-training"]
    Trainer(run.engine, pretrain + [Phase("measure", meta_steps * cfg.train.meta_every)], progress=False).run()
    return reports


def summarise(kind: str, reports: list[dict]) -> list[str]:
    lines = [f"hops: {kind} ({len(reports)} meta steps)"]
    paths = defaultdict(list)
    for r in reports:
        for name, p in r["paths"].items():
            paths[name].append(p)
    lines.append(f"  {'path':26s} {'norm (exact)':>14s} {'cos to direct':>14s}  cosine of each hop to the exact hop")
    direct_norms = [r["direct"].norm().item() for r in reports]
    lines.append(f"  {'direct':26s} {_range(direct_norms):>14s} {'1':>14s}")
    for name, items in paths.items():
        hop_names = [h for h, _ in items[0]["hops"]]
        hops = "  ".join(f"{h} {_range([it['hops'][i][1] for it in items], '.4f')}" for i, h in enumerate(hop_names))
        lines.append(f"  {name:26s} {_range([it['norm'] for it in items]):>14s} "
                     f"{_range([it['cos_direct'] for it in items], '.3f'):>14s}  {hops}")
    lines.append(f"  total:        cosine to exact {_range([r['total_cos'] for r in reports], '.5f')}, "
                 f"relative error {_range([r['total_rel'] for r in reports])}")
    lines.append(f"  hypergradient (total - direct): cosine to exact {_range([r['hyper_cos'] for r in reports], '.4f')}, "
                 f"relative error {_range([r['hyper_rel'] for r in reports])}")
    return lines


def _range(values, fmt: str = ".2e") -> str:
    values = [v for v in values if v == v]  # drop NaN (a zero vector has no direction)
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo:{fmt}}" if lo == hi else f"{lo:{fmt}}..{hi:{fmt}}"


def main(argv: list[str] | None = None) -> int:
    from experiments.config_files import load_run_config, resolve_config_path, split_args

    parser = argparse.ArgumentParser(prog="python -m experiments.bench.hypergradient",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]")
    parser.add_argument("--seeds", default="0,1,2", help="seeds, each a run from scratch (default 0,1,2)")
    parser.add_argument("--meta-steps", type=int, default=3, help="meta steps measured per seed (default 3)")
    parser.add_argument("--hops", default=None, help="hop types to measure, e.g. darts,exact (default: the config's)")
    args = parser.parse_args(argv)
    config_arg, overrides = split_args(args.items)
    base = load_run_config(resolve_config_path(config_arg), ["gan.gan_pretrain_steps=0"] + overrides)
    kinds = args.hops.split(",") if args.hops else [base.train.hypergradient]
    print(f"config {config_arg or 'digits_lt'}: dataset {base.data.dataset}, encoder {base.model.encoder}, "
          f"A {base.model.meta} ({base.model.meta_activation}), generator {base.gan.generator} (ch {base.gan.gan_ch}), "
          f"GAN pre-training {base.gan.gan_pretrain_steps} steps, darts_alpha {base.train.darts_alpha:g}, "
          f"seeds {args.seeds}, {torch.get_num_threads()} threads")
    for kind in kinds:
        reports = []
        for seed in args.seeds.split(","):
            cfg = load_run_config(resolve_config_path(config_arg), ["gan.gan_pretrain_steps=0"] + overrides + [
                "train.mode=end2end", "run.progress=false", f"train.hypergradient={kind}", f"run.seed={seed}"])
            reports += measure(cfg, args.meta_steps)
        print("\n".join(summarise(kind, reports)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
