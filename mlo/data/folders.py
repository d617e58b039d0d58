"""Image-folder datasets, decoded per batch like ImageNet-LT: any ``ImageFolder`` tree, Caltech-101 and
Stanford Cars (torchvision's readers of their original layouts), and ImageNet (``imagenet``) with the
10% / 2.5% split of an architecture search (``imagenet_search``).

These sets keep their own class sizes (no long-tail cut): the validation images (``data.val_per_class``)
and, where the set has no test split of its own, the test images (``data.test_per_class``) are taken per
class by a seeded shuffle (``data.split_seed``); the rest is the training set. Nothing is downloaded
unless ``data.download=true``; missing files give one line saying where to put them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mlo.data.files import ImageFiles
from mlo.data.longtail import Split, balanced_holdout, class_rng
from mlo.data.sources import ImageData, register_source
from mlo.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def _held_out_split(paths: list[str], labels: np.ndarray, classes: list[str], root: Path, cfg,
                    test: tuple[list[str], np.ndarray] | None = None) -> ImageData:
    """The pool ``paths`` split per class into training and validation images (and test images, when the
    set has no test split of its own)."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=len(classes))
    if counts.min() == 0:
        raise DataError(f"class '{classes[int(counts.argmin())]}' has no image under '{root}'")
    paths = np.array(paths)
    if test is None:
        rest, held = balanced_holdout(labels, len(classes), cfg.test_per_class, cfg.split_seed)
        test = (paths[held], labels[held])
        paths, labels = paths[rest], labels[rest]
    pool, val = balanced_holdout(labels, len(classes), cfg.val_per_class, cfg.split_seed + 1, key="data.val_per_class")
    missing = [p for p in (*paths, *test[0]) if not os.path.isfile(os.path.join(root, p))]
    if missing:
        raise DataError(f"'{missing[0]}' is not a file under '{root}' ({len(missing)} listed images missing)")
    return ImageData(
        train_images=ImageFiles(str(root), paths, cfg.image_size), train_labels=labels,
        test_images=ImageFiles(str(root), np.asarray(test[0]), cfg.image_size), test_labels=np.asarray(test[1]),
        classes=classes,
        split=Split(train=pool, val=val, counts=np.bincount(labels[pool], minlength=len(classes)).tolist()),
    )


def scan_class_folders(root: Path, relative_to: Path | None = None,
                       classes: list[str] | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """``(classes, paths, labels)`` of ``root/<class>/<image>`` (classes: the sorted folder names, or the
    given ones), images at any depth, paths relative to ``relative_to`` (default ``root``)."""
    if not root.is_dir():
        raise DataError(f"image folder '{root}' does not exist; set data.data_root to a folder with one "
                        f"subfolder of images per class")
    if classes is None:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"image folder '{root}' has {len(classes)} class folder(s); it needs one subfolder of "
                        f"images per class, at least two")
    paths, labels = [], []
    for c, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(root / name)):
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.relpath(os.path.join(folder, file), relative_to or root))
                    labels.append(c)
    return classes, paths, np.asarray(labels, dtype=np.int64)


@register_source("image_folder")
def image_folder(root: Path, cfg) -> ImageData:
    """``data_root/<class>/<image>``: one folder per class (sorted names), images at any depth below it."""
    classes, paths, labels = scan_class_folders(root)
    return _held_out_split(paths, labels, classes, root, cfg)


@register_source("imagenet")
def imagenet(root: Path, cfg) -> ImageData:
    """ImageNet as an evaluation trains on it: ``data_root/train/<wnid>/`` less ``data.val_per_class``
    validation images a class (seeded; ``data.train_on_val`` puts them back), ``data_root/val/<wnid>/``
    the test set."""
    classes, paths, labels = scan_class_folders(root / "train", relative_to=root)
    test = scan_class_folders(root / "val", relative_to=root, classes=classes)[1:]
    return _held_out_split(paths, labels, classes, root, cfg, test=test)


