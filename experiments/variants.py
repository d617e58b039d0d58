"""The variants and seeds of ``needsgen compare``, read from its arguments without importing torch.

A variant is a mode with optional overrides, written ``mode`` or ``mode:key=value+key=value``
(``end2end:allocator=equal``); one of a search comparison's evaluation (``--genotypes-of``) trains each seed's
searched genotype. A variant with a post-hoc correction continues the finished run of its base variant.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from experiments.config_files import GENOTYPE, POSTHOC_SETTINGS
from experiments.registry import get_mode
from mlo.config import resolve_key
from mlo.errors import ConfigError, UserError


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: tuple[str, ...]
    searched_in: Path | None = None   # evaluation of a search comparison: where each seed's genotype is

    def seed_overrides(self, seed: int) -> tuple[str, ...]:
        return (f"arch.genotype={self.genotype(seed)}",) if self.searched_in else ()

    def genotype(self, seed: int) -> Path:
        return self.searched_in / f"{self.folder}-seed{seed}" / GENOTYPE

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label.replace("=", "-"))


def is_posthoc_override(text: str) -> bool:
    """Whether a ``key=value`` override sets one of the settings that act only after training."""
    key = text.split("=", 1)[0]
    try:
        return ".".join(resolve_key(key)) in POSTHOC_SETTINGS
    except ConfigError:
        return False


def base_variant(variant: Variant) -> Variant | None:
    """The variant without its post-hoc correction (``end2end`` for ``end2end:posthoc=crt``), whose finished
    runs a run of ``variant`` continues; None for a variant without one."""
    mode, _, rest = variant.label.partition(":")
    extras = [o for o in rest.split("+") if o]
    kept = [o for o in extras if not is_posthoc_override(o)]
    if len(kept) == len(extras) or variant.searched_in:
        return None
    return Variant(mode + (":" + "+".join(kept) if kept else ""), (f"train.mode={mode}",) + tuple(kept))


def parse_variants(text: str) -> list[Variant]:
    variants = []
    for spec in (s.strip() for s in text.split(",")):
        if not spec:
            continue
        mode, _, rest = spec.partition(":")
        get_mode(mode, key="--modes")
        extra = tuple(o for o in rest.split("+") if o)
        for o in extra:
            if "=" not in o:
                raise ConfigError(f"--modes: '{o}' in '{spec}' is not key=value (write mode:key=value+key=value)")
        variants.append(Variant(spec, (f"train.mode={mode}",) + extra))
    labels = [v.label for v in variants]
    if not variants or len(set(labels)) != len(labels):
        raise ConfigError(f"--modes: give distinct variants, e.g. vanilla,sequential,end2end (got '{text}')")
    return variants


def searched_variants(search_root: Path, seeds: list[int]) -> list[Variant]:
    """The variants of a finished search comparison, each to be evaluated from its runs' genotypes
    (all of which must exist: nothing trains before that is checked)."""
    table = search_root / "compare.csv"
    if not table.is_file():
        raise UserError(f"--genotypes-of: '{search_root}' has no compare.csv; finish the search comparison "
                        f"first (needsgen compare <search config> --modes ... --name {search_root.name})")
    with table.open(newline="") as f:
        variants = [Variant(row["variant"], ("train.mode=vanilla",), searched_in=search_root) for row in csv.DictReader(f)]
    for v in variants:
        for seed in seeds:
            if not v.genotype(seed).is_file():
                raise UserError(f"--genotypes-of: '{v.genotype(seed)}' is missing; finish that search run "
                                f"(rerun the search comparison with --seeds {seed}) or leave seed {seed} out")
    return variants


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got '{text}'") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds: expected distinct non-negative integers, got '{text}'")
    return seeds


