"""A as an architecture (model.meta=arch): the PC-DARTS supernet, genotype derivation, hypergradients
of α and β, and a search through the CLI."""
from __future__ import annotations

import csv
import json
import random
import re
import signal

import pytest
import torch
import yaml

from experiments.bench import nas_search
from experiments.cli import main
from mlo.errors import ConfigError
from mlo.models.nas import (NONE, PRIMITIVES, Architecture, GenotypeNetwork, MixedOp, Supernet, channel_shuffle,
                            derive_genotype, edge_count, read_genotype)
from tests.conftest import build_run
from tests.test_hypergradient import run_and_compare
from tests.test_reliability import interrupt_after_progress, metrics_without_timing, start

TINY_SUPERNET = ["model.encoder=pc_darts", "model.meta=arch", "model.width=4", "arch.cells=3", "arch.nodes=2",
                 "arch.partial=2"]


def test_supernet_shapes_and_gradients_reach_every_part_of_a():
    net, arch = Supernet(in_channels=1, width=8, cells=3, steps=4, partial=4), Architecture(4)
    x = torch.randn(4, 1, 16, 16)
    features = net(x, arch)
    assert features.shape == (4, net.out_dim) and net.out_dim == 4 * 32  # 4 nodes x (8 doubled twice)
    features.square().sum().backward()
    for name, p in arch.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert [c.reduction for c in net.cells] == [False, True, True]  # at cells // 3 and 2 * cells // 3


