"""Configs as the command line names them, and the files of a run directory; nothing here imports torch, so
that a wrong argument is answered at once.

- ``resolve_config_path``: a YAML file, or the name of a config shipped in ``experiments/configs``;
- ``split_args``: ``[CONFIG] key=value ...`` into the config and its overrides;
- ``load_run_config``: read a config (importing its ``run.plugins``), check its mode against the registered
  ones, then validate the rest (the registries of datasets, models and losses import torch);
- ``read_run_config``: the saved config of a run directory (its plugins imported again).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from mlo.config import Config, from_dict, read_config, resolve_key, validate
from mlo.errors import ConfigError, UserError

DEFAULT_CONFIG = "digits_lt"
# the files of a run directory
CHECKPOINT, METRICS, CONFIG, LOG, SEEDS = "checkpoint.pt", "metrics.json", "config.yaml", "train_log.csv", "seeds.json"
ALLOCATION_LOG, LEVEL_LOG, TENSORBOARD, GENOTYPE = ("allocation_log.csv", "level_log.csv", "tensorboard",
                                                    "genotype.json")
# settings that may change between a checkpoint and its resumption without changing the run
RESUMABLE_CHANGES = ("run.progress", "run.device", "run.checkpoint_every", "run.name", "run.out_dir", "run.sync_every",
                     "run.threads", "run.tensorboard", "run.gan_cache")
# settings that act only after training: a run with them can start from the finished run without them
POSTHOC_SETTINGS = ("train.posthoc", "train.posthoc_tau", "train.crt_epochs")


def shipped_configs() -> dict[str, Path]:
    folder = resources.files("experiments") / "configs"
    return {p.name.removesuffix(".yaml"): Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def resolve_config_path(name: str | None) -> Path:
    """A file path, or the name of a config shipped in experiments/configs (with or without .yaml)."""
    name = name or DEFAULT_CONFIG
    path = Path(name)
    if path.is_file():
        return path
    shipped = shipped_configs()
    key = path.name.removesuffix(".yaml")
    if key in shipped and path.parent == Path("."):
        return shipped[key]
    hint = ""
    try:
        resolve_key(name)
        hint = f"; '{name}' is a config key: give it a value, {name}=VALUE"
    except ConfigError:
        pass
    raise UserError(f"config '{name}' is neither a file nor a shipped config ({', '.join(sorted(shipped))}){hint}")


def split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] key=value ...`` → (config, overrides)."""
    config = None
    overrides = []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config is None:
            config = item
        else:
            raise UserError(f"unexpected argument '{item}': give one config and key=value overrides")
    return config, overrides


def check_run_config(cfg: Config) -> Config:
    """The mode first (its registry needs no torch), then everything ``validate`` checks."""
    from experiments.registry import get_mode

    get_mode(cfg.train.mode)
    validate(cfg)
    return cfg


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """A config file with overrides, read (its plugins imported) and checked, the mode before anything that
    needs torch."""
    return check_run_config(read_config(path, overrides))


def read_run_config(run_dir: Path) -> Config:
    """The config a run directory was made with (its plugins imported again)."""
    path = run_dir / CONFIG
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a run directory (no {CONFIG}); give a folder that needsgen run created")
    return from_dict(yaml.safe_load(path.read_text()), source=str(path))
