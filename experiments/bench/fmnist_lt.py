"""The Fashion-MNIST-LT CPU comparison behind README's *Does generation earn its place?* tables.

    python -m experiments.bench.fmnist_lt [--parts if100,if20,gan,fullsize] [--seeds 0,1,2,3,4]
                                          [--variants LIST] [--report-only]
                                          [--fullsize-pair GENERATING,NON_GENERATING] [--fullsize-seeds 0,1,2]
                                          [key=value ...]

Every part is a ``needsgen compare`` under ``run.out_dir`` (finished runs are reused, interrupted ones resumed,
post-hoc variants continue their base run, and runs that differ only after the GAN's pre-training share one
pre-trained GAN: rerunning the command continues where it stopped, and once everything has run it only prints):

- ``if100``: ``fmnist_lt_cpu`` at imbalance factor 100 (folder ``fmnist_if100``): the non-generating
  configurations (vanilla; its post-hoc logit adjustment and cRT; balanced softmax; LDAM-DRW; vanilla with
  A learned on the validation set, ``vanilla_meta``; and the control, sequential's W2 fine-tuning W1 with
  balanced softmax and ``lambda_gen=0``, no generated image), the generating ones (end2end and sequential, each
  alone and with logit adjustment, cRT and balanced softmax stacked; end2end with the learned allocation;
  sequential with its split discounted by the generator's per-class GAN-train on the validation set (alone and
  with cRT); sequential with the generator pre-trained 20,000 steps instead of 10,000 (alone, with cRT, with logit adjustment and
  with balanced softmax, the last two also with ``class_prior=real``: corrected for the real counts alone; and that
  last one with W2 fine-tuning W1, ``w2_init=w1``, beside the same fine-tuning without generated images, and with
  the discounted split, and with its set filtered by W1, ``gen_filter=w1_agrees``, also under the default prior
  of real plus generated counts); end2end
  with the literal squared budget and with the score-function budget), A's extensions against
  over-fitting the validation set (weight decay 5e-4, validation plus class-balanced training batches) in
  vanilla_meta and end2end, and the perfect-generator bound ``sequential_real`` (alone, with cRT, with
  balanced softmax, and as the fine-tuned W2 with either prior: not counted as generating);
- ``if20``: imbalance factor 20 (folder ``fmnist_if20``): the same without the perfect-generator rows;
- ``gan``: GAN-train of the first seed's end2end and sequential generators at IF 100, IF 20 and full size, those
  that have run (overall, per class, on held-out pool images; images at the run's latent truncation), FID and
  coverage (``gan_metrics.json``);
- ``fullsize``: the best generating and the best non-generating variant of ``if100`` (``--fullsize-pair``,
  chosen by the if100 table) on ``fmnist_lt_if100`` (ResNet-32, the whole long-tailed set) for the epochs
  a CPU affords (``FULLSIZE``), ``--fullsize-seeds`` (folder ``fmnist_if100_full``).

``--variants`` runs a subset of a part's variants first (the rest can follow later); ``--report-only`` trains nothing
and prints the tables of the runs finished so far (rows still running say so; tests pair the seeds both rows have).

Each table gives mean ± std over seeds of the last epoch's test top-1 and Many/Medium/Few, and paired t-tests
across seeds (scipy's ttest_rel, two-sided) against vanilla and against the best non-generating configuration
(the one with the highest mean top-1); then, for if100 and if20, per class: real images, W2's generated weight
and its change in test accuracy against vanilla (with the first seed's generators' GAN-train per class when the gan
part ran, ``alloc_discount``'s factors and ``gen_filter``'s acceptance where a row has them), and Spearman's rank correlations between them; for fullsize the same per class against the generating
row's W1 (the plain classifier on the same real data), for each row of the pair. Every hyper-parameter was fixed before any of these runs (README).
Prints the tables and writes them to ``<out_dir>/fmnist_lt_protocol.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

PARTS = ("if100", "if20", "gan", "fullsize")
# the last row generates nothing W2 learns from (lambda_gen=0): W2 fine-tunes W1 on the real images alone, the
# control that tells a fine-tuned W2's gain from its generated images' (its GAN is trained but unused)
FINE_TUNED_WITH_GENERATED = "sequential:gan_pretrain_steps=20000+loss=balanced_softmax+class_prior=real+w2_init=w1"
FINE_TUNED_WITHOUT_GENERATED = "sequential:gan_pretrain_steps=20000+loss=balanced_softmax+w2_init=w1+lambda_gen=0"
# the filtered set under the default prior (real plus generated counts): images W1 reads as their class counted as
# a shift of the class distribution, as real extra images are
FILTERED_TRAINED_ON_PRIOR = "sequential:gan_pretrain_steps=20000+loss=balanced_softmax+w2_init=w1+gen_filter=w1_agrees"
CHEAP = ("vanilla", "vanilla:posthoc=logit_adjust", "vanilla:posthoc=crt", "vanilla:loss=balanced_softmax",
         "vanilla:loss=ldam_drw", "vanilla_meta")  # the non-generating baselines: one classifier, one training
NON_GENERATING = CHEAP + (FINE_TUNED_WITHOUT_GENERATED,)
GENERATING = ("end2end", "end2end:posthoc=logit_adjust", "end2end:posthoc=crt", "end2end:loss=balanced_softmax",
              "sequential", "sequential:posthoc=logit_adjust", "sequential:posthoc=crt",
              "sequential:loss=balanced_softmax", "end2end:allocator=learned", "sequential:alloc_discount=gan_train",
              "sequential:alloc_discount=gan_train+posthoc=crt", "sequential:gan_pretrain_steps=20000",
              "sequential:gan_pretrain_steps=20000+posthoc=crt", "sequential:gan_pretrain_steps=20000+posthoc=logit_adjust",
              "sequential:gan_pretrain_steps=20000+class_prior=real+posthoc=logit_adjust",
              "sequential:gan_pretrain_steps=20000+loss=balanced_softmax",
              "sequential:gan_pretrain_steps=20000+loss=balanced_softmax+class_prior=real", FINE_TUNED_WITH_GENERATED,
              FINE_TUNED_WITH_GENERATED + "+alloc_discount=gan_train",
              FINE_TUNED_WITH_GENERATED + "+gen_filter=w1_agrees", FILTERED_TRAINED_ON_PRIOR)
EXTENSIONS = ("end2end:gen_budget=squared", "end2end:gen_budget=score", "vanilla_meta:meta_weight_decay=0.0005",
              "vanilla_meta:meta_data=val_and_train", "end2end:meta_weight_decay=0.0005",
              "end2end:meta_data=val_and_train")
# not configurations to choose: sequential with real images in place of generated ones bounds what a generator
# could add at sequential's budget (compared with the row each stands in for, the best non-generating row and the
# best cheap baseline)
FINE_TUNED_WITH_REAL = "sequential_real:loss=balanced_softmax+class_prior=real+w2_init=w1"
FINE_TUNED_WITH_REAL_TRAINED_ON_PRIOR = "sequential_real:loss=balanced_softmax+w2_init=w1"
PERFECT_GENERATOR = ("sequential_real", "sequential_real:posthoc=crt", "sequential_real:loss=balanced_softmax",
                     FINE_TUNED_WITH_REAL, FINE_TUNED_WITH_REAL_TRAINED_ON_PRIOR)
# each perfect-generator row against the generating row it stands in for (the same split, budget, loss and W2)
STANDS_IN_FOR = {"sequential_real": "sequential", "sequential_real:posthoc=crt": "sequential:posthoc=crt",
                 "sequential_real:loss=balanced_softmax": "sequential:loss=balanced_softmax",
                 FINE_TUNED_WITH_REAL: FINE_TUNED_WITH_GENERATED,
                 FINE_TUNED_WITH_REAL_TRAINED_ON_PRIOR: FILTERED_TRAINED_ON_PRIOR}  # its budget refilled by redraws
VARIANTS = {"if100": NON_GENERATING + GENERATING + EXTENSIONS + PERFECT_GENERATOR,
            "if20": NON_GENERATING + GENERATING + EXTENSIONS}
FOLDERS = {"if100": "fmnist_if100", "if20": "fmnist_if20", "fullsize": "fmnist_if100_full"}
IMBALANCE = {"if100": 100, "if20": 20, "fullsize": 100}
# fmnist_lt_if100 at a CPU's budget: 15 epochs (decay at 12 and 14) instead of 100, and a VCGAN at 32x32
FULLSIZE = ["train.epochs=15", "train.lr_milestones=[12,14]", "gan.generator=vcgan", "gan.z_dim=32",
            "gan.gan_betas=[0.5,0.999]"]
GAN_MEASURED = ("end2end", "sequential", "sequential:gan_pretrain_steps=20000")  # the gan part measures these
GAN_TRAIN_EPOCHS = 10  # GAN-train learns from as many generated images as the real training set has

# Test accuracy (%) with the authors' own classifiers (28x28, the full long-tailed training set), as the paper
# reports them.
PUBLISHED = {100: {"plain classifier": 79.89, "adversarial generation": 83.06, "class-balanced loss": 83.77},
             20: {"plain classifier": 87.33, "adversarial generation": 89.03, "class-balanced loss": 89.97}}


def _p(test: dict) -> str:
    return test.get("note", "-") if test["p"] is None else f"{test['p']:.3g}"


def best_of(names, top1: dict[str, dict[int, float]]) -> str | None:
    present = [n for n in names if top1.get(n)]
    return max(present, key=lambda n: np.mean(list(top1[n].values()))) if present else None


def non_generating(label: str) -> bool:
    """One of the non-generating rows, or a row whose W2 learns from no generated image (``lambda_gen=0``, e.g. a
    full-size pair's control)."""
    return label in NON_GENERATING or "lambda_gen=0" in label.partition(":")[2].split("+")


def best_non_generating(top1: dict[str, dict[int, float]]) -> str | None:
    return best_of([n for n in top1 if non_generating(n)], top1)


def paired_on_common_seeds(a: dict[int, float], b: dict[int, float]) -> dict:
    """The paired test over the seeds both rows have (a row still running has fewer)."""
    from experiments.compare import paired_test

    common = sorted(set(a) & set(b))
    return paired_test([a[s] for s in common], [b[s] for s in common])


def finished_runs(root: Path, folder: str, seeds: list[int]) -> dict[int, dict]:
    """The metrics of the finished runs ``<folder>-seed<s>`` under ``root``, by seed."""
    from experiments.config_files import METRICS

    runs = {s: root / f"{folder}-seed{s}" / METRICS for s in seeds}
    return {s: json.loads(p.read_text()) for s, p in runs.items() if p.is_file()}


def finished_results(root: Path, variants, seeds: list[int]) -> dict[str, dict[int, dict]]:
    """The metrics of every finished (variant, seed) run under ``root``, by variant label and seed."""
    return {v.label: finished_runs(root, v.folder, seeds) for v in variants}


def result_table(results: dict[str, dict[int, dict]], published: dict[str, float]
                 ) -> tuple[str, dict[str, dict[int, float]]]:
    """Our rows (top-1, Many/Medium/Few; tests against vanilla and the best non-generating row, paired on the
    seeds both have), then the published ones; and the per-seed top-1 of every row."""
    from experiments.compare import mean_std
    from mlo.report import markdown_table

    top1 = {name: {s: m["top1"] for s, m in runs.items()} for name, runs in results.items()}
    best, cheap = best_non_generating(top1), best_of(CHEAP, top1)
    bases = ["vanilla", best] + ([cheap] if cheap != best else [])
    header = ["variant", "seeds", "Top-1 %", "Many %", "Medium %", "Few %", "vs vanilla: diff (p)",
              f"vs best non-generating ({best}): diff (p)"] + (
        [f"vs best cheap baseline ({cheap}): diff (p)"] if cheap != best else [])
    rows = []
    for name, runs in results.items():
        if not runs:
            rows.append([name, "0", "not run yet"] + [""] * (len(header) - 3))
            continue
        cells = [name, str(len(runs)),
                 *(mean_std([m[k] for m in runs.values()], 100) for k in ("top1", "many", "medium", "few"))]
        for base in bases:
            if base is None or name == base or not top1.get(base):
                cells.append("")
                continue
            test = paired_on_common_seeds(top1[name], top1[base])
            cells.append(f"{test['mean_diff_pp']:+.2f} ({_p(test)})" if test["n"] else "")
        rows.append(cells)
    for name, value in published.items():
        rows.append([f"published: {name}", "", f"{value:.2f}"] + [""] * (len(header) - 3))
    return markdown_table(header, rows), top1


def one_setting_apart(labels) -> list[tuple[str, str, str]]:
    """(row, base, setting): ``base`` is the row without one of its settings, the same mode and the same post-hoc
    correction on both sides (the mode alone for a row with one setting), so each setting's effect is measured."""
    from experiments.variants import is_posthoc_override

    def parts(label):
        mode, _, rest = label.partition(":")
        options = [o for o in rest.split("+") if o]
        posthoc = [o for o in options if is_posthoc_override(o)]
        return mode, [o for o in options if o not in posthoc], posthoc

    pairs = []
    for label in labels:
        mode, settings, posthoc = parts(label)
        for dropped in settings:
            kept = [o for o in settings if o != dropped] + posthoc
            pairs.append((label, mode + (":" + "+".join(kept) if kept else ""), dropped))
    return pairs


def verdict(top1: dict[str, dict[int, float]], generating=GENERATING) -> str:
    """The best generating row against the best non-generating one, and end2end against sequential."""
    lines = []
    gen = best_of(generating, top1)
    best, cheap = best_non_generating(top1), best_of(CHEAP, top1)
    for non, what in ((best, "non-generating"), (cheap, "cheap baseline")):
        if gen and non and not (what == "cheap baseline" and non == best):
            t = paired_on_common_seeds(top1[gen], top1[non])
            lines.append(f"Best generating `{gen}` {100 * np.mean(list(top1[gen].values())):.2f} against best "
                         f"{what} `{non}` {100 * np.mean(list(top1[non].values())):.2f}: "
                         f"{t['mean_diff_pp']:+.2f} points on their {t['n']} common seeds (p = {_p(t)}).")
    pairs = [(f"end2end{suffix}", f"sequential{suffix}", "the same expected budget M p_c")
             for suffix in ("", ":posthoc=logit_adjust", ":posthoc=crt", ":loss=balanced_softmax")]
    pairs.append(("end2end:gen_budget=score", "sequential", "both M p_c images a class at weight 1"))
    pairs.append((FINE_TUNED_WITH_GENERATED, FINE_TUNED_WITHOUT_GENERATED, "W2 fine-tunes W1 with generated images or without"))
    for a, b, what in pairs:
        if top1.get(a) and top1.get(b):
            t = paired_on_common_seeds(top1[a], top1[b])
            if t["n"]:
                lines.append(f"`{a}` − `{b}` ({what}): {t['mean_diff_pp']:+.2f} points "
                             f"on {t['n']} common seeds (p = {_p(t)}).")
    for option, base, change in one_setting_apart((*GENERATING, *EXTENSIONS)):  # the same runs and pre-trained GANs
        if top1.get(option) and top1.get(base):
            t = paired_on_common_seeds(top1[option], top1[base])
            if t["n"]:
                lines.append(f"`{option}` − `{base}` (`{change}` alone): {t['mean_diff_pp']:+.2f} points on "
                             f"{t['n']} common seeds (p = {_p(t)}).")
    for real, generated in STANDS_IN_FOR.items():
        against = {generated: "real images in place of generated ones, the same budget",
                   best: "a perfect generator against the best non-generating row",
                   cheap: "a perfect generator against the best cheap baseline"}  # one entry if cheap is best
        for other, what in against.items():
            if other and top1.get(real) and top1.get(other):
                t = paired_on_common_seeds(top1[real], top1[other])
                if t["n"]:
                    lines.append(f"`{real}` − `{other}` ({what}): {t['mean_diff_pp']:+.2f} points on {t['n']} "
                                 f"common seeds (p = {_p(t)}).")
    return "\n".join(f"- {line}" for line in lines)


def per_class_table(baseline: dict[int, list[float]], baseline_label: str, compared: dict[str, dict[int, dict]],
                    gan_train: dict[str, dict] | None) -> str:
    """Per class, mean over seeds: real images and the baseline's test accuracy (``baseline``: per-class
    accuracies by seed); then for each compared row, on the seeds it shares with the baseline, W2's generated
    weight per epoch (rows that generate; a post-hoc correction does not change it), its change in test
    accuracy against the baseline and its generator's GAN-train per class where measured (``gan_train`` by
    row); and Spearman's rank correlations of each change with those."""
    from mlo.report import markdown_table

    first = next(iter(next(runs for runs in compared.values() if runs).values()))
    classes, counts = first["classes"], first["train_counts"]
    base = np.mean(list(baseline.values()), axis=0)
    header, columns, correlations = ["class", "real images", f"{baseline_label} %"], [], []
    for label, runs in compared.items():
        common = sorted(set(runs) & set(baseline))
        if not common:
            continue
        change = 100 * (np.mean([runs[s]["after"]["per_class_acc"] for s in common], axis=0)
                        - np.mean([baseline[s] for s in common], axis=0))
        against = {f"{baseline_label}'s accuracy": base}
        if "generated_per_class" in runs[common[0]] and "posthoc=" not in label:
            generated = np.mean([runs[s]["generated_per_class"] for s in common], axis=0)
            header += [f"{label}: generated", f"{label}: W2 − {baseline_label} (pp, {len(common)} seeds)"]
            columns += [("{:.0f}", generated), ("{:+.1f}", change)]
            against = {"generated / real images": generated / np.asarray(counts), **against}
            if "allocation_quality" in runs[common[0]]:  # train.alloc_discount's factors on p(s)
                factor = np.mean([runs[s]["allocation_quality"] for s in common], axis=0)
                header.append(f"{label}: discount factor")
                columns.append(("{:.2f}", factor))
                against["discount factor"] = factor
            if "generated_acceptance" in runs[common[0]]:  # train.gen_filter: first draws W1 read as their class
                accepted = np.mean([runs[s]["generated_acceptance"] for s in common], axis=0)
                header.append(f"{label}: W1 accepted %")
                columns.append(("{:.0f}", 100 * accepted))
                against["W1's acceptance"] = accepted
        else:
            header.append(f"{label} − {baseline_label} (pp, {len(common)} seeds)")
            columns.append(("{:+.1f}", change))
        if gan_train and label in gan_train:
            header.append(f"{label}: GAN-train %")
            quality = 100 * np.array([gan_train[label]["gan_train_per_class"][str(c)] for c in range(len(classes))])
            columns.append(("{:.1f}", quality))
            against["GAN-train"] = quality
        # with ten classes only a strong rank correlation stands out: these are descriptions, not tests of a goal
        correlations.append(f"- `{label}` − {baseline_label} over the {len(classes)} classes, Spearman's ρ against "
                            + "; ".join(f"{what} {rho:+.2f} (p = {pvalue:.2g})" for what, (rho, pvalue)
                                        in ((w, stats.spearmanr(change, x)) for w, x in against.items())) + ".")
    rows = [[name, str(n), f"{100 * base[c]:.1f}", *(form.format(values[c]) for form, values in columns)]
            for c, (name, n) in enumerate(zip(classes, counts))]
    return "\n\n".join([markdown_table(header, rows), "\n".join(correlations)])


def per_class_analysis(root: Path, seeds: list[int], gan_train: dict[str, dict] | None) -> str:
    """Per class against vanilla: end2end, sequential (with the discounted allocation) and sequential_real; then
    the fine-tuned W2 with generated images (and with the discounted split, and the set W1 filtered) against the
    same fine-tuning without them, whose generator is the 20,000-step one the gan part measures
    (``per_class_table``)."""
    from experiments.variants import parse_variants

    tables = []
    for baseline_label, compared_labels, generator in (
            ("vanilla", "end2end,sequential,sequential:alloc_discount=gan_train,sequential_real", None),
            (FINE_TUNED_WITHOUT_GENERATED,
             f"{FINE_TUNED_WITH_GENERATED},{FINE_TUNED_WITH_GENERATED}+alloc_discount=gan_train,"
             f"{FINE_TUNED_WITH_GENERATED}+gen_filter=w1_agrees,{FILTERED_TRAINED_ON_PRIOR},{FINE_TUNED_WITH_REAL},"
             f"{FINE_TUNED_WITH_REAL_TRAINED_ON_PRIOR}",
             "sequential:gan_pretrain_steps=20000")):
        baseline = finished_runs(root, parse_variants(baseline_label)[0].folder, seeds)
        compared = {v.label: finished_runs(root, v.folder, seeds) for v in parse_variants(compared_labels)}
        if not baseline or not any(compared.values()):
            continue
        scores = gan_train if generator is None or not gan_train or generator not in gan_train else {
            label: gan_train[generator] for label in compared}  # the same pre-trained GAN and GAN phase
        tables.append(per_class_table({s: m["after"]["per_class_acc"] for s, m in baseline.items()},
                                      "vanilla" if generator is None else "fine-tuned without", compared, scores))
    return "\n\n".join(tables)


def generating_mode(variants):
    """The mode of the pair's generating row alone (its post-hoc or loss variant's base), or None."""
    from experiments.variants import parse_variants

    generating = next((v for v in variants if not non_generating(v.label)), None)
    return parse_variants(generating.label.partition(":")[0])[0] if generating else None


def generating_w1(root: Path, variants, seeds: list[int]) -> dict[int, dict]:
    """The test metrics, by seed, of the generating row's W1 (read from its mode's own run, which a post-hoc
    variant continues): the plain classifier on the same real data, loss, epochs and seed, so the full-size
    pair's vanilla without a run of its own."""
    mode = generating_mode(variants)
    runs = finished_runs(root, mode.folder, seeds) if mode else {}
    return {s: m["before"] for s, m in runs.items() if m.get("before")}


def gan_section(root: Path, seed: int, measure_missing: bool = True) -> tuple[str, dict[str, dict]]:
    """GAN-train (test, per class, held-out), GAN-test, FID and coverage of the generators of ``GAN_MEASURED``
    of seed ``seed``, their images at the run's latent truncation as W2's are (gan_metrics.json, measured if
    absent and ``measure_missing``)."""
    from experiments.cli import restore_generator_run
    from experiments.config_files import METRICS
    from experiments.gan_eval import GAN_METRICS, measure, write_gan_metrics
    from experiments.variants import parse_variants

    lines, scores = [], {}
    for variant in parse_variants(",".join(GAN_MEASURED)):
        run_dir = root / f"{variant.folder}-seed{seed}"
        if not (run_dir / METRICS).is_file():
            continue
        path = run_dir / GAN_METRICS
        result = json.loads(path.read_text()) if path.is_file() else None
        if result is None or "gan_train_per_class" not in result.get("gan_train_test", {}):
            if not measure_missing:
                continue
            run = restore_generator_run(run_dir, None)
            result = measure(run, n=len(run.data.train_labels), seed=seed, truncation=run.cfg.gan.truncation,
                             gan_train_epochs=GAN_TRAIN_EPOCHS)
            write_gan_metrics(run_dir, result)
        test, g = result["features"]["w1_encoder"]["test"], result["gan_train_test"]
        scores[variant.label] = g
        tau = f", latents truncated at τ = {result['truncation']:g}" if result.get("truncation") else ""
        held = f", on {g['holdout_images']} held-out pool images {100 * g['gan_train_holdout']:.1f}%" \
            if "gan_train_holdout" in g else ""
        lines.append(f"- `{run_dir.name}` (EMA generator{tau}, {test['n_real']} real test images): GAN-train "
                     f"{100 * g['gan_train']:.1f}%{held} (a classifier trained on {test['n_generated']} generated "
                     f"images only, {GAN_TRAIN_EPOCHS} epochs); per class "
                     + " / ".join(f"{100 * v:.0f}" for v in g["gan_train_per_class"].values())
                     + f"; GAN-test {100 * g['gan_test']:.1f}%; FID {test['fid']:.1f} (W1-encoder features), "
                       f"precision {test['precision']:.2f}, coverage {test['coverage']:.2f}.")
    return "\n".join(lines), scores


def main(argv: list[str] | None = None) -> int:
    from experiments.compare import compare
    from experiments.config_files import load_run_config, resolve_config_path
    from experiments.variants import parse_seeds, parse_variants
    from mlo.errors import UserError

    parser = argparse.ArgumentParser(prog="python -m experiments.bench.fmnist_lt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="if100,if20,gan",
                        help=f"comma-separated parts ({', '.join(PARTS)}); default if100,if20,gan")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="seeds of if100 and if20 (default 0,1,2,3,4)")
    parser.add_argument("--variants", metavar="LIST",
                        help="run only these of each part's variants, in this order (default: all of them)")
    parser.add_argument("--report-only", action="store_true",
                        help="train and measure nothing: the tables of the runs that have finished so far")
    parser.add_argument("--fullsize-pair", metavar="GENERATING,NON_GENERATING",
                        help="fullsize: the two variants to run at full size")
    parser.add_argument("--fullsize-seeds", default="0,1,2", help="seeds of fullsize (default 0,1,2)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides for every run (e.g. run.threads=1)")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown part(s) {', '.join(unknown)} (parts: {', '.join(PARTS)})")
    if "fullsize" in parts and not args.fullsize_pair:
        raise UserError("--parts fullsize: give --fullsize-pair GENERATING,NON_GENERATING (the best of each in if100)")
    seeds = parse_seeds(args.seeds)
    config = resolve_config_path("fmnist_lt_cpu")
    out_dir = Path(load_run_config(config, args.overrides).run.out_dir).expanduser()
    if args.report_only and not out_dir.is_dir():
        raise UserError(f"run.out_dir={out_dir}: no such folder, so no run there to report (give the folder the "
                        "protocol's runs were written to, or drop --report-only to train them)")
    overrides = ["run.progress=false", *args.overrides]
    chosen = [v.label for v in parse_variants(args.variants)] if args.variants else None
    sections, gan_scores, fullsize_results = [], {}, {}
    for part in parts:
        if part == "gan":
            for measured in ("if100", "if20", "fullsize"):
                seed = parse_seeds(args.fullsize_seeds)[0] if measured == "fullsize" else seeds[0]
                text, gan_scores[measured] = gan_section(out_dir / FOLDERS[measured], seed,
                                                         measure_missing=not args.report_only)
                if text:
                    where = " at full size" if measured == "fullsize" else " protocol"
                    sections.append((f"The generators of the IF {IMBALANCE[measured]}{where}", text))
            continue
        imbalance = IMBALANCE[part]
        if part == "fullsize":
            variants, part_seeds = parse_variants(args.fullsize_pair), parse_seeds(args.fullsize_seeds)
            part_config, part_overrides = resolve_config_path("fmnist_lt_if100"), [*overrides, *FULLSIZE]
        else:
            variants, part_seeds = parse_variants(",".join(VARIANTS[part])), seeds
            part_config, part_overrides = config, [*overrides, f"data.imbalance_factor={imbalance}"]
        if chosen is not None and part != "fullsize":
            known = {v.label for v in variants}
            unknown = [label for label in chosen if label not in known]
            if unknown:
                raise UserError(f"--variants: {', '.join(unknown)} not in part {part} (its variants: "
                                f"{', '.join(sorted(known))})")
            to_run = parse_variants(",".join(chosen))
        else:
            to_run = variants
        if not args.report_only:
            compare(part_config, part_overrides, to_run, part_seeds, out_dir / FOLDERS[part])
        results = finished_results(out_dir / FOLDERS[part], variants, part_seeds)
        mode = generating_mode(variants) if part == "fullsize" else None
        if mode:  # beside the full-size pair: its vanilla (the generating row's W1) and that row's mode alone
            results = {"vanilla": generating_w1(out_dir / FOLDERS[part], variants, part_seeds),
                       mode.label: finished_runs(out_dir / FOLDERS[part], mode.folder, part_seeds), **results}
            fullsize_results = results
        table, top1 = result_table(results, PUBLISHED[imbalance])
        where = (" at full size (fmnist_lt_if100, 15 epochs" + (f"; vanilla: {mode.label}'s W1)" if mode else ")")
                 if part == "fullsize" else " (fmnist_lt_cpu)")
        generating = [v.label for v in variants if not non_generating(v.label)] if part == "fullsize" else GENERATING
        body = table + "\n\n" + verdict(top1, generating=generating)
        sections.append((f"Fashion-MNIST-LT, IF {imbalance}{where}", body))
    for part in ("if100", "if20"):
        analysis = per_class_analysis(out_dir / FOLDERS[part], seeds, gan_scores.get(part)) if part in parts else ""
        if analysis:
            sections.append((f"Per class at IF {IMBALANCE[part]}: where the generated images go and what they change",
                             analysis))
    w1 = {s: m["per_class_acc"] for s, m in fullsize_results.get("vanilla", {}).items()}
    if w1:  # every row of the full-size table against its vanilla, the generating row's W1
        analysis = per_class_table(w1, "W1", {k: v for k, v in fullsize_results.items() if k != "vanilla"},
                                   gan_scores.get("fullsize"))
        sections.append(("Per class at full size, against W1 (the plain classifier on the same real data)",
                         analysis))
    text = "\n\n".join(f"## {title}\n\n{body}" for title, body in sections) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)  # parts that trained nothing (gan alone) leave it unmade
    (out_dir / "fmnist_lt_protocol.md").write_text(text)
    print(text)
    print(f"written to {out_dir / 'fmnist_lt_protocol.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from experiments.bench import run_script

    run_script(main, "fmnist_lt")
