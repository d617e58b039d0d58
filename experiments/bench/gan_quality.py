"""How good a generator does a pre-training budget buy? GAN-train of candidate GANs after their pre-training.

    python -m experiments.bench.gan_quality [CONFIG] --candidates NAME=k=v+k=v,... [--seeds 0] [--images 2000]
                                            [--epochs 10] [key=value ...]

Each candidate is the config's run (``train.mode`` included, since H reads A in the modes with a meta level)
with its overrides; only its GAN pre-training phase runs, through ``run.gan_cache``
(``<out_dir>/gan_quality/gan_cache``), so a comparison given the same cache folder starts from these GANs
instead of pre-training them again. Then a classifier of the run's encoder is trained ``--epochs`` epochs on
``--images`` images of the EMA generator (as many as the real training set by default; classes as in the
test set; latents truncated at the candidate's ``gan.truncation``, as W2's images are, so a truncation candidate
scores the images W2 would learn from and shares its pre-trained GAN with the untruncated one) and scored:

- on the held-out images, the part of the training pool the long-tail cut leaves out (up to 300 a class):
  neither training nor test data, so choosing a generator by this score does not look at the test set;
- on the test set (GAN-train, the number the README reports), overall and per class.

Results go to ``<out_dir>/gan_quality/<name>-seed<s>.json`` (finished candidates are reused) and a table
is printed, with the pre-training's seconds (one process, the thread count of ``run.threads``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_candidates(text: str) -> list[tuple[str, list[str]]]:
    from mlo.errors import ConfigError

    out = []
    for spec in (s.strip() for s in text.split(",") if s.strip()):
        name, _, rest = spec.partition("=")
        overrides = [o for o in rest.split("+") if o] if rest else []
        if not name or any("=" not in o for o in overrides):
            raise ConfigError(f"--candidates: '{spec}' is not NAME=key=value+key=value")
        out.append((name, overrides))
    if not out or len({n for n, _ in out}) != len(out):
        raise ConfigError(f"--candidates: give distinct names, e.g. small=gan.gan_ch=8,wide=gan.gan_ch=16 (got '{text}')")
    return out


def pretrain_and_score(cfg, images: int | None, epochs: int) -> dict:
    """The GAN pre-training of ``cfg``'s run alone (shared through run.gan_cache), then GAN-train."""
    import numpy as np
    import torch

    from experiments.gan_eval import ema_generator
    from experiments.runner import PRETRAINING, Run
    from mlo.data.loaders import derive_seed, to_uint8
    from mlo.gan_metrics import gan_train_test
    from mlo.models.gan.sampling import generate
    from mlo.trainer import Trainer

    run = Run(cfg)
    phase = [p for p in run.trainer.phases if p.name == PRETRAINING]
    start = time.perf_counter()
    Trainer(run.engine, phase, progress=cfg.run.progress).run()
    seconds = time.perf_counter() - start
    d, t, seed = run.data, cfg.train, cfg.run.seed
    images = images or len(d.train_labels)
    idx = np.random.default_rng(derive_seed(seed, 1)).choice(len(d.test_labels), images, replace=images > len(d.test_labels))
    labels = np.asarray(d.test_labels)[np.sort(idx)]  # the test set's classes (balanced)
    fake = to_uint8(generate(ema_generator(run), torch.from_numpy(labels), derive_seed(seed, 2), run.device,
                             cfg.gan.truncation))
    holdout = None if d.holdout_images is None else (d.holdout_images, d.holdout_labels)
    scores = gan_train_test(lambda: run.ctx.classifier("w1", standalone=True), (d.train_images, d.train_labels),
                            (d.test_images, d.test_labels), (fake, labels), epochs=epochs, batch_size=t.batch_size,
                            lr=t.lr, seed=seed, device=run.device, holdout=holdout)
    return {"pretrain_steps": cfg.gan.gan_pretrain_steps, "truncation": cfg.gan.truncation,
            "pretrained": run.gan_pretrained,
            "pretrain_seconds": round(run.trainer.phase_seconds.get(PRETRAINING, seconds), 1),
            "threads": torch.get_num_threads(), "images": len(labels), "epochs": epochs,
            "train_counts": list(d.train_counts), **scores}


def main(argv: list[str] | None = None) -> int:
    from experiments.config_files import load_run_config, resolve_config_path, split_args
    from experiments.variants import parse_seeds
    from mlo.checkpoint import atomic_write
    from mlo.report import markdown_table

    parser = argparse.ArgumentParser(prog="python -m experiments.bench.gan_quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]")
    parser.add_argument("--candidates", required=True, help="NAME=key=value+key=value, comma-separated")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--images", type=int, help="generated images GAN-train learns from (default: as many as the "
                                                   "real training set has, GAN-train's usual protocol)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of GAN-train's classifier (default 10)")
    args = parser.parse_args(argv)
    config_arg, overrides = split_args(args.items)
    path = resolve_config_path(config_arg)
    candidates, seeds = parse_candidates(args.candidates), parse_seeds(args.seeds)
    root = Path(load_run_config(path, overrides).run.out_dir).expanduser() / "gan_quality"
    configs = {(name, seed): load_run_config(path, [f"run.gan_cache={root / 'gan_cache'}", "run.progress=false", *overrides,
                                                *extra, f"run.seed={seed}"])
               for name, extra in candidates for seed in seeds}  # every candidate checked before any trains
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for (name, seed), cfg in configs.items():
        out = root / f"{name}-seed{seed}.json"
        result = json.loads(out.read_text()) if out.is_file() else None
        if result is not None and (result["images"], result["epochs"]) != (
                args.images or sum(result["train_counts"]), args.epochs):
            result = None  # scored another way: score again (the pre-trained GAN comes from the cache)
        if result is None:
            print(f"{name}, seed {seed}: pre-training {cfg.gan.gan_pretrain_steps} steps", file=sys.stderr)
            result = {"candidate": name, "seed": seed, "overrides": dict(c.split("=", 1) for c in dict(candidates)[name]),
                      **pretrain_and_score(cfg, args.images, args.epochs)}
            atomic_write(out, lambda f: f.write(json.dumps(result, indent=2).encode()))
        tail = [c for c, n in enumerate(result["train_counts"]) if n == min(result["train_counts"])]
        rows.append([name, str(seed), str(result["pretrain_steps"]), f"{result['pretrain_seconds']:.0f}",
                     f"{100 * result['gan_train_holdout']:.2f}" if "gan_train_holdout" in result else "-",
                     f"{100 * result['gan_train']:.2f}",
                     " ".join(f"{100 * result['gan_train_per_class'][str(c)]:.0f}" for c in range(len(result["train_counts"]))),
                     f"{100 * sum(result['gan_train_per_class'][str(c)] for c in tail) / len(tail):.1f}"])
    print(markdown_table(["candidate", "seed", "pre-training steps", "seconds", "GAN-train held-out %",
                          "GAN-train test %", "per class (test) %", "rarest class %"], rows))
    return 0


if __name__ == "__main__":
    from experiments.bench import run_script

    run_script(main, "gan_quality")
