"""What an architecture-search comparison found and what each search cost.

    python -m experiments.bench.nas_search runs/nas-cpu

For every finished run of a ``needsgen compare`` with ``model.meta=arch`` (folders ``<variant>-seed<s>``):
the genotype; how far the search moved A from its near-uniform start (the mean over edges of the
strongest non-none operation's weight: 1/8 for an untouched α, 1 for a one-hot one, and the same for
β's edge weights, 1/(inputs of the node) untouched); how many of the genotype's edges two runs share
(seeds of one variant, and across variants), the chance level being what two random genotypes share;
and the search cost: wall time (the GAN's own phases included) and seconds per search iteration, each
relative to ``vanilla_meta`` (PC-DARTS). Figures only: this reads runs, it trains nothing.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
from pathlib import Path

import numpy as np
import torch

from mlo.models.nas import NONE, PRIMITIVES, Architecture
from mlo.report import markdown_table

RUN = re.compile(r"^(?P<folder>.+)-seed(?P<seed>\d+)$")
CELLS = ("normal", "reduce")
A_KEYS = ("alpha_normal", "alpha_reduce", "beta_normal", "beta_reduce")
GAN_PHASES = ("GAN pre-training", "GAN")  # the phases that train the GAN alone (``experiments.phases``)
REAL_OPS = [i for i in range(len(PRIMITIVES)) if i != NONE]


def searched_architecture(checkpoint: Path, steps: int) -> Architecture:
    """A as the run left it: the meta level's, else (no meta level) the reported classifier's own."""
    levels = torch.load(checkpoint, weights_only=True, map_location="cpu")["levels"]
    for level, prefix in (("meta", ""), ("w2", "meta."), ("w1", "meta.")):
        state = levels.get(level, {}).get("module", {})
        found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in A_KEYS}
        if found:
            arch = Architecture(steps)
            arch.load_state_dict(found)
            return arch
    raise SystemExit(f"{checkpoint}: no architecture in it (not a model.meta=arch run?)")


def decisiveness(arch: Architecture) -> dict[str, tuple[float, float]]:
    """Per cell: (mean strongest real-operation weight per edge, mean strongest edge weight per node)."""
    out = {}
    with torch.no_grad():
        for cell in CELLS:
            ops, edges = arch.weights(cell == "reduce")
            real = ops[:, REAL_OPS]
            node_max, start = [], 0
            for i in range(arch.steps):
                node_max.append(float(edges[start:start + 2 + i].max()))
                start += 2 + i
            out[cell] = (float(real.max(dim=1).values.mean()), float(np.mean(node_max)))
    return out


def shared_edges(a: dict, b: dict) -> float:
    """Fraction of the genotype's (operation, input) edges, node by node, that two genotypes share."""
    same = total = 0
    for cell in CELLS:
        for node in range(len(a[cell]) // 2):
            pa = {tuple(e) for e in a[cell][2 * node:2 * node + 2]}
            pb = {tuple(e) for e in b[cell][2 * node:2 * node + 2]}
            same += len(pa & pb)
            total += 2
    return same / total


def chance_shared(steps: int) -> float:
    """Expected shared fraction of two genotypes drawn uniformly (2 of the node's inputs, 7 real operations)."""
    real_ops = len(PRIMITIVES) - 1
    # an edge of one is in the other when that kept the same input (2 of 2 + i) with the same operation
    return float(np.mean([2 / (2 + i) / real_ops for i in range(steps)]))


def short(gene: list) -> str:
    return " ".join(f"{op.replace('_conv', '').replace('_pool', '')}<{i}" for op, i in gene)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("search_dir", type=Path, help="a comparison folder of model.meta=arch runs")
    args = parser.parse_args(argv)

    runs = []
    for run_dir in sorted(p for p in args.search_dir.iterdir() if p.is_dir()):
        match = RUN.match(run_dir.name)
        if not match or not (run_dir / "metrics.json").is_file() or not (run_dir / "genotype.json").is_file():
            continue
        genotype = json.loads((run_dir / "genotype.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
        arch = searched_architecture(run_dir / "checkpoint.pt", genotype["steps"])
        phases = metrics["phase_seconds"]
        runs.append({"variant": match["folder"], "seed": int(match["seed"]), "genotype": genotype,
                     "decided": decisiveness(arch), "wall": metrics["wall_time_s"],
                     "pretrain": sum(phases.get(name, 0.0) for name in GAN_PHASES),
                     "s_per_it": metrics["seconds_per_iteration"]})
    if not runs:
        raise SystemExit(f"{args.search_dir}: no finished <variant>-seed<s> runs with a genotype.json")

    steps = runs[0]["genotype"]["steps"]
    print(f"# Searches in {args.search_dir} ({len(runs)} finished runs)\n")
    print(f"A's movement: mean strongest real-operation weight per edge (untouched: {1 / len(PRIMITIVES):.3f}; "
          f"one-hot: 1) and mean strongest edge weight per node (untouched: {np.mean([1 / (2 + i) for i in range(steps)]):.3f}).\n")
    rows = [[r["variant"], str(r["seed"]), f"{r['decided']['normal'][0]:.3f} / {r['decided']['normal'][1]:.3f}",
             f"{r['decided']['reduce'][0]:.3f} / {r['decided']['reduce'][1]:.3f}",
             short(r["genotype"]["normal"]), short(r["genotype"]["reduce"])] for r in runs]
    print(markdown_table(["variant", "seed", "normal: op / edge", "reduce: op / edge", "normal cell", "reduce cell"], rows))

    variants = list(dict.fromkeys(r["variant"] for r in runs))
    by_variant = {v: [r for r in runs if r["variant"] == v] for v in variants}
    print(f"\nShared genotype edges (node by node; two random genotypes share {chance_shared(steps):.3f}):\n")
    rows = []
    for a, b in itertools.combinations_with_replacement(variants, 2):
        pairs = ([(x, y) for x, y in itertools.combinations(by_variant[a], 2)] if a == b else
                 [(x, y) for x in by_variant[a] for y in by_variant[b]])
        if pairs:
            shared = [shared_edges(x["genotype"], y["genotype"]) for x, y in pairs]
            rows.append([a, b, f"{np.mean(shared):.3f}", str(len(pairs))])
    print(markdown_table(["variant", "variant", "shared edges", "pairs"], rows))

    reference = by_variant.get("vanilla_meta")
    print("\nSearch cost (wall time includes the GAN's own phases; s/iteration is the search phase's)"
          + (", relative to vanilla_meta (PC-DARTS):" if reference else ":") + "\n")
    rows = []
    for v in variants:
        wall = np.mean([r["wall"] for r in by_variant[v]])
        per_it = np.mean([r["s_per_it"] for r in by_variant[v]])
        pretrain = np.mean([r["pretrain"] for r in by_variant[v]])
        ratio = (f"{wall / np.mean([r['wall'] for r in reference]):.1f}x / "
                 f"{per_it / np.mean([r['s_per_it'] for r in reference]):.1f}x") if reference else "-"
        rows.append([v, str(len(by_variant[v])), f"{wall:.0f}", f"{pretrain:.0f}", f"{per_it:.3f}", ratio])
    print(markdown_table(["variant", "runs", "wall s", "GAN phases s", "s / iteration", "wall / per iteration"],
                         rows))


if __name__ == "__main__":
    main()