def test_partial_channels_pass_the_rest_of_the_channels_unchanged():
    """With every operation weighted 0, the edge's output is the bypassed 3/4 of the channels (and zeros
    where the operations' quarter was), shuffled; a reducing edge max-pools the bypass."""
    x = torch.randn(2, 8, 6, 6)
    for stride in (1, 2):
        edge = MixedOp(8, stride, partial=4).eval()
        out = edge(x, torch.zeros(len(PRIMITIVES)))
        rest = x[:, 2:] if stride == 1 else torch.nn.functional.max_pool2d(x[:, 2:], 2)
        expected = channel_shuffle(torch.cat([torch.zeros(2, 2, *rest.shape[2:]), rest], dim=1), 4)
        assert out.shape == (2, 8, 6 // stride, 6 // stride) and torch.equal(out, expected)


def test_channel_shuffle_interleaves_the_groups():
    x = torch.arange(8.0).view(1, 8, 1, 1)
    assert channel_shuffle(x, 4).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_genotype_keeps_each_nodes_two_strongest_edges_and_their_strongest_real_operation():
    steps = 3
    alpha = torch.zeros(edge_count(steps), len(PRIMITIVES))
    beta = torch.ones(edge_count(steps))
    op = {name: i for i, name in enumerate(PRIMITIVES)}
    # node 0 (edges 0, 1): both kept; 'none' is strongest on edge 0 and is never chosen
    alpha[0, NONE], alpha[0, op["sep_conv_3x3"]] = 9.0, 1.0
    alpha[1, op["max_pool_3x3"]] = 2.0
    # node 1 (edges 2, 3, 4): edges 3 and 4 win; edge 2's operation is strong but its beta is tiny
    alpha[2, op["dil_conv_5x5"]] = 5.0
    beta[2] = 0.01
    alpha[3, op["skip_connect"]] = 3.0
    alpha[4, op["avg_pool_3x3"]] = 2.0
    # node 2 (edges 5..8): edges 5 and 8
    alpha[5, op["sep_conv_5x5"]] = 4.0
    alpha[8, op["dil_conv_3x3"]] = 4.0
    weights = torch.cat([torch.softmax(alpha[s:s + n], 1) * (beta[s:s + n] / beta[s:s + n].sum())[:, None]
                         for s, n in ((0, 2), (2, 3), (5, 4))])
    assert derive_genotype(weights, steps) == [
        ("sep_conv_3x3", 0), ("max_pool_3x3", 1),
        ("skip_connect", 1), ("avg_pool_3x3", 2),
        ("sep_conv_5x5", 0), ("dil_conv_3x3", 3)]


def test_architecture_weights_normalise_operations_per_edge_and_edges_per_node():
    arch = Architecture(3)
    with torch.no_grad():
        for p in arch.parameters():
            p.normal_()
    for reduction in (False, True):
        ops, edges = arch.weights(reduction)
        assert torch.allclose(ops.sum(1), torch.ones(edge_count(3)))
        assert [round(float(edges[s:s + n].sum()), 5) for s, n in ((0, 2), (2, 3), (5, 4))] == [1.0, 1.0, 1.0]
    genotype = arch.genotype()
    assert len(genotype["normal"]) == len(genotype["reduce"]) == 6 and genotype["normal_concat"] == [2, 3, 4]


@pytest.mark.parametrize("mode", ["vanilla_meta", "end2end"])
def test_hypergradient_of_the_architecture_matches_exact_autograd(mode):
    """A = (α, β) learned by the meta level: the engine's gradient against the path-by-path exact reference
    (all five paths in end2end, H reading A through a supernet of its own)."""
    run = build_run(*TINY_SUPERNET, f"train.mode={mode}", "train.meta_every=2", "gan.gan_ch=4")
    meta = run.levels["meta"]
    assert isinstance(meta.module, Architecture)
    if mode == "end2end":
        assert {">".join(p.name for p in path) for path in meta.paths} >= {"meta>w2>gen>disc>meta"}
    reports = run_and_compare(run, iterations=4)
    assert len(reports) == 2
    for total, hyper in reports:
        assert total >= 0.99 and hyper >= 0.99, reports


def test_a_search_through_the_cli_writes_the_genotype_and_its_cells(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", *TINY_SUPERNET, "mode=vanilla_meta", "epochs=1", "progress=false", "device=cpu",
                 "name=search"]) == 0
    run_dir = tmp_path / "runs" / "search"
    genotype = json.loads((run_dir / "genotype.json").read_text())
    assert genotype["steps"] == 2 and len(genotype["normal"]) == len(genotype["reduce"]) == 4
    assert all(op in PRIMITIVES and op != "none" and 0 <= i < 2 + k // 2 for k, (op, i) in enumerate(genotype["normal"]))
    for cell in ("normal", "reduce"):
        assert (run_dir / f"cell_{cell}.png").read_bytes()[:4] == b"\x89PNG"
    assert "Searched architecture" in (run_dir / "report.md").read_text()

    # evaluation: the searched network from scratch on train + validation, with drop-path and an auxiliary head
    assert main(["run", "model.encoder=darts", f"arch.genotype={run_dir / 'genotype.json'}", "arch.cells=3",
                 "model.width=4", "arch.drop_path=0.2", "arch.auxiliary_weight=0.4", "data.train_on_val=true",
                 "mode=vanilla", "epochs=1", "progress=false", "device=cpu", "name=evaluate"]) == 0
    metrics = json.loads((tmp_path / "runs" / "evaluate" / "metrics.json").read_text())
    assert 0 <= metrics["after"]["top1"] <= metrics["after"]["top5"] <= 1
    search_counts = json.loads((run_dir / "metrics.json").read_text())["train_counts"]
    val_per_class = yaml.safe_load((tmp_path / "runs" / "evaluate" / "config.yaml").read_text())["data"]["val_per_class"]
    assert sum(metrics["train_counts"]) == sum(search_counts) + 10 * val_per_class  # the validation images joined


def test_a_search_comparison_is_evaluated_genotype_by_genotype(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", *TINY_SUPERNET, "epochs=1", "progress=false", "device=cpu", "--modes", "vanilla_meta",
                 "--seeds", "0,1", "--name", "search"]) == 0
    evaluation = ["model.encoder=darts", "model.meta=none", "arch.cells=3", "model.width=4",
                  "data.train_on_val=true", "epochs=1", "progress=false", "device=cpu"]
    # a seed the search did not run is refused before anything trains
    assert main(["compare", *evaluation, "--genotypes-of", "runs/search", "--seeds", "0,2"]) == 2
    assert "runs/search/vanilla_meta-seed2/genotype.json' is missing" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "search-evaluated").exists()

    assert main(["compare", *evaluation, "--genotypes-of", "runs/search", "--seeds", "0,1"]) == 0
    root = tmp_path / "runs" / "search-evaluated"
    for seed in (0, 1):
        run = yaml.safe_load((root / f"vanilla_meta-seed{seed}" / "config.yaml").read_text())
        assert run["arch"]["genotype"] == f"runs/search/vanilla_meta-seed{seed}/genotype.json"
        assert run["train"]["mode"] == "vanilla" and run["run"]["seed"] == seed
    rows = {r["variant"]: r for r in csv.DictReader((root / "compare.csv").open())}
    assert set(rows) == {"vanilla_meta"} and rows["vanilla_meta"]["seeds"] == "2"
    assert 0 <= float(rows["vanilla_meta"]["top1_mean"]) <= float(rows["vanilla_meta"]["top5_mean"]) <= 100

    # the search report reads A back from each run's checkpoint: its genotype is the one the run wrote
    capsys.readouterr()
    nas_search.main(["runs/search"])
    report = capsys.readouterr().out
    for seed in (0, 1):
        genotype = json.loads((tmp_path / "runs" / "search" / f"vanilla_meta-seed{seed}" / "genotype.json").read_text())
        assert f"| vanilla_meta | {seed} |" in report and nas_search.short(genotype["normal"]) in report
    assert "| vanilla_meta | vanilla_meta |" in report and "| vanilla_meta | 2 |" in report


