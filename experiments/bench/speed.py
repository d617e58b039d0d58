"""Seconds per iteration of vanilla W and of the end-to-end MLO, same data and batch size, one process,
and where the end-to-end time goes.

    needsgen bench [CONFIG] [key=value ...] [--iters 32] [--warmup 8] [--modes vanilla,end2end] [--check-syncs]

Every mode is built from the same config (``train.mode`` is set here); GAN pre-training is not timed.
An iteration of end2end is one W1/H/W2 step plus, every ``meta_every`` iterations, a G and an A step
with its hypergradient (one reverse sweep of hops), so ``--iters`` should be a multiple of
``meta_every``. The timed iterations end at one of the loop's sync points and a device synchronize,
so the work a GPU still had queued is counted.

The breakdown (one more timed pass, with timers and counters installed; on a GPU each timer waits for
the device, so it slows the run a little): per iteration, the seconds of each level's own step
(without the hops inside it), of each hop (named by the level it differentiates through), and the
rest (loading batches, the loop, bookkeeping); the forward passes of each level's network and the
backward passes (``autograd.grad``/``backward`` calls) in steps and in hops. "steps" is the floor the
method's own work sets; "hops + rest" is the overhead on top of it.

The GPU benchmark of CIFAR-10-LT's shapes (ResNet-32, BigGAN ch=64, bf16, batch 64) is the shipped
config ``bench_cifar10_synthetic``, on random images, so it needs no CIFAR files.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import Counter, defaultdict
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


class Breakdown:
    """Exclusive wall time per label (a level's step, a hop), forward passes per network and backward
    passes per label, while installed. Labels nest: a hop inside A's step is not A's step time."""

    def __init__(self, run, synchronize):
        self.run, self.synchronize = run, synchronize
        self.seconds: dict[str, float] = defaultdict(float)
        self.forwards: Counter = Counter()
        self.backwards: Counter = Counter()
        self.stack: list[list] = []  # [label, start, time of nested labels]
        self.undo = []

    @contextmanager
    def label(self, name: str):
        self.synchronize()
        self.stack.append([name, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            self.synchronize()
            label, start, nested = self.stack.pop()
            elapsed = time.perf_counter() - start
            self.seconds[label] += elapsed - nested
            if self.stack:
                self.stack[-1][2] += elapsed

    def _timed(self, original, label):
        def wrapped(*args, **kwargs):
            with self.label(label(*args) if callable(label) else label):
                return original(*args, **kwargs)
        return wrapped

    def _wrap(self, owner, attr: str, label):
        original = getattr(owner, attr)
        setattr(owner, attr, self._timed(original, label))
        self.undo.append(lambda: setattr(owner, attr, original))

    def _wrap_item(self, table: dict, key: str, label):
        original = table[key]
        table[key] = self._timed(original, label)
        self.undo.append(lambda: table.__setitem__(key, original))

    def _count_backward(self, owner, attr: str):
        original = getattr(owner, attr)

        def counted(*args, **kwargs):
            self.backwards["hops" if self.stack and self.stack[-1][0].startswith("hop") else "steps"] += 1
            return original(*args, **kwargs)

        setattr(owner, attr, counted)
        self.undo.append(lambda: setattr(owner, attr, original))

    def __enter__(self):
        from mlo import hypergradient

        for name, problem in self.run.levels.items():
            self._wrap(problem, "one_step_descent", f"step {name}")
            handle = problem.module.register_forward_hook(lambda *_, n=name: self.forwards.update([n]))
            self.undo.append(handle.remove)
        for kind in list(hypergradient.HOPS):
            self._wrap_item(hypergradient.HOPS, kind, lambda level, *_: f"hop {level.name}")
        self._count_backward(torch.autograd, "grad")
        self._count_backward(torch.autograd, "backward")
        return self

    def __exit__(self, *exc):
        for undo in reversed(self.undo):
            undo()


def time_mode(cfg, mode: str, iters: int, warmup: int, check_syncs: bool = False, breakdown: bool = False) -> dict:
    from experiments.registry import get_mode
    from experiments.runner import Run
    from mlo.trainer import Phase, Trainer

    cfg = copy.deepcopy(cfg)  # each mode from the same settings
    cfg.set("train.mode", mode)
    cfg.set("gan.gan_pretrain_steps", 0)
    if cfg.model.tie_encoders and not {"w2", "disc"} & set(get_mode(mode).levels):
        cfg.set("model.tie_encoders", False)  # one classifier has nothing to share its encoder with
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
    result = {"mode": mode, "seconds_per_iteration": seconds, "device": run.device,
              "images_per_s": cfg.train.batch_size / seconds,
              "peak_gib": torch.cuda.max_memory_allocated(run.device) / 2 ** 30 if on_cuda else None}
    if breakdown:
        with Breakdown(run, synchronize) as b:
            start = time.perf_counter()
            train("profiled", iters)
            synchronize()
            total = time.perf_counter() - start
        result["breakdown"] = {"total": total / iters, "seconds": {k: v / iters for k, v in b.seconds.items()},
                               "forwards": {k: v / iters for k, v in b.forwards.items()},
                               "backwards": {k: v / iters for k, v in b.backwards.items()}}
    return result


def breakdown_lines(result: dict) -> list[str]:
    b = result["breakdown"]
    steps = {k: v for k, v in b["seconds"].items() if k.startswith("step")}
    hops = {k: v for k, v in b["seconds"].items() if k.startswith("hop")}
    own, hop_total = sum(steps.values()), sum(hops.values())
    rest = b["total"] - own - hop_total
    lines = [f"  {result['mode']}: {b['total']:.4f} s/iteration with timers = steps {own:.4f} + hops {hop_total:.4f} "
             f"+ rest {rest:.4f}; overhead on the steps (hops + rest) {100 * (hop_total + rest) / own:.0f}%"]
    lines.append("    " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(steps.items(), key=lambda kv: -kv[1])))
    if hops:
        lines.append("    " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(hops.items(), key=lambda kv: -kv[1])))
    lines.append("    forward passes per iteration: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(b["forwards"].items()))
                 + "; backward passes: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(b["backwards"].items())))
    return lines


def main(argv: list[str] | None = None) -> int:
    from experiments.config_files import load_run_config, resolve_config_path, split_args
    from mlo.errors import UserError

    parser = argparse.ArgumentParser(prog="needsgen bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]")
    parser.add_argument("--iters", type=int, default=32, help="timed iterations per mode (default 32)")
    parser.add_argument("--warmup", type=int, default=8, help="untimed iterations first (default 8)")
    parser.add_argument("--modes", default="vanilla,end2end", help="modes to time (default vanilla,end2end); "
                                                                     "the first is the reference of the ratios")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the profiled pass")
    parser.add_argument("--check-syncs", action="store_true",
                        help="CUDA only: warn at every host sync during the timed iterations")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options, as in run and compare
    config_arg, overrides = split_args(args.items)
    cfg = load_run_config(resolve_config_path(config_arg), overrides + ["run.progress=false"])
    if args.check_syncs and not torch.cuda.is_available():
        raise UserError("--check-syncs needs a CUDA device (torch.cuda.set_sync_debug_mode)")
    modes = args.modes.split(",")
    results = [time_mode(cfg, mode, args.iters, args.warmup, args.check_syncs, breakdown=not args.no_breakdown)
               for mode in modes]
    reference = results[0]
    device = reference["device"]
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    print(f"dataset {cfg.data.dataset}, encoder {cfg.model.encoder}, generator {cfg.gan.generator} "
          f"(ch={cfg.gan.gan_ch}), batch {cfg.train.batch_size}, meta_every {cfg.train.meta_every}, "
          f"hops {cfg.train.hypergradient}, tied encoders {str(cfg.model.encoders_tied).lower()}, "
          f"{cfg.train.precision}, channels_last {str(cfg.run.channels_last).lower()}, compile {cfg.run.compile}, "
          f"device {device} ({where})")
    print(f"{'mode':12s} {'s/iteration':>12s} {'images/s':>10s}" + (f" {'peak GiB':>9s}" if reference["peak_gib"] else ""))
    for r in results:
        print(f"{r['mode']:12s} {r['seconds_per_iteration']:12.4f} {r['images_per_s']:10.1f}"
              + (f" {r['peak_gib']:9.2f}" if r["peak_gib"] else ""))
    for r in results[1:]:
        print(f"{r['mode']} / {reference['mode']} = {r['seconds_per_iteration'] / reference['seconds_per_iteration']:.1f}x")
    if not args.no_breakdown:
        print("where the time goes (a second timed pass, with timers):")
        for r in results:
            print("\n".join(breakdown_lines(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
