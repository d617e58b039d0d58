"""``needsgen compare``: several modes or settings, several seeds, one data split, one table.

A variant (``experiments.variants``) is a mode with optional overrides, written ``mode`` or
``mode:key=value+key=value`` (``end2end:allocator=equal``). Every (variant, seed) is an ordinary run directory under the
comparison's folder: finished runs are reused, interrupted ones resumed, so rerunning the same
command continues a comparison. The summary reports mean ± std over seeds of the last epoch's
test metrics and paired tests across seeds against ``vanilla``, ``vanilla_meta`` and ``sequential``.

The searched architectures of a comparison run with ``model.meta=arch`` are evaluated by a second
comparison, ``--genotypes-of SEARCH_DIR``: one variant per search variant, each seed's network built
from that search run's ``genotype.json`` and trained (with the same seed) by the evaluation config.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

from mlo.checkpoint import atomic_write, existing_checkpoint
from mlo.config import config_diff, from_dict
from mlo.data import SHOT_RULE
from mlo.errors import ConfigError, UserError
from mlo.report import markdown_table
from experiments.config_files import CHECKPOINT, CONFIG, METRICS, RESUMABLE_CHANGES, load_run_config
from experiments.modes import resolve_mode
from experiments.runner import Run, prepare_run_dir
from experiments.variants import Variant, base_variant

METRIC_COLUMNS = [("top1", "Top-1 %", 100), ("top5", "Top-5 %", 100), ("many", "Many %", 100), ("medium", "Medium %", 100),
                  ("few", "Few %", 100), ("ece", "ECE", 1), ("per_class_std", "per-class std %", 100),
                  ("wall_time_s", "time / run (s)", 1)]
BASELINES = ("vanilla", "vanilla_meta", "sequential")  # vanilla_meta with model.meta=arch is PC-DARTS
GAN_CACHE = "gan_cache"  # pre-trained GANs shared by the comparison's runs (run.gan_cache)


def run_variant(config_path: Path | None, overrides: list[str], variant: Variant, seed: int, root: Path,
                log=print) -> dict:
    """Train (or reuse, or resume) one run of the comparison; its metrics. A variant with a post-hoc
    correction continues the finished run of the variant without it (trained first if need be)."""
    name = f"{variant.folder}-seed{seed}"
    cfg = load_run_config(config_path, [f"run.gan_cache={root / GAN_CACHE}", *overrides, *variant.overrides,
                                    *variant.seed_overrides(seed), f"run.seed={seed}", f"run.name={name}",
                                    f"run.out_dir={root}"])
    run_dir = root / name
    if (run_dir / CONFIG).is_file():
        saved = from_dict(yaml.safe_load((run_dir / CONFIG).read_text()), source=str(run_dir / CONFIG))
        diff = config_diff(saved, cfg, ignore=RESUMABLE_CHANGES)
        if diff:
            raise UserError(f"'{run_dir}' was made with another config ({'; '.join(diff)}); "
                            f"delete it or give the comparison another --name")
        if (run_dir / METRICS).is_file():
            log(f"{name}: finished before, reused")
            return json.loads((run_dir / METRICS).read_text())
        if existing_checkpoint(run_dir / CHECKPOINT) is not None:
            log(f"{name}: resumed")
            return Run(cfg).execute(run_dir, resume=True)
        log(f"{name}: restarted")
    else:
        prepare_run_dir(cfg, name)
    base = base_variant(variant)
    if base is None:
        log(f"{name}: training")
        return Run(cfg).execute(run_dir)
    base_dir = root / f"{base.folder}-seed{seed}"  # the same training, without the correction
    if not (base_dir / METRICS).is_file():
        log(f"{name}: first {base_dir.name}, the run it continues")
        run_variant(config_path, overrides, base, seed, root, log=log)
    log(f"{name}: from {base_dir.name} (trained once, corrected here)")
    return Run(cfg).execute(run_dir, start_from=base_dir)


def mean_std(values: list[float], scale: float) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    a = scale * np.asarray(values, dtype=float)
    return f"{a.mean():.2f}" if len(a) == 1 else f"{a.mean():.2f} ± {a.std(ddof=1):.2f}"


def paired_test(a: list[float], b: list[float]) -> dict:
    """Paired two-sided t-test of top-1 across seeds (a − b), in percentage points."""
    diff = 100 * (np.asarray(a) - np.asarray(b))
    out = {"n": len(diff), "mean_diff_pp": float(diff.mean()) if len(diff) else None, "t": None, "p": None}
    if len(diff) < 2:
        out["note"] = "needs at least 2 seeds"
    elif np.allclose(diff, diff[0]):
        out["note"] = "identical differences in every seed: no variance to test"
    else:
        result = stats.ttest_rel(100 * np.asarray(a), 100 * np.asarray(b))
        out["t"], out["p"] = float(result.statistic), float(result.pvalue)
    return out


def summarize(variants: list[Variant], seeds: list[int], results: dict[str, list[dict]]) -> dict:
    rows, tests = [], []
    for v in variants:
        runs = results[v.label]
        rows.append({"variant": v.label, "seeds": len(runs),
                     **{key: [r.get(key) for r in runs] for key, _, _ in METRIC_COLUMNS}})
        for base in BASELINES:
            if base in results and v.label != base:
                top1 = [r["top1"] for r in runs]
                tests.append({"variant": v.label, "against": base,
                              **paired_test(top1, [r["top1"] for r in results[base]])})
    return {"seeds": seeds, "rows": rows, "tests": tests}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_per_class(path: Path, variants: list[Variant], results: dict[str, list[dict]]) -> None:
    """Mean test accuracy per class: before (W1) and after (the final classifier) of each variant."""
    plt = _pyplot()
    first = results[variants[0].label][0]
    classes, counts = first["classes"], first["train_counts"]
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(classes)), 4.5))
    for v in variants:
        runs = results[v.label]
        after = 100 * np.mean([r["after"]["per_class_acc"] for r in runs], axis=0)
        ax.plot(x, after, marker="o", label=f"{v.label} (after)")
        if runs[0]["before"]:
            before = 100 * np.mean([r["before"]["per_class_acc"] for r in runs], axis=0)
            ax.plot(x, before, linestyle="--", alpha=0.6, label=f"{v.label} (before, W1)")
    ax.set_xticks(x, [f"{c}\n({n})" for c, n in zip(classes, counts)], fontsize=7)
    ax.set_xlabel("class (training images)")
    ax.set_ylabel("test accuracy %, mean over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pooled_allocation(runs: list[dict]) -> tuple[np.ndarray, np.ndarray] | None:
    """W1's validation accuracy and the generated images of every class, all seeds pooled; None
    for a variant that generates nothing."""
    runs = [r for r in runs if "generated_per_class" in r]
    if not runs:
        return None
    return (np.concatenate([r["w1_val_acc_per_class"] for r in runs]),
            np.concatenate([r["generated_per_class"] for r in runs]))


def allocation_correlations(variants: list[Variant], results: dict[str, list[dict]]) -> dict[str, float]:
    """Spearman correlation of generated images per class with W1's validation accuracy, per variant
    (all seeds pooled); the paper's inverse relation is a negative value."""
    out = {}
    for v in variants:
        if (pooled := pooled_allocation(results[v.label])) is not None:
            acc, gen = pooled
            out[v.label] = float(stats.spearmanr(acc, gen).statistic) if np.ptp(acc) and np.ptp(gen) else float("nan")
    return out


