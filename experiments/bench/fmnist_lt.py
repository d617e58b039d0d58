"""The Fashion-MNIST CPU protocol behind README's *Measured* tables, next to the published figures.

    python -m experiments.bench.fmnist_lt [--parts main,extras,generators,small-data] [--seeds 0,1,2]

Every part is one or more ``needsgen compare`` runs under ``run.out_dir`` (finished runs are reused,
interrupted ones resumed: rerunning the command continues where it stopped, and once everything
has run it only prints):

- ``main``: ``fmnist_lt_cpu`` at imbalance factors 100 and 20; vanilla, sequential and end2end with
  the needs, equal and reciprocal allocators; every seed (folders ``fmnist_if100``, ``fmnist_if20``);
- ``extras``: separate, mtl and end2end with the worstk allocator at IF 100, first seed;
- ``generators``: end2end with biggan, vcgan, acgan and wacgan_gp at IF 100, first seed, with the FID
  of each EMA generator against 1,000 real test images in its W1 encoder's features
  (what ``needsgen gan-metrics RUN --n 1000`` computes);
- ``small-data``: ``fmnist_small_data`` with 500 and 2,500 balanced training images, the plain
  classifier against augmentation by WAC-GAN-GP sampled with truncation τ = 1 (folders
  ``small500``, ``small2500``).

The IF-100 parts share ``fmnist_if100`` so that seed-0 runs are trained once; its ``compare.md``
is the one of the last part run (``main`` runs after ``extras`` and ``generators``). Prints one
table per part, with the published reference points, and writes them to
``<out_dir>/fmnist_lt_protocol.md``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PARTS = ("main", "extras", "generators", "small-data")
MAIN_MODES = "vanilla,sequential,end2end,end2end:allocator=equal,end2end:allocator=reciprocal"
EXTRA_MODES = "vanilla,sequential,end2end,separate,mtl,end2end:allocator=worstk"
GENERATOR_MODES = "end2end,end2end:generator=vcgan,end2end:generator=acgan,end2end:generator=wacgan_gp"
SMALL_DATA_MODES = "vanilla,sequential:allocator=equal+truncation=1.0"
FID_IMAGES = 1000

# Test accuracy (%) with the authors' own classifiers, as the paper reports them.
PUBLISHED_LONG_TAIL = {100: {"plain classifier": 79.89, "adversarial generation": 83.06, "class-balanced loss": 83.77},
                       20: {"plain classifier": 87.33, "adversarial generation": 89.03, "class-balanced loss": 89.97}}
PUBLISHED_SMALL_DATA = {500: {"baseline CNN": 77.5, "WAC-GAN-GPT": 79.8},
                        2500: {"baseline CNN": 83.5, "WAC-GAN-GPT": 86.0}}


def _p_value(summary: dict, variant: str, against: str) -> str:
    for t in summary["tests"]:
        if t["variant"] == variant and t["against"] == against:
            return f"{t['p']:.3g}" if t["p"] is not None else "-"
    return ""


def result_table(summary: dict, published: dict[str, float], extra: dict[str, str] | None = None) -> str:
    """Our rows (top-1, Many/Medium/Few, p against vanilla and sequential), then the published ones."""
    from experiments.compare import mean_std
    from mlo.report import markdown_table

    header = ["variant", "seeds", "Top-1 %", "Many %", "Medium %", "Few %", "p vs vanilla", "p vs sequential"]
    if extra is not None:
        header.append("FID (W1 features)")
    rows = []
    for row in summary["rows"]:
        cells = [row["variant"], str(row["seeds"]), *(mean_std(row[k], 100) for k in ("top1", "many", "medium", "few")),
                 _p_value(summary, row["variant"], "vanilla"), _p_value(summary, row["variant"], "sequential")]
        rows.append(cells + ([extra.get(row["variant"], "-")] if extra is not None else []))
    for name, top1 in published.items():
        rows.append([f"published: {name}", "", f"{top1:.2f}", "", "", "", "", ""] + ([""] if extra is not None else []))
    return markdown_table(header, rows)


def generator_fid(run_dir: Path, seed: int) -> float:
    """FID of the run's EMA generator against FID_IMAGES real test images (gan_metrics.json, made if absent)."""
    import json

    from experiments.cli import restore_generator_run
    from experiments.gan_eval import GAN_METRICS, measure, write_gan_metrics

    path = run_dir / GAN_METRICS
    if path.is_file():
        result = json.loads(path.read_text())
        if result["features"]["w1_encoder"]["test"]["n_real"] == FID_IMAGES and result["seed"] == seed:
            return result["features"]["w1_encoder"]["test"]["fid"]
    result = measure(restore_generator_run(run_dir, None), n=FID_IMAGES, seed=seed, truncation=None,
                     inception_weights=None, gan_train_epochs=0)
    write_gan_metrics(run_dir, result)
    return result["features"]["w1_encoder"]["test"]["fid"]


