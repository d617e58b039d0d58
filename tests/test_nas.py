"""A as an architecture (model.meta=arch): the PC-DARTS supernet, genotype derivation, hypergradients
of α and β, and a search through the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from experiments.cli import main
from mlo.models.nas import (NONE, PRIMITIVES, Architecture, MixedOp, Supernet, channel_shuffle, derive_genotype,
                            edge_count)
from tests.conftest import build_run
from tests.test_hypergradient import run_and_compare

TINY_SUPERNET = ["model.encoder=pc_darts", "model.meta=arch", "model.width=4", "model.arch_cells=3",
                 "model.arch_nodes=2", "model.arch_partial=2"]


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


@pytest.mark.parametrize("overrides,message", [
    (["model.meta=arch"], "model.meta=arch: A is the architecture of a PC-DARTS supernet; set model.encoder=pc_darts"),
    (["model.encoder=pc_darts"], "model.encoder=pc_darts: the supernet reads an architecture A; set model.meta=arch"),
    (["model.encoder=pc_darts", "model.meta=arch", "model.width=6"], "model.width=6: pc_darts passes 1/4"),
    (["model.encoder=pc_darts", "model.meta=arch", "mode=vanilla", "posthoc=crt"], "train.posthoc=crt: cRT retrains"),
    (["model.encoder=pc_darts", "model.meta=arch", "gan.generator=vcgan"], "model.meta=arch: H reads A through a supernet"),
])
def test_architecture_settings_that_cannot_work_are_refused(overrides, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", *overrides, "epochs=1", "progress=false", "device=cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
