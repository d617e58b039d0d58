"""Seconds per iteration of vanilla W and of the end-to-end MLO, same data and batch size, one process.

    python -m experiments.bench.speed [CONFIG] [key=value ...] [--iters 32] [--warmup 8]

Both modes are built from the same config (``train.mode`` is set here); GAN pre-training is not
timed. An iteration of end2end is one W1/H/W2 step plus, every ``meta_every`` iterations, a G and
an A step with its five hypergradient paths, so ``--iters`` should be a multiple of ``meta_every``.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def time_mode(cfg, mode: str, iters: int, warmup: int) -> dict:
    from experiments.runner import Run
    from mlo.trainer import Phase, Trainer

    cfg.set("train.mode", mode)
    cfg.set("gan.gan_pretrain_steps", 0)
    run = Run(cfg)
    synchronize = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
    Trainer(run.engine, [Phase("warm-up", warmup)], progress=False).run()
    synchronize()
    start = time.perf_counter()
    Trainer(run.engine, [Phase("timed", iters)], progress=False).run()
    synchronize()
    seconds = (time.perf_counter() - start) / iters
    return {"mode": mode, "seconds_per_iteration": seconds, "device": str(run.device),
            "images_per_s": cfg.train.batch_size / seconds}


def main(argv: list[str] | None = None) -> int:
    from experiments.cli import resolve_config_path, split_args
    from mlo.config import load_config

    parser = argparse.ArgumentParser(prog="needsgen bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]")
    parser.add_argument("--iters", type=int, default=32, help="timed iterations per mode (default 32)")
    parser.add_argument("--warmup", type=int, default=8, help="untimed iterations first (default 8)")
    args = parser.parse_args(argv)
    config_arg, overrides = split_args(args.items)
    cfg = load_config(resolve_config_path(config_arg), overrides + ["run.progress=false"])
    results = [time_mode(cfg, mode, args.iters, args.warmup) for mode in ("vanilla", "end2end")]
    vanilla, end2end = results
    print(f"dataset {cfg.data.dataset}, encoder {cfg.model.encoder}, generator {cfg.gan.generator} "
          f"(ch={cfg.gan.gan_ch}), batch {cfg.train.batch_size}, meta_every {cfg.train.meta_every}, "
          f"device {vanilla['device']}, {torch.get_num_threads()} threads")
    print(f"{'mode':10s} {'s/iteration':>12s} {'images/s':>10s}")
    for r in results:
        print(f"{r['mode']:10s} {r['seconds_per_iteration']:12.4f} {r['images_per_s']:10.1f}")
    print(f"end2end / vanilla = {end2end['seconds_per_iteration'] / vanilla['seconds_per_iteration']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
