"""Dataset sources, registered by name. Each returns its images, uint8 tensors (N, C, H, W) or
files decoded when loaded (``ImageFiles``: ImageNet-LT, in ``mlo.data.imagenet_lt``), and labels.

No source downloads anything unless ``data.download=true``; missing data gives one line saying
where to put it.
"""
from __future__ import annotations

import gzip
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mlo.data.files import ImageFiles
from mlo.data.longtail import Split, balanced_holdout
from mlo.errors import DataError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_ROOT = Path("~/.cache/needsgen").expanduser()


class ClassesAndShape:
    """``num_classes`` and ``image_shape`` of a dataclass holding ``classes`` and ``train_images``."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])


@dataclass
class ImageData(ClassesAndShape):
    """A source's balanced training pool and its untouched test split; or, where the source fixes
    the long-tailed training set and the validation set itself, the two and their indices (``split``)."""
    train_images: torch.Tensor | ImageFiles  # uint8 (N, C, H, W), or files
    train_labels: np.ndarray                 # int64 (N,)
    test_images: torch.Tensor | ImageFiles
    test_labels: np.ndarray
    classes: list[str]
    split: Split | None = None  # None: the long tail is cut from the pool by build_longtail


SOURCES: dict[str, Callable[..., ImageData]] = {}
BUILT_IN = set()  # sources that read no folder (bundled or generated data)


def register_source(name: str, reads_files: bool = True):
    def wrap(fn):
        SOURCES[name] = fn
        if not reads_files:
            BUILT_IN.add(name)
        return fn
    return wrap


def data_folder(data_cfg) -> Path | None:
    """The folder ``data_cfg.dataset`` is read from (and may be written to), None for built-in data."""
    if data_cfg.dataset in BUILT_IN:
        return None
    return Path(data_cfg.data_root).expanduser() if data_cfg.data_root else DEFAULT_ROOT


def load_source(data_cfg) -> ImageData:
    """Load ``data_cfg.dataset``, check what came back (shape, channels, labels) and bring in-memory
    images to ``data.image_size``."""
    data = SOURCES[data_cfg.dataset](root=data_folder(data_cfg) or DEFAULT_ROOT, cfg=data_cfg)
    check_images(data, data_cfg.dataset)
    size = data_cfg.image_size
    if size and isinstance(data.train_images, torch.Tensor) and data.image_shape[1:] != (size, size):
        data.train_images, data.test_images = resize_images(data.train_images, size), resize_images(data.test_images, size)
    return data


def resize_images(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 images resized (bilinear, antialiased) to ``size`` x ``size``, a chunk at a time."""
    def resize(x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True)
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return torch.cat([resize(x) for x in images.split(chunk)])


def check_images(data: ImageData, name: str) -> None:
    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("test", data.test_images, data.test_labels)):
        if len(images) != len(labels):
            raise DataError(f"{name} {split}: {len(images)} images but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= data.num_classes):
            raise DataError(f"{name} {split}: labels outside 0..{data.num_classes - 1}")
        if isinstance(images, ImageFiles):  # checked line by line when the source read its lists
            continue
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"{name} {split} images must be uint8 of shape (N, C, H, W), got "
                            f"{images.dtype} {tuple(images.shape)}")
        if images.shape[1] not in (1, 3):
            raise DataError(f"{name} {split} images have {images.shape[1]} channels; expected 1 or 3")
        if images.shape[1:] != data.train_images.shape[1:]:
            raise DataError(f"{name} {split} images are {tuple(images.shape[1:])}, train images "
                            f"{tuple(data.train_images.shape[1:])}: all images must have one shape")


