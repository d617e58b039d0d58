"""The first thing to run on a CUDA machine: every mode and precision at CIFAR shapes, the hop types,
host syncs, torch.compile, and ImageNet-LT's shapes, a few iterations each (a few minutes in all).

    python -m experiments.bench.gpu_check [--iters 4] [--warmup 2] [--only LABEL,...]

Settings (each on random images, so no dataset is needed):
- CIFAR-10-LT's shapes (``bench_cifar10_synthetic``: ResNet-32, BigGAN ch 64, batch 64): every mode in fp32,
  bf16 and fp16 (exact hops); end2end with darts hops in each precision; end2end in bf16 with every host sync
  warned about (``--check-syncs``); end2end with ``run.compile=inductor`` and darts hops (compiled levels
  cannot be differentiated twice);
- ImageNet-LT's shapes (``synthetic_imagenet``: 1,000 classes at 128x128, batch 128, a 1,000-image validation
  batch in chunks of 100, BigGAN ch 64, bf16): vanilla and end2end with ViT-B/16 and with ResNet-50, through
  one meta step.

Prints, per setting and mode, seconds per iteration and peak GPU memory, and per setting end2end's time over
vanilla's; a setting that fails is reported as such and the check goes on (exit code 1 at the end). Without a
CUDA device it says so in one line and exits with code 2.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass

CIFAR = "bench_cifar10_synthetic"
IMAGENET = ["data.dataset=synthetic_imagenet", "data.image_size=128", "data.val_per_class=1",
            "data.val_batch_size=1000", "data.imbalance_factor=10", "data.augment=crop_flip", "train.batch_size=128",
            "train.meta_every=2", "train.meta_chunk=100", "train.precision=bf16", "gan.generator=biggan",
            "gan.gan_ch=64", "gan.z_dim=120", "gan.shared_dim=128", "model.meta=head"]


@dataclass(frozen=True)
class Setting:
    label: str
    config: str | None
    overrides: tuple[str, ...]
    modes: tuple[str, ...]
    check_syncs: bool = False


def settings() -> list[Setting]:
    from experiments.registry import registered_modes

    out = []
    for precision in ("fp32", "bf16", "fp16"):
        out.append(Setting(f"cifar {precision} exact", CIFAR, (f"train.precision={precision}",),
                           tuple(m.name for m in registered_modes())))
        out.append(Setting(f"cifar {precision} darts", CIFAR, (f"train.precision={precision}", "train.hypergradient=darts"),
                           ("vanilla", "end2end")))
    out.append(Setting("cifar bf16 syncs", CIFAR, ("train.precision=bf16",), ("vanilla", "end2end"), check_syncs=True))
    out.append(Setting("cifar bf16 inductor darts", CIFAR, ("train.precision=bf16", "train.hypergradient=darts",
                                                            "run.compile=inductor"), ("vanilla", "end2end")))
    for encoder in ("timm:vit_base_patch16_224", "timm:resnet50"):
        out.append(Setting(f"imagenet-lt {encoder.split(':')[1]}", None, (*IMAGENET, f"model.encoder={encoder}"),
                           ("vanilla", "end2end")))
    return out


def run_setting(setting: Setting, iters: int, warmup: int) -> list[dict]:
    """Each mode of ``setting`` timed (``needsgen bench``'s timing); a failing mode gives a row with its error."""
    from experiments.bench.speed import time_mode
    from experiments.config_files import load_run_config, resolve_config_path

    rows = []
    for mode in setting.modes:
        start = time.perf_counter()
        try:
            path = resolve_config_path(setting.config) if setting.config else None
            cfg = load_run_config(path, [*setting.overrides, "run.progress=false"])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = time_mode(cfg, mode, iters, warmup, check_syncs=setting.check_syncs)
            syncs = sum("synchroniz" in str(w.message) for w in caught) if setting.check_syncs else None
            rows.append({"setting": setting.label, "mode": mode, "s_per_it": result["seconds_per_iteration"],
                         "peak_gib": result["peak_gib"], "syncs": syncs, "error": None,
                         "wall_s": time.perf_counter() - start})
        except Exception as exc:  # noqa: BLE001  (one setting's failure is a finding, not the end of the check)
            rows.append({"setting": setting.label, "mode": mode, "s_per_it": None, "peak_gib": None, "syncs": None,
                         "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}",
                         "wall_s": time.perf_counter() - start})
    return rows


def report(rows: list[dict]) -> str:
    lines = [f"{'setting':28s} {'mode':13s} {'s/iteration':>11s} {'peak GiB':>9s} {'/ vanilla':>9s}  note"]
    vanilla = {r["setting"]: r["s_per_it"] for r in rows if r["mode"] == "vanilla" and r["s_per_it"]}
    for r in rows:
        if r["error"]:
            lines.append(f"{r['setting']:28s} {r['mode']:13s} {'FAILED':>11s} {'':>9s} {'':>9s}  {r['error']}")
            continue
        ratio = r["s_per_it"] / vanilla[r["setting"]] if r["setting"] in vanilla and r["mode"] != "vanilla" else None
        note = f"{r['syncs']} host syncs warned" if r["syncs"] is not None else ""
        lines.append(f"{r['setting']:28s} {r['mode']:13s} {r['s_per_it']:11.4f} "
                     f"{r['peak_gib'] if r['peak_gib'] is not None else float('nan'):9.2f} "
                     f"{f'{ratio:.1f}x' if ratio else '':>9s}  {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m experiments.bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=4, help="timed iterations per mode (default 4)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default 2)")
    parser.add_argument("--only", help="comma-separated setting labels to run (default: all)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; run it where torch.cuda.is_available() is true",
              file=sys.stderr)
        return 2
    chosen = settings()
    if args.only:
        wanted = {s.strip() for s in args.only.split(",")}
        chosen = [s for s in chosen if s.label in wanted]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"{args.warmup} + {args.iters} iterations per mode", flush=True)
    rows = []
    for setting in chosen:
        rows += run_setting(setting, args.iters, args.warmup)
        print(report([r for r in rows if r["setting"] == setting.label]).split("\n", 1)[1], flush=True)
    print()
    print(report(rows))
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