def test_shared_edges_of_genotypes_and_their_chance_level():
    rng = random.Random(0)

    def draw(steps=4):
        cells = {}
        for cell in ("normal", "reduce"):
            gene = []
            for node in range(steps):
                for i in sorted(rng.sample(range(2 + node), 2)):
                    gene.append((rng.choice([p for p in PRIMITIVES if p != "none"]), i))
            cells[cell] = gene
        return cells

    a = draw()
    assert nas_search.shared_edges(a, a) == 1.0
    shared = [nas_search.shared_edges(draw(), draw()) for _ in range(4000)]
    assert abs(sum(shared) / len(shared) - nas_search.chance_shared(4)) < 0.005


def test_the_searched_network_follows_its_genotype_and_trains_its_auxiliary_head():
    genotype = {"normal": [["sep_conv_3x3", 0], ["skip_connect", 1], ["max_pool_3x3", 2], ["dil_conv_3x3", 0]],
                "normal_concat": [2, 3], "reduce": [["avg_pool_3x3", 0], ["sep_conv_5x5", 1], ["skip_connect", 2],
                                                   ["dil_conv_5x5", 1]], "reduce_concat": [2, 3]}
    net = GenotypeNetwork(1, 4, 3, genotype, num_classes=10, drop_path=0.3, auxiliary_weight=0.4)
    assert [type(op).__name__ for op in net.cells[0].ops] == ["Sequential", "Identity", "MaxPool2d", "Sequential"]
    assert net.cells[0].inputs == [0, 1, 2, 0] and net.out_dim == 2 * 16
    labels = torch.randint(0, 10, (4,))
    features = net(torch.randn(4, 1, 16, 16))
    loss = net.auxiliary_loss(labels)
    assert features.shape == (4, 32) and net.auxiliary_logits.shape == (4, 10) and loss > 0
    loss.backward()
    assert net.auxiliary.classifier.weight.grad is not None
    net.eval()
    net(torch.randn(4, 1, 16, 16))
    assert net.auxiliary_loss(labels) == 0.0  # in evaluation the auxiliary head is not run


@pytest.mark.parametrize("text,message", [
    ("{", "is not a JSON genotype"),
    ('{"normal": [["conv_7x7", 0], ["skip_connect", 1]], "normal_concat": [2]}', "normal edge 0 (conv_7x7, 0)"),
    ('{"normal": [["skip_connect", 3], ["skip_connect", 1]], "normal_concat": [2]}', "normal edge 0 (skip_connect, 3)"),
    ('{"normal": [["skip_connect", 0], ["skip_connect", 1]], "normal_concat": [2]}', "no valid 'reduce' cell"),
])
def test_a_genotype_file_that_is_not_one_is_refused_by_name(text, message, tmp_path):
    path = tmp_path / "genotype.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_genotype(path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_genotype(tmp_path / "missing.json")


