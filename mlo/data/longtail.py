"""Long-tailed training subsets and the balanced validation split.

Convention (LDAM-DRW / Meta-Weight-Net): class c keeps ``n_c = int(n_max * IF**(-c/(C-1)))`` images,
chosen by a seeded per-class shuffle; the validation images are taken per class from the
balanced training pool *before* the cut, so they never overlap the training subset.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mlo.errors import DataError

MANY_SHOT, FEW_SHOT = 100, 20  # Many: > 100 training images, Few: < 20, Medium: in between
SHOT_RULE = "Many: >100 training images, Medium: 20-100, Few: <20"
HOLDOUT_PER_CLASS = 300  # at most, of the pool's images left after the long-tail cut


def longtail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Images kept per class: ``int(n_max * IF**(-c/(C-1)))`` for c = 0..C-1."""
    if num_classes == 1:
        return [int(n_max)]
    return [int(n_max * imbalance_factor ** (-c / (num_classes - 1))) for c in range(num_classes)]


def class_rng(seed: int, c: int) -> np.random.Generator:
    """The random stream of class ``c`` in the per-class splits seeded by ``seed``."""
    return np.random.default_rng([seed, c])


@dataclass
class Split:
    """Indices into the source's training array; ``holdout``: images of the pool that neither the training
    set nor the validation set uses (a selection set that is not the test set), per class in a seeded order;
    ``spare``: the rest of the pool, which nothing else uses (the images of ``train.mode=sequential_real``)."""
    train: np.ndarray
    val: np.ndarray
    counts: list[int]
    holdout: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    spare: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # the pool after the holdout


def longtail_split(labels: np.ndarray, num_classes: int, imbalance_factor: float,
                   val_per_class: int, seed: int, n_max: int | None = None) -> Split:
    """Balanced validation split, then the long-tail cut of what remains.

    ``n_max`` defaults to the smallest per-class pool left after the validation split.
    """
    labels = np.asarray(labels)
    pools, val = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        idx = idx[class_rng(seed, c).permutation(len(idx))]
        if len(idx) <= val_per_class:
            raise DataError(f"data.val_per_class={val_per_class} leaves no training image for class {c} "
                            f"({len(idx)} images in its pool); lower data.val_per_class")
        val.append(idx[:val_per_class])
        pools.append(idx[val_per_class:])
    smallest = min(len(p) for p in pools)
    if n_max is None:
        n_max = smallest
    elif n_max > smallest:
        raise DataError(f"data.n_max={n_max} exceeds the smallest class pool ({smallest} images after the "
                        f"validation split); lower data.n_max or data.val_per_class")
    counts = longtail_counts(n_max, num_classes, imbalance_factor)
    if min(counts) < 1:
        empty = counts.index(min(counts))
        raise DataError(f"class {empty} has no training image after the long-tail cut "
                        f"(n_max={n_max}, data.imbalance_factor={imbalance_factor:g}); "
                        f"lower data.imbalance_factor or raise data.n_max")
    train = np.concatenate([p[:n] for p, n in zip(pools, counts)])
    holdout = np.concatenate([p[n:n + HOLDOUT_PER_CLASS] for p, n in zip(pools, counts)])
    spare = np.concatenate([p[n + HOLDOUT_PER_CLASS:] for p, n in zip(pools, counts)])
    return Split(train=np.sort(train), val=np.sort(np.concatenate(val)), counts=counts, holdout=np.sort(holdout),
                 spare=np.sort(spare))


def balanced_holdout(labels: np.ndarray, num_classes: int, per_class: int, seed: int,
                     key: str = "data.test_per_class") -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (rest, held-out) with ``per_class`` held-out images per class (``key``: the
    setting of ``per_class``, named in errors)."""
    labels = np.asarray(labels)
    held, rest = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        idx = idx[class_rng(seed + 7919, c).permutation(len(idx))]
        if len(idx) <= per_class:
            raise DataError(f"{key}={per_class} leaves no image of class {c} for training ({len(idx)} images); "
                            f"lower {key}")
        held.append(idx[:per_class])
        rest.append(idx[per_class:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(held))


def shot_groups(train_counts) -> dict[str, list[int]]:
    """Class indices in the Many / Medium / Few groups by training-image count."""
    counts = list(train_counts)
    return {
        "many": [c for c, n in enumerate(counts) if n > MANY_SHOT],
        "medium": [c for c, n in enumerate(counts) if FEW_SHOT <= n <= MANY_SHOT],
        "few": [c for c, n in enumerate(counts) if n < FEW_SHOT],
    }