def plot_allocation(path: Path, variants: list[Variant], results: dict[str, list[dict]], rho: dict[str, float]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for v in variants:
        if (pooled := pooled_allocation(results[v.label])) is not None:
            acc, gen = pooled
            ax.scatter(100 * acc, gen, alpha=0.7, label=f"{v.label} (Spearman ρ = {rho[v.label]:.2f})")
    ax.set_xlabel("W1 validation accuracy of the class %")
    ax.set_ylabel("generated images of the class")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(root: Path, variants: list[Variant], seeds: list[int], results: dict[str, list[dict]]) -> dict:
    summary = summarize(variants, seeds, results)
    rho = allocation_correlations(variants, results)
    header = ["Method"] + [title for _, title, _ in METRIC_COLUMNS] + ["seeds"]
    table = [[row["variant"]] + [mean_std(row[key], scale) for key, _, scale in METRIC_COLUMNS] + [str(row["seeds"])]
             for row in summary["rows"]]
    test_rows = []
    for t in summary["tests"]:
        p = f"{t['p']:.3g}" if t["p"] is not None else t.get("note", "-")
        test_rows.append([t["variant"], t["against"], f"{t['mean_diff_pp']:+.2f}", str(t["n"]),
                          f"{t['t']:.2f}" if t["t"] is not None else "-", p])
    first = results[variants[0].label][0]
    lines = [
        f"# Comparison on {first['dataset']} ({len(seeds)} seed(s): {', '.join(map(str, seeds))})", "",
        "Test metrics of the last epoch (never the best one), mean ± std over seeds (sample std). "
        f"{SHOT_RULE}. ECE: 15 equal-width bins.", "",
        markdown_table(header, table), "",
        "## Paired tests of top-1 across seeds", "",
        f"Two-sided paired t-tests (scipy.stats.ttest_rel) on the per-seed top-1 differences. With n = {len(seeds)} "
        "seeds a test has little power: a large p-value is not evidence of no difference, and a small one "
        "is one test among several in this table (no correction for multiple comparisons).", "",
        markdown_table(["variant", "against", "mean diff (pp)", "n", "t", "p"], test_rows) if test_rows
        else "(no vanilla, vanilla_meta or sequential variant to test against)", "",
        "## Plots", "",
        "![per-class accuracy](per_class_accuracy.png)", "",
    ]
    if rho:
        lines += ["Generated images per class against W1's validation accuracy (the paper's inverse relation "
                  "shows as a negative Spearman ρ): " + ", ".join(f"{k}: ρ = {v:.2f}" for k, v in rho.items()), "",
                  "![allocation](allocation.png)", ""]
    lines += ["## Runs", "", *[f"- `{v.folder}-seed{s}/`" for v in variants for s in seeds], ""]
    (root / "compare.md").write_text("\n".join(lines))

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["variant", "seeds"] + [f"{k}_{stat}" for k, _, _ in METRIC_COLUMNS for stat in ("mean", "std")]
                    + [f"p_vs_{b}" for b in BASELINES] + [f"diff_pp_vs_{b}" for b in BASELINES] + ["spearman_alloc"])
    for row in summary["rows"]:
        cells = [row["variant"], row["seeds"]]
        for key, _, scale in METRIC_COLUMNS:
            values = np.asarray([x for x in row[key] if x is not None], dtype=float) * scale
            cells += [f"{values.mean():.4f}" if len(values) else "",
                      f"{values.std(ddof=1):.4f}" if len(values) > 1 else ""]
        by_base = {t["against"]: t for t in summary["tests"] if t["variant"] == row["variant"]}
        cells += [f"{by_base[b]['p']:.4g}" if b in by_base and by_base[b]["p"] is not None else "" for b in BASELINES]
        cells += [f"{by_base[b]['mean_diff_pp']:.4f}" if b in by_base else "" for b in BASELINES]
        cells.append(f"{rho[row['variant']]:.4f}" if row["variant"] in rho else "")
        writer.writerow(cells)
    atomic_write(root / "compare.csv", lambda f: f.write(out.getvalue().encode()))
    plot_per_class(root / "per_class_accuracy.png", variants, results)
    if rho:
        plot_allocation(root / "allocation.png", variants, results, rho)
    return {**summary, "allocation_spearman": rho}