def test_without_a_meta_level_the_reported_classifiers_own_architecture_is_written(tmp_path, monkeypatch):
    """mtl trains each network's architecture with its weights (no A to share): W2's is the result."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", *TINY_SUPERNET, "mode=mtl", "epochs=1", "gan_pretrain_steps=2", "progress=false",
                 "device=cpu", "name=mtl"]) == 0
    genotype = json.loads((tmp_path / "runs" / "mtl" / "genotype.json").read_text())
    assert len(genotype["normal"]) == 4 and (tmp_path / "runs" / "mtl" / "cell_reduce.png").is_file()
    # the search report reads the same architecture back from W2's checkpointed weights
    arch = nas_search.searched_architecture(tmp_path / "runs" / "mtl" / "checkpoint.pt", genotype["steps"])
    assert json.loads(json.dumps(arch.genotype())) == genotype


@pytest.mark.parametrize("overrides,message", [
    (["model.meta=arch"], "model.meta=arch: A is the architecture of a PC-DARTS supernet; set model.encoder=pc_darts"),
    (["model.encoder=pc_darts"], "model.encoder=pc_darts: the supernet reads an architecture A; set model.meta=arch"),
    (["model.encoder=pc_darts", "model.meta=arch", "model.width=6"], "model.width=6: pc_darts passes 1/4"),
    (["model.encoder=pc_darts", "model.meta=arch", "mode=vanilla", "posthoc=crt"], "train.posthoc=crt: cRT retrains"),
    (["model.encoder=pc_darts", "model.meta=arch", "gan.generator=vcgan"], "model.meta=arch: H reads A through a supernet"),
    (["model.encoder=darts"], "model.encoder=darts: the network is built from a searched genotype"),
    (["arch.genotype=g.json"], "arch.genotype: only model.encoder=darts is built from a genotype"),
    (["model.encoder=darts", "arch.genotype=missing.json", "mode=vanilla"], "arch.genotype: 'missing.json' does not exist"),
    (["data.train_on_val=true"], "data.train_on_val: train.mode=end2end learns on the validation set"),
])
def test_architecture_settings_that_cannot_work_are_refused(overrides, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", *overrides, "epochs=1", "progress=false", "device=cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_the_published_pc_darts_cell_is_shipped_by_name():
    genotype = read_genotype("pc_darts_cifar10")
    assert genotype["normal"][0] == ["sep_conv_3x3", 1] and genotype["reduce_concat"] == [2, 3, 4, 5]
    net = GenotypeNetwork(3, 4, 3, genotype, num_classes=10)
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, net.out_dim) and net.out_dim == 4 * 16


def test_a_search_stopped_midway_resumes_to_the_same_architecture(tmp_path):
    """SIGTERM mid-search, then --resume: the same genotype and metrics as a search never stopped."""
    search = [*TINY_SUPERNET, "mode=vanilla_meta", "epochs=3", "meta_every=2", "checkpoint_every=3", "progress=false",
              "device=cpu"]
    reference = start("run", *search, "name=reference", cwd=tmp_path)
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-2000:]
    run_dir = tmp_path / "runs" / "stopped"
    proc = start("run", *search, "name=stopped", cwd=tmp_path)
    code, err = interrupt_after_progress(proc, run_dir, signal.SIGTERM, past_step=6, rng=random.Random(0))
    assert code == 143 and not (run_dir / "genotype.json").exists(), err[-2000:]
    resumed = start("run", "--resume", str(run_dir), cwd=tmp_path)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert (run_dir / "genotype.json").read_text() == (tmp_path / "runs" / "reference" / "genotype.json").read_text()
    assert metrics_without_timing(run_dir) == metrics_without_timing(tmp_path / "runs" / "reference")


def test_the_imagenet_stem_starts_the_cells_at_an_eighth_of_the_resolution():
    net = Supernet(in_channels=3, width=8, cells=3, steps=2, partial=2, stem="imagenet")
    s0, s1 = net.stem(torch.randn(2, 3, 64, 64))
    assert s0.shape == (2, 8, 16, 16) and s1.shape == (2, 8, 8, 8)
    assert net(torch.randn(2, 3, 64, 64), Architecture(2)).shape == (2, net.out_dim)