SEARCH_TRAIN_FRACTION, SEARCH_VAL_FRACTION = 0.10, 0.025  # PC-DARTS' (and the paper's) ImageNet search split


@register_source("imagenet_search")
def imagenet_search(root: Path, cfg) -> ImageData:
    """ImageNet for an architecture search, split as PC-DARTS and the paper do: per class of
    ``data_root/train/<wnid>/``, a seeded 10% of the images for training and another 2.5% for validation;
    ``data_root/val/<wnid>/`` (ImageNet's validation images, one folder per class) is the test set."""
    classes, paths, labels = scan_class_folders(root / "train", relative_to=root)
    _, test_paths, test_labels = scan_class_folders(root / "val", relative_to=root, classes=classes)
    train, val = [], []
    for c in range(len(classes)):
        idx = np.flatnonzero(labels == c)
        idx = idx[class_rng(cfg.split_seed, c).permutation(len(idx))]
        n_train, n_val = round(SEARCH_TRAIN_FRACTION * len(idx)), round(SEARCH_VAL_FRACTION * len(idx))
        if min(n_train, n_val) == 0:
            raise DataError(f"class '{classes[c]}' has {len(idx)} training images under '{root / 'train'}': too "
                            f"few for 10% training and 2.5% validation images (at least 21 are needed)")
        train.append(idx[:n_train])
        val.append(idx[n_train:n_train + n_val])
    train, val = np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
    return ImageData(
        train_images=ImageFiles(str(root), np.array(paths), cfg.image_size), train_labels=labels,
        test_images=ImageFiles(str(root), np.array(test_paths), cfg.image_size), test_labels=test_labels,
        classes=classes, split=Split(train=train, val=val, counts=np.bincount(labels[train], minlength=len(classes)).tolist()),
    )


@register_source("caltech101")
def caltech101(root: Path, cfg) -> ImageData:
    """Caltech-101 in torchvision's layout, ``data_root/caltech101/101_ObjectCategories/<class>/image_NNNN.jpg``
    (101 classes; the background class is not one)."""
    from torchvision.datasets import Caltech101

    try:
        data = Caltech101(str(root), download=cfg.download)
    except (RuntimeError, ValueError) as exc:  # missing or incomplete (e.g. no BACKGROUND_Google folder)
        raise DataError(f"Caltech-101 not found under '{root / 'caltech101'}' ({exc}); put 101_ObjectCategories "
                        f"there (data.data_root=...) or pass data.download=true") from None
    paths = [os.path.join("101_ObjectCategories", data.categories[y], f"image_{i:04d}.jpg")
             for i, y in zip(data.index, data.y)]
    return _held_out_split(paths, np.asarray(data.y), list(data.categories), Path(data.root), cfg)


@register_source("stanford_cars")
def stanford_cars(root: Path, cfg) -> ImageData:
    """Stanford Cars in torchvision's layout under ``data_root/stanford_cars`` (cars_train/, cars_test/,
    devkit/*.mat, cars_test_annos_withlabels.mat); its own test split is the test set."""
    from torchvision.datasets import StanfordCars

    sets = {}
    for split in ("train", "test"):
        try:
            sets[split] = StanfordCars(str(root), split=split, download=cfg.download)
        except (RuntimeError, FileNotFoundError) as exc:
            raise DataError(f"Stanford Cars ({split}) not found under '{root / 'stanford_cars'}' ({exc}); put "
                            f"cars_train/, cars_test/, devkit/ and cars_test_annos_withlabels.mat there "
                            f"(data.data_root=...)") from None
    base = root / "stanford_cars"

    def listed(split):
        samples = sets[split]._samples  # torchvision's (path, label) list of the split's annotations
        return [os.path.relpath(p, base) for p, _ in samples], np.asarray([y for _, y in samples], dtype=np.int64)

    paths, labels = listed("train")
    return _held_out_split(paths, labels, list(sets["train"].classes), base, cfg, test=listed("test"))