def main(argv: list[str] | None = None) -> int:
    from experiments.cli import resolve_config_path
    from experiments.compare import compare, parse_seeds, parse_variants
    from mlo.config import load_config

    parser = argparse.ArgumentParser(prog="python -m experiments.bench.fmnist_lt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts ({', '.join(PARTS)})")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the main and small-data parts (default 0,1,2); "
                        "the extras and generators use the first")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every run (e.g. device=cpu)")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown part(s) {', '.join(unknown)} (parts: {', '.join(PARTS)})")
    seeds = parse_seeds(args.seeds)
    long_tail, small_data = resolve_config_path("fmnist_lt_cpu"), resolve_config_path("fmnist_small_data")
    out_dir = Path(load_config(long_tail, args.overrides).run.out_dir).expanduser()
    overrides = ["run.progress=false", *args.overrides]
    sections: dict[str, list[tuple[str, str]]] = {part: [] for part in PARTS}  # printed in PARTS order

    def lt_compare(imbalance: int, modes: str, part_seeds: list[int]) -> dict:
        return compare(long_tail, [*overrides, f"data.imbalance_factor={imbalance}"], parse_variants(modes),
                       part_seeds, out_dir / f"fmnist_if{imbalance}")

    if "extras" in parts:
        summary = lt_compare(100, EXTRA_MODES, seeds[:1])
        sections["extras"].append(("Fashion-MNIST-LT, IF 100: the other modes and worstk (seed %d)" % seeds[0],
                         result_table(summary, PUBLISHED_LONG_TAIL[100])))
    if "generators" in parts:
        summary = lt_compare(100, GENERATOR_MODES, seeds[:1])
        fids = {v.label: f"{generator_fid(out_dir / 'fmnist_if100' / f'{v.folder}-seed{seeds[0]}', seeds[0]):.1f}"
                for v in parse_variants(GENERATOR_MODES)}
        sections["generators"].append(("Fashion-MNIST-LT, IF 100: generators inside end2end (seed %d)" % seeds[0],
                         result_table(summary, PUBLISHED_LONG_TAIL[100], extra=fids)))
    if "main" in parts:
        for imbalance in (100, 20):
            summary = lt_compare(imbalance, MAIN_MODES, seeds)
            sections["main"].append((f"Fashion-MNIST-LT, IF {imbalance}",
                                     result_table(summary, PUBLISHED_LONG_TAIL[imbalance])))
    if "small-data" in parts:
        for images, n_max in ((500, 50), (2500, 250)):
            summary = compare(small_data, [*overrides, f"data.n_max={n_max}"], parse_variants(SMALL_DATA_MODES),
                              seeds, out_dir / f"small{images}")
            sections["small-data"].append((f"Fashion-MNIST, {images:,} balanced training images",
                             result_table(summary, PUBLISHED_SMALL_DATA[images])))

    text = "\n\n".join(f"## {title}\n\n{table}" for part in PARTS for title, table in sections[part]) + "\n"
    (out_dir / "fmnist_lt_protocol.md").write_text(text)
    print(text)
    print(f"written to {out_dir / 'fmnist_lt_protocol.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from mlo.errors import UserError

    try:
        sys.exit(main())
    except UserError as exc:
        print(f"fmnist_lt: error: {exc}", file=sys.stderr)
        sys.exit(2)
