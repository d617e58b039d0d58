"""ImageNet-LT (Liu et al., 2019): an ImageNet root and the standard split files.

``ImageNet_LT_train.txt``, ``ImageNet_LT_val.txt`` and ``ImageNet_LT_test.txt`` hold one
``relative/path.JPEG label`` per line, paths relative to the ImageNet root (the standard files:
115,846 / 20,000 / 50,000 lines, 1,000 classes; train and val images under ``train/``, test images
under ``val/``). The files fix the long tail and the balanced validation set (20 per class), so
nothing is cut here. Every line is checked at load; errors name the file and the line.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlo.data.files import ImageFiles
from mlo.data.longtail import SHOT_RULE, Split, shot_groups
from mlo.data.sources import ImageData, register_source
from mlo.errors import DataError

SPLITS = ("train", "val", "test")


def split_file_name(split: str) -> str:
    return f"ImageNet_LT_{split}.txt"


@dataclass
class SplitList:
    """One split file: image paths and labels, with the line each came from."""
    file: Path
    paths: list[str]
    labels: np.ndarray
    lines: list[int]

    def where(self, i: int) -> str:
        return f"{self.file.name} line {self.lines[i]}"


def read_split_file(file: Path) -> SplitList:
    if not file.is_file():
        raise DataError(f"ImageNet-LT split file '{file}' not found: put {', '.join(map(split_file_name, SPLITS))} "
                        f"there or set data.split_dir to their folder")
    paths, labels, lines = [], [], []
    with file.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:  # blank lines, e.g. at the end
                continue
            try:
                path, label = fields
                label = int(label)
            except ValueError:  # not two fields, or a label that is not an integer
                raise DataError(f"{file.name} line {number}: expected 'relative/path.JPEG label', "
                                f"got {line.strip()[:80]!r}") from None
            paths.append(path)
            labels.append(label)
            lines.append(number)
    if not paths:
        raise DataError(f"ImageNet-LT split file '{file}' lists no image")
    return SplitList(file, paths, np.asarray(labels, dtype=np.int64), lines)


def check_split(split: SplitList, root: Path, num_classes: int) -> None:
    """Labels in 0..num_classes-1, every class present, every path an existing file under ``root``."""
    outside = np.flatnonzero((split.labels < 0) | (split.labels >= num_classes))
    if len(outside):
        i = outside[0]
        raise DataError(f"{split.where(i)}: label {split.labels[i]} is outside 0..{num_classes - 1} "
                        f"(the classes of {split_file_name('train')})")
    empty = np.flatnonzero(np.bincount(split.labels, minlength=num_classes) == 0)
    if len(empty):
        raise DataError(f"{split.file.name}: class {empty[0]} has no image ({len(empty)} empty classes); "
                        f"every class 0..{num_classes - 1} needs images in every split file")
    missing = [i for i, p in enumerate(split.paths) if not os.path.isfile(os.path.join(root, p))]
    if missing:
        i = missing[0]
        raise DataError(f"{split.where(i)}: '{split.paths[i]}' is not a file under '{root}' ({len(missing)} of "
                        f"{len(split.paths)} paths missing); set data.data_root to the ImageNet root")


@register_source("imagenet_lt")
def imagenet_lt(root: Path, cfg) -> ImageData:
    """The pool is train + val (``split`` gives their indices); the test split is ``_test.txt``."""
    if not root.is_dir():
        raise DataError(f"ImageNet root '{root}' does not exist; set data.data_root to the folder holding "
                        f"ImageNet's train/ and val/")
    split_dir = Path(cfg.split_dir).expanduser() if cfg.split_dir else root
    train, val, test = (read_split_file(split_dir / split_file_name(s)) for s in SPLITS)
    num_classes = int(train.labels.max()) + 1
    for split in (train, val, test):
        check_split(split, root, num_classes)
    counts = np.bincount(train.labels, minlength=num_classes).tolist()
    first = {}
    for path, label in zip(train.paths, train.labels.tolist()):
        first.setdefault(label, path)
    classes = [Path(first[c]).parent.name for c in range(num_classes)]  # the WordNet id folders
    groups = shot_groups(counts)
    print(f"imagenet_lt: {len(train.paths)} train / {len(val.paths)} val / {len(test.paths)} test images, "
          f"{num_classes} classes; training classes: {len(groups['many'])} Many, {len(groups['medium'])} Medium, "
          f"{len(groups['few'])} Few ({SHOT_RULE})", file=sys.stderr)
    n_train, n_val = len(train.paths), len(val.paths)
    return ImageData(
        train_images=ImageFiles(str(root), np.array(train.paths + val.paths), cfg.image_size),
        train_labels=np.concatenate([train.labels, val.labels]),
        test_images=ImageFiles(str(root), np.array(test.paths), cfg.image_size),
        test_labels=test.labels, classes=classes,
        split=Split(train=np.arange(n_train), val=np.arange(n_train, n_train + n_val), counts=counts),
    )
