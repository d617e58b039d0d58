"""Seconds per iteration of vanilla W and of the end-to-end MLO, same data and batch size, one process.

    needsgen bench [CONFIG] [key=value ...] [--iters 32] [--warmup 8] [--check-syncs]

Both modes are built from the same config (``train.mode`` is set here); GAN pre-training is not
timed. An iteration of end2end is one W1/H/W2 step plus, every ``meta_every`` iterations, a G and
an A step with its five hypergradient paths, so ``--iters`` should be a multiple of ``meta_every``.
The timed iterations end at one of the loop's sync points and a device synchronize, so the work a
GPU still had queued is counted.

The GPU benchmark of CIFAR-10-LT's shapes (ResNet-32, BigGAN ch=64, bf16, batch 64) is the shipped
config ``bench_cifar10_synthetic``, on random images, so it needs no CIFAR files.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager

import torch


@contextmanager
def warn_on_host_syncs(enabled: bool):
    """On CUDA, torch warns at every host sync inside (``torch.cuda.set_sync_debug_mode``)."""
    if not enabled:
        yield
        return
    torch.cuda.set_sync_debug_mode("warn")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def time_mode(cfg, mode: str, iters: int, warmup: int, check_syncs: bool = False) -> dict:
    from experiments.runner import Run
    from mlo.trainer import Phase, Trainer

    cfg.set("train.mode", mode)
    cfg.set("gan.gan_pretrain_steps", 0)
    run = Run(cfg)
    on_cuda = run.device.type == "cuda"
    synchronize = (lambda: torch.cuda.synchronize(run.device)) if on_cuda else (lambda: None)

    def train(name: str, iterations: int) -> None:
        Trainer(run.engine, [Phase(name, iterations)], progress=False, sync_every=cfg.run.sync_every).run()

    train("warm-up", warmup)
    synchronize()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(run.device)
    start = time.perf_counter()
    with warn_on_host_syncs(check_syncs):
        train("timed", iters)
    synchronize()
    seconds = (time.perf_counter() - start) / iters
    return {"mode": mode, "seconds_per_iteration": seconds, "device": run.device,
            "images_per_s": cfg.train.batch_size / seconds,
            "peak_gib": torch.cuda.max_memory_allocated(run.device) / 2 ** 30 if on_cuda else None}


def main(argv: list[str] | None = None) -> int:
    from experiments.cli import resolve_config_path, split_args
    from mlo.config import load_config
    from mlo.errors import UserError

    parser = argparse.ArgumentParser(prog="needsgen bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]")
    parser.add_argument("--iters", type=int, default=32, help="timed iterations per mode (default 32)")
    parser.add_argument("--warmup", type=int, default=8, help="untimed iterations first (default 8)")
    parser.add_argument("--check-syncs", action="store_true",
                        help="CUDA only: warn at every host sync during the timed iterations")
    args = parser.parse_args(argv)
    config_arg, overrides = split_args(args.items)
    cfg = load_config(resolve_config_path(config_arg), overrides + ["run.progress=false"])
    if args.check_syncs and not torch.cuda.is_available():
        raise UserError("--check-syncs needs a CUDA device (torch.cuda.set_sync_debug_mode)")
    results = [time_mode(cfg, mode, args.iters, args.warmup, args.check_syncs) for mode in ("vanilla", "end2end")]
    vanilla, end2end = results
    device = vanilla["device"]
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    print(f"dataset {cfg.data.dataset}, encoder {cfg.model.encoder}, generator {cfg.gan.generator} "
          f"(ch={cfg.gan.gan_ch}), batch {cfg.train.batch_size}, meta_every {cfg.train.meta_every}, "
          f"{cfg.train.precision}, channels_last {str(cfg.run.channels_last).lower()}, compile {cfg.run.compile}, "
          f"device {device} ({where})")
    print(f"{'mode':10s} {'s/iteration':>12s} {'images/s':>10s}" + (f" {'peak GiB':>9s}" if vanilla["peak_gib"] else ""))
    for r in results:
        print(f"{r['mode']:10s} {r['seconds_per_iteration']:12.4f} {r['images_per_s']:10.1f}"
              + (f" {r['peak_gib']:9.2f}" if r["peak_gib"] else ""))
    print(f"end2end / vanilla = {end2end['seconds_per_iteration'] / vanilla['seconds_per_iteration']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