def shared_config(config_path: Path | None, overrides: list[str], variants: list[Variant], seeds: list[int]):
    """The settings every run shares, checked; an evaluation of searched genotypes reads the first one."""
    first = variants[0]
    return load_run_config(config_path, [*overrides, *first.overrides, *first.seed_overrides(seeds[0])]
                       if first.searched_in else overrides)


def check_variants(config_path: Path | None, overrides: list[str], variants: list[Variant], seeds: list[int]) -> None:
    """Resolve and validate every variant's config and mode before the first run trains: a bad variant
    is refused at once, not after the ones before it have trained."""
    for v in variants:
        for seed in seeds if v.searched_in else seeds[:1]:
            try:
                resolve_mode(load_run_config(config_path, [*overrides, *v.overrides, *v.seed_overrides(seed)]))
            except ConfigError as exc:
                flag = "--genotypes-of" if v.searched_in else "--modes"
                raise ConfigError(f"{flag}: variant '{v.label}': {exc}") from None


def compare(config_path: Path | None, overrides: list[str], variants: list[Variant], seeds: list[int],
            root: Path, log=lambda msg: print(msg, file=sys.stderr)) -> dict:
    import torch

    check_variants(config_path, overrides, variants, seeds)
    threads = shared_config(config_path, overrides, variants, seeds).run.threads or torch.get_num_threads()
    log(f"{len(variants)} variant(s) x {len(seeds)} seed(s), one after another, {threads} CPU thread(s) each")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the comparison folder '{root}' ({exc.strerror}); "
                        f"set run.out_dir or --name to a writable place") from None
    results = {}
    total, done = len(variants) * len(seeds), 0
    for v in variants:
        results[v.label] = []
        for seed in seeds:
            done += 1
            log(f"[{done}/{total}] {v.label}, seed {seed}")
            results[v.label].append(run_variant(config_path, overrides, v, seed, root, log=log))
    return write_outputs(root, variants, seeds, results)
