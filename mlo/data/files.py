"""Image sets kept as files (ImageNet), decoded when a batch is loaded.

The small sources fit in memory as uint8 tensors; ImageNet does not. Its sets are ``ImageFiles``
(a root and relative paths), and ``DecodedImages`` is the torch Dataset that the loaders in
``mlo.data.loaders`` read through a DataLoader. An item is ``(index, seed)``: the image's random
crop and flip are drawn from its own seed, so a batch does not depend on which worker decoded it.
Files are read with torchvision's PIL loader (grayscale and CMYK JPEGs become RGB; torchvision's
own decoders are deprecated since 0.29) and transformed with ``torchvision.transforms.v2``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np
import torch
from torchvision.datasets.folder import pil_loader
from torchvision.transforms import v2

EVAL_CROP = 0.875  # evaluation resizes to size / 0.875 and crops the centre: ImageNet's 224 of 256


@dataclass(frozen=True)
class ImageFiles:
    """Images ``root/paths[i]``, decoded as RGB and brought to ``size`` x ``size`` when loaded."""
    root: str
    paths: np.ndarray  # relative paths as one numpy string array: worker processes share it without copying
    size: int

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index) -> "ImageFiles":
        """The subset at ``index`` (an index array), like indexing a tensor of images."""
        return replace(self, paths=self.paths[index])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, C, H, W) of the decoded images, as for a uint8 image tensor."""
        return (len(self.paths), 3, self.size, self.size)


def file_transform(size: int, augment: str) -> v2.Transform:
    """PIL image → uint8 tensor (3, size, size). Training (``crop``, ``crop_flip``): RandomResizedCrop,
    and a horizontal flip for ``crop_flip``; ``none`` (evaluation, validation batches): resize and
    centre crop."""
    if augment == "none":
        geometry = [v2.Resize(round(size / EVAL_CROP)), v2.CenterCrop(size)]
    else:
        geometry = [v2.RandomResizedCrop(size)] + ([v2.RandomHorizontalFlip()] if augment == "crop_flip" else [])
    return v2.Compose([*geometry, v2.PILToTensor()])


class DecodedImages(torch.utils.data.Dataset):
    """``dataset[(index, seed)]``: image ``index`` of ``files`` as uint8 (3, size, size), transformed
    under the global torch RNG seeded with ``seed`` (and restored after)."""

    def __init__(self, files: ImageFiles, augment: str):
        self.files = files
        self.transform = file_transform(files.size, augment)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        index, seed = item
        image = pil_loader(os.path.join(self.files.root, str(self.files.paths[index])))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image)
