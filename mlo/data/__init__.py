"""Long-tailed data for a run: the source, the balanced validation split, the cut, the test split.

Images are uint8 tensors in memory or ``ImageFiles`` (ImageNet-LT); ``mlo.data.loaders.make_loader``
batches either kind.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlo.data import folders as _folders, imagenet_lt as _imagenet_lt  # noqa: F401  (register their sources)
from mlo.data.loaders import ImageSet
from mlo.data.longtail import SHOT_RULE, longtail_counts, longtail_split, shot_groups
from mlo.data.sources import SOURCES, ClassesAndShape, ImageData, load_source, register_source

__all__ = ["LongTailData", "build_longtail", "longtail_counts", "longtail_split", "shot_groups",
           "SHOT_RULE", "SOURCES", "ImageData", "register_source"]


@dataclass
class LongTailData(ClassesAndShape):
    train_images: ImageSet
    train_labels: np.ndarray
    val_images: ImageSet
    val_labels: np.ndarray
    test_images: ImageSet
    test_labels: np.ndarray
    classes: list[str]
    train_counts: list[int]
    holdout_images: ImageSet | None = None  # pool images the long-tail cut left out (up to 300 a class): for
    holdout_labels: np.ndarray | None = None  # choices that must not look at the test set; None where none are left
    spare_images: ImageSet | None = None  # the rest of the pool, which no split uses: a perfect generator's images
    spare_labels: np.ndarray | None = None


def build_longtail(data_cfg, spare: bool = False) -> LongTailData:
    """The run's data; with ``spare``, also the pool's images that no split uses (kept only when asked for: on
    CIFAR they are most of the training set)."""
    source = load_source(data_cfg)
    split = source.split if source.split is not None else longtail_split(
        source.train_labels, source.num_classes, data_cfg.imbalance_factor, data_cfg.val_per_class,
        data_cfg.split_seed, data_cfg.n_max)
    train, counts = split.train, split.counts
    if data_cfg.train_on_val:  # a final evaluation: the validation images join the training set
        train = np.concatenate([split.train, split.val])
        counts = np.bincount(source.train_labels[train], minlength=source.num_classes).tolist()
    return LongTailData(
        train_images=source.train_images[train], train_labels=source.train_labels[train],
        val_images=source.train_images[split.val], val_labels=source.train_labels[split.val],
        test_images=source.test_images, test_labels=source.test_labels,
        classes=source.classes, train_counts=counts,
        **({"holdout_images": source.train_images[split.holdout], "holdout_labels": source.train_labels[split.holdout]}
           if len(split.holdout) else {}),
        **({"spare_images": source.train_images[split.spare], "spare_labels": source.train_labels[split.spare]}
           if spare and len(split.spare) else {}),
    )
