"""``needsgen compare``: 2 modes x 2 seeds on digits, its table, tests and plots, and reuse of runs."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from experiments.cli import main

SHORT = ["epochs=2", "gan_pretrain_steps=4", "width=8", "gan_ch=8", "z_dim=8", "shared_dim=8",
         "meta_every=4", "progress=false"]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("compare")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        assert main(["compare", *SHORT, "--modes", "vanilla,end2end:allocator=equal", "--seeds", "0,1",
                     "--name", "cmp"]) == 0
    finally:
        os.chdir(old)
    return cwd / "runs" / "cmp"


def run_metrics(root, folder):
    return [json.loads((root / f"{folder}-seed{s}" / "metrics.json").read_text()) for s in (0, 1)]


def test_table_holds_mean_and_std_of_the_runs(comparison):
    rows = {r["variant"]: r for r in csv.DictReader((comparison / "compare.csv").open())}
    assert set(rows) == {"vanilla", "end2end:allocator=equal"}
    for variant, folder in (("vanilla", "vanilla"), ("end2end:allocator=equal", "end2end_allocator-equal")):
        top1 = 100 * np.array([m["top1"] for m in run_metrics(comparison, folder)])
        assert float(rows[variant]["top1_mean"]) == pytest.approx(top1.mean(), abs=1e-3)
        assert float(rows[variant]["top1_std"]) == pytest.approx(top1.std(ddof=1), abs=1e-3)
        assert rows[variant]["seeds"] == "2"
    e2e = run_metrics(comparison, "end2end_allocator-equal")
    assert all(m["mode"] == "end2end" for m in e2e)
    diff = 100 * np.mean([a["top1"] - b["top1"] for a, b in zip(e2e, run_metrics(comparison, "vanilla"))])
    assert float(rows["end2end:allocator=equal"]["diff_pp_vs_vanilla"]) == pytest.approx(diff, abs=1e-3)
    assert rows["vanilla"]["p_vs_vanilla"] == ""


def test_markdown_mirrors_the_paper_tables_and_states_the_tests(comparison):
    md = (comparison / "compare.md").read_text()
    assert "| Method | Top-1 % | Top-5 % | Many % | Medium % | Few % | ECE | per-class std % | time / run (s) | seeds |" in md
    assert "| end2end:allocator=equal | vanilla |" in md
    assert "Many: >100 training images" in md and "last epoch" in md and "little power" in md
    for png in ("per_class_accuracy.png", "allocation.png"):
        assert (comparison / png).read_bytes()[:4] == b"\x89PNG"


def test_rerun_reuses_finished_runs(comparison, capsys, monkeypatch):
    stamps = {p: p.stat().st_mtime_ns for p in comparison.glob("*/metrics.json")}
    monkeypatch.chdir(comparison.parent.parent)
    # overrides may also follow the options: the runs are the same, so all four are reused
    assert main(["compare", *SHORT[:3], "--modes", "vanilla,end2end:allocator=equal", "--seeds", "0,1",
                 "--name", "cmp", *SHORT[3:]]) == 0
    assert capsys.readouterr().err.count("finished before, reused") == 4
    assert stamps == {p: p.stat().st_mtime_ns for p in comparison.glob("*/metrics.json")}


@pytest.mark.parametrize("args,message", [
    (["--modes", "vanilla,magic"], "--modes: unknown mode 'magic'"),
    (["--modes", "end2end:allocator"], "is not key=value"),
    (["--modes", "vanilla,vanilla"], "give distinct variants"),
    (["--modes", "vanilla", "--seeds", "0,x"], "--seeds: expected comma-separated integers"),
    (["--modes", "vanilla", "seed=3"], "run.seed is set per run by compare"),
    # every variant is checked before the first run trains
    (["--modes", "vanilla,end2end:allocator=foo"], "variant 'end2end:allocator=foo': train.allocator: unknown value"),
    (["--modes", "vanilla,sequential:gen_budget=squared"], "variant 'sequential:gen_budget=squared': train.gen_budget"),
    (["--modes", "vanilla", "posthoc=crt"], "give a post-hoc correction per variant (--modes end2end:posthoc=crt)"),
    ([], "give --modes (the variants to train) or --genotypes-of SEARCH_DIR"),
    (["--genotypes-of", "nowhere"], "--genotypes-of: 'nowhere' has no compare.csv"),
])
def test_bad_compare_input(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("metrics.json"))  # nothing trained
