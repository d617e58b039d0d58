"""Config loading, overrides, validation: every error names the field."""
from __future__ import annotations

import dataclasses

import pytest

from experiments.cli import shipped_configs
from mlo.config import SECTIONS, Config, all_keys, config_diff, load_config
from mlo.errors import ConfigError


def test_leaf_names_are_unique_so_bare_keys_work():
    leaves = [k.split(".", 1)[1] for k in all_keys()]
    assert len(leaves) == len(set(leaves))
    cfg = load_config(None, ["epochs=3", "data.imbalance_factor=20", "device=cpu", "lr_milestones=[1,2]"])
    assert (cfg.train.epochs, cfg.data.imbalance_factor, cfg.run.device) == (3, 20.0, "cpu")
    assert cfg.train.lr_milestones == [1, 2]


@pytest.mark.parametrize("override,message", [
    ("train.epoch=3", "did you mean 'train.epochs'"),
    ("imbalance_factr=3", "did you mean 'imbalance_factor'"),
    ("epochs=three", "train.epochs: expected an integer"),
    ("epochs=2.5", "train.epochs: expected an integer"),
    ("epochs=0", "train.epochs: must be >= 1"),
    ("imbalance_factor=0.5", "data.imbalance_factor: must be >= 1.0"),
    ("progress=maybe", "run.progress: expected true or false"),
    ("dataset=mnist", "data.dataset: unknown value 'mnist'"),
    ("encoder=resnet33", "did you mean 'resnet32'"),
    ("allocator=greedy", "train.allocator: unknown value"),
    ("loss=ldam", "train.loss: unknown value 'ldam' (did you mean 'ldam_drw'"),
    ("cb_beta=1", "train.cb_beta: must be < 1"),
    ("drw_start=1.5", "train.drw_start: must be <= 1.0"),
    ("focal_gamma=-1", "train.focal_gamma: must be >= 0.0"),
    ("optimizer=lion", "train.optimizer: must be one of adam, sgd"),
    ("precision=fp8", "train.precision: must be one of"),
    ("gan_betas=[0.5]", "gan.gan_betas: expected two numbers"),
    ("lr_milestones=[20,10]", "train.lr_milestones: expected increasing epochs"),
    ("diffaugment=translation,rotate", "gan.diffaugment: unknown value 'rotate'"),
    ("device=tpu", "run.device: expected auto, cpu, cuda or cuda:N"),
    ("name=a/b", "run.name: must be a plain folder name"),
    ("epochs", "is not of the form key=value"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown config section 'trian' \\(did you mean 'train'"):
        load_config(unknown)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_shipped_configs_validate(name):
    cfg = load_config(shipped_configs()[name])
    assert cfg.data.dataset in name


def test_paper_settings_in_the_cifar_configs():
    for name in ("cifar10_lt_if100", "cifar100_lt_if100", "fmnist_lt_if100"):
        cfg = load_config(shipped_configs()[name])
        t = cfg.train
        assert (cfg.model.encoder, t.optimizer, t.lr, t.batch_size, t.epochs, t.lr_milestones) == \
               ("resnet32", "adam", 1e-3, 64, 100, [80, 90])
        assert cfg.data.imbalance_factor == 100


def test_config_diff_lists_differing_keys():
    a, b = Config(), Config()
    b.set("epochs", 5)
    b.set("seed", 3)
    assert config_diff(a, b) == ["train.epochs: 30 -> 5", "run.seed: 0 -> 3"]
    assert config_diff(a, b, ignore=("run.seed",)) == ["train.epochs: 30 -> 5"]


def test_every_field_has_help():
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f.name
