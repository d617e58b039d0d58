"""Work shared between runs of a comparison: a post-hoc correction continues the finished run without it,
and runs that differ only after the GAN's pre-training share one pre-trained GAN; either way a run ends
exactly as if it had trained everything itself."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from experiments.runner import Run, prepare_run_dir
from mlo.errors import UserError
from tests.conftest import tiny_config

SHORT = ("train.epochs=1", "train.batch_size=32", "gan.gan_pretrain_steps=4", "train.meta_every=2")


def finished(tmp_path, name: str, *overrides: str, start_from=None) -> dict:
    crt = ("train.crt_epochs=1",) if "train.posthoc=crt" in overrides else ()
    cfg = tiny_config(*SHORT, *crt, f"run.out_dir={tmp_path}", f"run.name={name}", *overrides)
    run_dir = prepare_run_dir(cfg, name)
    return Run(cfg).execute(run_dir, start_from=start_from)


def outcome(metrics: dict) -> tuple:
    return (metrics["after"]["per_class_acc"], (metrics["before"] or {}).get("per_class_acc"),
            metrics.get("generated_per_class"))


@pytest.mark.parametrize("mode,posthoc", [("end2end", "crt"), ("sequential", "logit_adjust"), ("vanilla", "crt")])
def test_a_correction_started_from_the_finished_run_equals_training_it_whole(tmp_path, mode, posthoc):
    whole = finished(tmp_path, "whole", f"train.mode={mode}", f"train.posthoc={posthoc}")
    base = finished(tmp_path, "base", f"train.mode={mode}")
    derived = finished(tmp_path, "derived", f"train.mode={mode}", f"train.posthoc={posthoc}",
                       start_from=tmp_path / "base")
    assert outcome(derived) == outcome(whole)
    assert derived["derived_from"] == str(tmp_path / "base") and whole["derived_from"] is None
    reported = base["final_classifier"]
    assert derived["classifiers"][reported] == base["classifiers"][reported]  # the same training
    if posthoc == "crt":
        assert derived["final_classifier"] == "crt"
    else:  # what logit adjustment subtracts: the log of a prior that is not uniform
        assert max(derived["class_prior"]) > 1.2 * min(derived["class_prior"])
    logs = [list(csv.DictReader((tmp_path / name / "train_log.csv").open())) for name in ("base", "derived")]
    assert [{k: row[k] for k in logs[0][0]} for row in logs[1][:len(logs[0])]] == logs[0]  # the training's log comes along


def test_a_correction_is_not_started_from_another_training_or_an_unfinished_run(tmp_path):
    finished(tmp_path, "base", "train.mode=vanilla")
    with pytest.raises(UserError, match="different config: train.lr"):
        finished(tmp_path, "other", "train.mode=vanilla", "train.posthoc=crt", "train.lr=0.01",
                 start_from=tmp_path / "base")
    unfinished = tmp_path / "unfinished"
    cfg = tiny_config(*SHORT, "train.mode=vanilla", f"run.out_dir={tmp_path}", "run.name=unfinished")
    run = Run(cfg)
    run.run_dir = prepare_run_dir(cfg, "unfinished")
    run.trainer.phases = run.trainer.phases  # train one iteration, then checkpoint as a stopped run does
    run.trainer.stop.signal = 2
    run.trainer.run()
    run.save_checkpoint()
    with pytest.raises(UserError, match="has not finished training"):
        finished(tmp_path, "from_unfinished", "train.mode=vanilla", "train.posthoc=crt", start_from=unfinished)


@pytest.mark.parametrize("mode", ["end2end", "sequential"])
def test_runs_share_a_pretrained_gan_and_end_as_if_they_had_pretrained_it(tmp_path, mode):
    cache = f"run.gan_cache={tmp_path / 'cache'}"
    first = finished(tmp_path, "first", f"train.mode={mode}", cache)
    # a setting that acts only after pre-training: the GAN is shared, the run ends as one that pretrains itself
    shared = finished(tmp_path, "shared", f"train.mode={mode}", cache, "train.lr=0.003")
    alone = finished(tmp_path, "alone", f"train.mode={mode}", "train.lr=0.003")
    assert first["gan_pretrained"].startswith("trained: ") and shared["gan_pretrained"].startswith("shared: ")
    assert first["gan_pretrained"].split(": ")[1] == shared["gan_pretrained"].split(": ")[1]
    assert alone["gan_pretrained"] is None
    assert outcome(shared) == outcome(alone)
    assert outcome(shared) != outcome(first)
    weights = [torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["levels"] for name in ("shared", "alone")]
    for level in weights[0]:
        for key, value in weights[0][level]["module"].items():
            assert torch.equal(value, weights[1][level]["module"][key]), (level, key)
    # what the pre-training depends on (the GAN's width, the seed) gets a GAN of its own
    for extra in ("gan.gan_ch=2", "run.seed=1")[:1 if mode == "sequential" else 2]:
        other = finished(tmp_path, f"other-{extra}", f"train.mode={mode}", cache, extra)
        assert other["gan_pretrained"].startswith("trained: ")
    assert len(list((tmp_path / "cache").glob("pretrained-*.pt"))) == (2 if mode == "sequential" else 3)
    assert json.loads((tmp_path / "shared" / "metrics.json").read_text())["gan_pretrained"] == shared["gan_pretrained"]


@pytest.mark.parametrize("mode,pretrain_steps,model", [
    ("sequential", 4, ("model.meta=head",)), ("separate", 0, ("model.meta=neck",)),
    ("separate", 4, ("model.meta=head", "model.tie_encoders=true"))])
def test_runs_share_the_gan_phase_after_pretraining_and_end_as_if_they_had_trained_it(tmp_path, mode, pretrain_steps,
                                                                                       model):
    """The baselines' GAN phase reads nothing W1's or W2's settings change: runs that differ in those share the
    GAN at its end too (with or without pre-training before it; with the statistics H's steps keep in a neck-form
    A; with an encoder H shares with W1, which then takes none of the gradients H lent it over the phase), and a
    longer phase trains a GAN of its own."""
    cache = f"run.gan_cache={tmp_path / 'cache'}"
    gan = (f"train.mode={mode}", f"gan.gan_pretrain_steps={pretrain_steps}", *model)
    first = finished(tmp_path, "first", *gan, cache)
    shared = finished(tmp_path, "shared", *gan, cache, "train.lr=0.003")
    alone = finished(tmp_path, "alone", *gan, "train.lr=0.003")
    assert first["gan_trained"].startswith("trained: ") and shared["gan_trained"].startswith("shared: ")
    assert first["gan_trained"].split(": ")[1] == shared["gan_trained"].split(": ")[1]
    assert alone["gan_trained"] is None
    assert outcome(shared) == outcome(alone) and outcome(shared) != outcome(first)
    weights = [torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["levels"] for name in ("shared", "alone")]
    for level in weights[0]:
        for key, value in weights[0][level]["module"].items():
            assert torch.equal(value, weights[1][level]["module"][key]), (level, key)
    assert shared["phase_seconds"]["GAN"] == first["phase_seconds"]["GAN"]  # the time the GAN took, where it trained
    logs = [list(csv.DictReader((tmp_path / name / "train_log.csv").open())) for name in ("shared", "alone")]
    assert [(r["phase"], r["global_step"]) for r in logs[0]] == [(r["phase"], r["global_step"]) for r in logs[1]]
    longer = finished(tmp_path, "longer", *gan, cache, "train.epochs=2")
    assert longer["gan_trained"].startswith("trained: ")
    assert len(list((tmp_path / "cache").glob("trained-*.pt"))) == 2
    if pretrain_steps:  # the pre-training a longer GAN phase starts from is the same
        assert longer["gan_pretrained"].startswith("shared: ")


def test_a_run_stopped_during_pretraining_leaves_its_gan_for_others_when_resumed(tmp_path):
    cache = f"run.gan_cache={tmp_path / 'cache'}"
    cfg = tiny_config(*SHORT, "train.mode=end2end", cache, f"run.out_dir={tmp_path}", "run.name=stopped")
    run = Run(cfg)
    run.run_dir = prepare_run_dir(cfg, "stopped")
    run.trainer.stop.signal = 2  # one pre-training iteration, then a checkpoint, as a stopped run leaves
    run.trainer.run()
    run.save_checkpoint()
    assert not list((tmp_path / "cache").glob("*.pt"))
    resumed = Run(tiny_config(*SHORT, "train.mode=end2end", cache, f"run.out_dir={tmp_path}", "run.name=stopped")
                  ).execute(tmp_path / "stopped", resume=True)
    assert resumed["gan_pretrained"].startswith("trained: ")
    shared = finished(tmp_path, "shared", "train.mode=end2end", cache)
    assert shared["gan_pretrained"] == resumed["gan_pretrained"].replace("trained: ", "shared: ")