@register_source("digits", reads_files=False)
def digits(root: Path, cfg) -> ImageData:
    """scikit-learn's bundled 8x8 digits (1,797 images); a balanced test part is held out."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8))[:, None]
    labels = bunch.target.astype(np.int64)
    rest, test = balanced_holdout(labels, 10, cfg.test_per_class, cfg.split_seed)
    return ImageData(images[rest], labels[rest], images[test], labels[test], [str(d) for d in range(10)])


def _writable_dir(path: Path, what: str) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create {what} folder '{path}' ({exc.strerror}); set data.data_root "
                        f"to a writable folder") from None
    return path


@register_source("fmnist")
def fashion_mnist(root: Path, cfg) -> ImageData:
    """Fashion-MNIST via torchvision, padded from 28x28 to 32x32.

    Looks in ``data_root/FashionMNIST/raw``; offline, falls back to the Debian package
    ``dataset-fashion-mnist`` (decompressed once into that folder).
    """
    from torchvision.datasets import FashionMNIST

    raw = root / "FashionMNIST" / "raw"
    names = [Path(url).stem for url, _ in FashionMNIST.resources]  # files without .gz
    if not all((raw / n).is_file() for n in names) and not cfg.download:
        if all((DEBIAN_FASHION_MNIST / f"{n}.gz").is_file() for n in names):
            _writable_dir(raw, "Fashion-MNIST")
            for n in names:
                with gzip.open(DEBIAN_FASHION_MNIST / f"{n}.gz", "rb") as src, open(raw / f".{n}.tmp", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(raw / f".{n}.tmp", raw / n)
        else:
            raise DataError(f"Fashion-MNIST not found in '{raw}': install the Debian package "
                            f"dataset-fashion-mnist, put the four idx files there, or pass data.download=true")
    try:
        train = FashionMNIST(str(root), train=True, download=cfg.download)
        test = FashionMNIST(str(root), train=False, download=cfg.download)
    except (RuntimeError, OSError) as exc:
        raise DataError(f"Fashion-MNIST could not be read from '{raw}': {exc}") from None

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x[:, None], (2, 2, 2, 2))

    return ImageData(pad(train.data), train.targets.numpy().astype(np.int64),
                     pad(test.data), test.targets.numpy().astype(np.int64), list(train.classes))


def _cifar(root: Path, cfg, hundred: bool) -> ImageData:
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR100 if hundred else CIFAR10
    name = "CIFAR-100" if hundred else "CIFAR-10"

    class Reader(base):
        """torchvision's reader; without checksums when ``data.verify_checksums=false``."""

        def _check_integrity(self) -> bool:
            if cfg.verify_checksums:
                return super()._check_integrity()
            return all((Path(self.root) / self.base_folder / f).is_file()
                       for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            if cfg.verify_checksums:
                return super()._load_meta()
            with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    try:
        train = Reader(str(root), train=True, download=cfg.download)
        test = Reader(str(root), train=False, download=cfg.download)
    except RuntimeError:
        raise DataError(f"{name} not found or corrupted under '{root / base.base_folder}': put the "
                        f"python-version batches there (data.data_root=...) or pass data.download=true") from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as exc:
        raise DataError(f"{name} files under '{root / base.base_folder}' are malformed ({exc}); "
                        f"replace them with the original python-version batches") from None

    def to_tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    return ImageData(to_tensor(train.data), np.asarray(train.targets, dtype=np.int64),
                     to_tensor(test.data), np.asarray(test.targets, dtype=np.int64), list(train.classes))


@register_source("cifar10")
def cifar10(root: Path, cfg) -> ImageData:
    return _cifar(root, cfg, hundred=False)


@register_source("cifar100")
def cifar100(root: Path, cfg) -> ImageData:
    return _cifar(root, cfg, hundred=True)


def _random_images(classes: int, per_class: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, np.ndarray]:
    x = torch.randint(0, 256, (classes * per_class, 3, size, size), dtype=torch.uint8, generator=gen)
    return x, np.repeat(np.arange(classes, dtype=np.int64), per_class)


@register_source("synthetic", reads_files=False)
def synthetic(root: Path, cfg) -> ImageData:
    """Random RGB images in CIFAR-10's shapes (10 classes, 5,000 training and 1,000 test images
    per class, 32x32 or ``data.image_size``), drawn from ``data.split_seed``: for timing runs where
    the real files are absent. There is nothing to learn in them; accuracies are chance."""
    gen = torch.Generator().manual_seed(cfg.split_seed)
    size = cfg.image_size or 32
    return ImageData(*_random_images(10, 5000, size, gen), *_random_images(10, 1000, size, gen),
                     [f"synthetic{c}" for c in range(10)])


@register_source("synthetic_imagenet", reads_files=False)
def synthetic_imagenet(root: Path, cfg) -> ImageData:
    """Random RGB images in ImageNet-LT's shapes for memory and speed checks on a GPU: 1,000 classes at
    128x128 (or ``data.image_size``), 12 training-pool and 2 test images per class (the long tail is cut from
    the pool as for any in-memory source). Accuracies are chance."""
    gen = torch.Generator().manual_seed(cfg.split_seed)
    size = cfg.image_size or 128
    return ImageData(*_random_images(1000, 12, size, gen), *_random_images(1000, 2, size, gen),
                     [f"synthetic{c}" for c in range(1000)])
