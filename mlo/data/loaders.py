"""Resumable loaders over an image set of either kind; ``make_loader`` picks the batching.

- In memory (digits, Fashion-MNIST, CIFAR): images stay uint8 tensors on the device; batches are
  cut, converted and augmented there.
- Files (``ImageFiles``, ImageNet-LT): a torch DataLoader with ``workers`` processes decodes and
  transforms each batch (``mlo.data.files``); it reaches the device as uint8 and is converted there.

Every random choice (order, crops, flips) comes from a generator seeded by (seed, epoch, batch),
so a loader can be stopped anywhere and resumed from ``state_dict()`` with the same batches.

Several processes (torchrun): every process draws the same global batch, order and augmentation,
and keeps its share, images ``rank, rank + world_size, ...`` of each batch. The shares of a batch
are the single-process batch, image for image (a class-balanced batch stays class-balanced when
``world_size`` divides the images per class), and the resume state is the same on every process.

Host syncs: indices and augmentation choices are drawn on the CPU and reach a CUDA device through
pinned memory, asynchronously, so cutting a batch never waits for the device.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
from torch.utils.data import DataLoader

from mlo.data.files import DecodedImages, ImageFiles

ImageSet = torch.Tensor | ImageFiles  # uint8 (N, C, H, W) in memory, or files decoded per batch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of integers (stable across runs and platforms)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> 1)


def stream_seed(seed: int, name: str) -> int:
    """The seed of the random stream called ``name`` in a run seeded ``seed``: streams need no table of numbers."""
    return derive_seed(seed, zlib.crc32(name.encode()))


def seeded_generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*keys))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [-1, 1], the range of the generator's tanh output."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] → uint8 [0, 255], the inverse of ``to_float`` (rounded): generated images
    stored like real ones, so both go through the same evaluation pipeline."""
    return images.add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``; to CUDA through pinned memory without waiting (a plain copy of
    pageable memory would make the host wait for the device)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def augment_params(policy: str, n: int, size: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The random choices of ``augment`` for n images of side ``size``, on the CPU: crop offsets
    (zero padding of size/8) and, for ``crop_flip``, horizontal flips."""
    if policy == "none":
        return {}
    pad = max(1, size // 8)
    params = {"oy": torch.randint(0, 2 * pad + 1, (n,), generator=gen),
              "ox": torch.randint(0, 2 * pad + 1, (n,), generator=gen)}
    if policy == "crop_flip":
        params["flip"] = torch.rand(n, generator=gen) < 0.5
    return params


def augment(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Random crop (and flip) per image, as drawn by ``augment_params``; pure."""
    if not params:
        return x
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (params["oy"][:, None] + torch.arange(h, device=x.device))[:, :, None]        # (n, h, 1)
    cols = (params["ox"][:, None] + torch.arange(w, device=x.device))[:, None, :]        # (n, 1, w)
    out = padded.permute(0, 2, 3, 1)[torch.arange(n, device=x.device)[:, None, None], rows, cols]
    out = out.permute(0, 3, 1, 2)
    if "flip" in params:
        out = torch.where(params["flip"][:, None, None, None], out.flip(3), out)
    return out


class _IndexLoader:
    """Shared iteration, resume state and batch making; subclasses say which indices form a batch."""

    def __init__(self, images: ImageSet, labels, seed: int, augment: str = "none",
                 device: torch.device | str = "cpu", workers: int = 0, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False, with_indices: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of {world_size} processes")
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.share = slice(rank, None, world_size)  # this process's images of every batch
        self.images = DecodedImages(images, augment) if isinstance(images, ImageFiles) else images.to(self.device)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).to(self.device)
        self.seed = seed
        self.augment = augment
        self.workers = workers
        self.with_indices = with_indices  # batches are (x, y, indices into the set) instead of (x, y)
        self.epoch = 0
        self.position = 0
        self._decoder: DataLoader | None = None  # file-backed sets: one DataLoader for every epoch
        self._items = _Items()                   # what it decodes next, set per epoch

    def batch_indices(self, epoch: int) -> list[torch.Tensor]:
        """The global batches of ``epoch`` (every process's share)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.batch_indices(0))

    def __iter__(self):
        batches = self.batch_indices(self.epoch)
        load = self._decode if isinstance(self.images, DecodedImages) else self._cut
        for b, batch in enumerate(load(batches, self.position), start=self.position):
            self.position = b + 1
            yield batch
        self.epoch += 1
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch; Betty's distributed strategy calls it when an epoch ends."""
        self.epoch, self.position = epoch, 0

    def _cut(self, batches: list[torch.Tensor], start: int):
        """``batches[start:]`` from the device-resident tensor, augmented there."""
        size = self.images.shape[-2]
        for b in range(start, len(batches)):
            params = augment_params(self.augment, len(batches[b]), size, seeded_generator(self.seed, self.epoch, b, 1))
            idx = to_device(batches[b][self.share], self.device)
            x = augment(to_float(self.images[idx]), {k: to_device(v[self.share], self.device) for k, v in params.items()})
            yield self._batch(x.contiguous(memory_format=self.memory_format), idx)

    def _decode(self, batches: list[torch.Tensor], start: int):
        """``batches[start:]`` decoded by a DataLoader; each image's transform draws from a seed of
        its own, taken from the batch's generator."""
        items = []
        for b in range(start, len(batches)):
            seeds = torch.randint(0, 2 ** 62, (len(batches[b]),), generator=seeded_generator(self.seed, self.epoch, b, 1))
            items.append(list(zip(batches[b][self.share].tolist(), seeds[self.share].tolist())))
        self._items.batches = items
        if self._decoder is None:  # its worker processes stay up between epochs, not forked for each one
            self._decoder = DataLoader(self.images, batch_sampler=self._items, num_workers=self.workers,
                                       pin_memory=self.device.type == "cuda", persistent_workers=self.workers > 0)
        for b, x in enumerate(self._decoder, start=start):
            x = to_float(x.to(self.device, non_blocking=True)).contiguous(memory_format=self.memory_format)
            yield self._batch(x, to_device(batches[b][self.share], self.device))

    def _batch(self, x: torch.Tensor, idx: torch.Tensor) -> tuple:
        return (x, self.labels[idx], idx) if self.with_indices else (x, self.labels[idx])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class _Items:
    """A DataLoader's batch sampler whose batches change per epoch (a persistent DataLoader keeps its sampler)."""

    def __init__(self):
        self.batches: list[list] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class TensorLoader(_IndexLoader):
    """Shuffled fixed-size batches; the last partial batch is dropped (one batch if N < batch)."""

    def __init__(self, images, labels, batch_size: int, seed: int, augment: str = "none", device="cpu",
                 workers: int = 0, rank: int = 0, world_size: int = 1, channels_last: bool = False):
        super().__init__(images, labels, seed, augment, device, workers, rank, world_size, channels_last)
        self.batch_size = min(batch_size, len(self.labels))  # of the global batch

    def batch_indices(self, epoch: int) -> list[torch.Tensor]:
        perm = torch.randperm(len(self.labels), generator=seeded_generator(self.seed, epoch, 0))
        steps = len(perm) // self.batch_size
        return list(perm[: steps * self.batch_size].view(steps, self.batch_size))


class BalancedLoader(_IndexLoader):
    """Class-balanced batches: ``per_class`` images of every class in each batch."""

    def __init__(self, images, labels, per_class: int, seed: int, device="cpu", workers: int = 0,
                 rank: int = 0, world_size: int = 1, channels_last: bool = False, with_indices: bool = False):
        super().__init__(images, labels, seed, "none", device, workers, rank, world_size, channels_last, with_indices)
        labels = np.asarray(labels)
        self.by_class = [torch.from_numpy(np.flatnonzero(labels == c)) for c in range(int(labels.max()) + 1)]
        self.per_class = max(1, min(per_class, min(len(i) for i in self.by_class)))

    @property
    def batch_size(self) -> int:
        """Images in a global batch."""
        return self.per_class * len(self.by_class)

    def batch_indices(self, epoch: int) -> list[torch.Tensor]:
        steps = min(len(i) for i in self.by_class) // self.per_class
        perms = [idx[torch.randperm(len(idx), generator=seeded_generator(self.seed, epoch, c))]
                 for c, idx in enumerate(self.by_class)]
        k = self.per_class
        return [torch.cat([p[b * k:(b + 1) * k] for p in perms]) for b in range(steps)]


class ClassBalancedLoader(TensorLoader):
    """Class-balanced sampling (Kang et al.'s cRT): each image of a batch is of a class drawn uniformly
    and an image of it drawn uniformly (with replacement); as many batches per epoch as ``TensorLoader``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        labels = self.labels.cpu()
        self.by_class = [torch.nonzero(labels == c).squeeze(1) for c in range(int(labels.max()) + 1)]

    def batch_indices(self, epoch: int) -> list[torch.Tensor]:
        gen = seeded_generator(self.seed, epoch, 0)
        steps = len(self.labels) // self.batch_size
        classes = torch.randint(0, len(self.by_class), (steps * self.batch_size,), generator=gen)
        counts = torch.tensor([len(i) for i in self.by_class])
        picks = (torch.rand(len(classes), generator=gen) * counts[classes]).long()
        offsets = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), counts[:-1]]), 0)
        flat = torch.cat(self.by_class)
        return list(flat[offsets[classes] + picks].view(steps, self.batch_size))


class SequentialLoader(_IndexLoader):
    """Every image once, in order, unaugmented (evaluation); the last batch may be smaller."""

    def __init__(self, images, labels, batch_size: int, device="cpu", workers: int = 0):
        super().__init__(images, labels, 0, "none", device, workers)
        self.batch_size = batch_size

    def batch_indices(self, epoch: int) -> list[torch.Tensor]:
        return list(torch.arange(len(self.labels)).split(self.batch_size))


def make_loader(order: str, images: ImageSet, labels, batch_size: int, *, seed: int = 0, augment: str = "none",
                device="cpu", workers: int = 0, rank: int = 0, world_size: int = 1,
                channels_last: bool = False, with_indices: bool = False) -> _IndexLoader:
    """The loader for an image set of either kind, so that its users never ask which kind it is.

    ``shuffle``: ``batch_size`` images in a new order each epoch, augmented (training);
    ``class_balanced``: as ``shuffle``, each image of a class drawn uniformly (cRT's sampling);
    ``balanced``: ``batch_size // classes`` images of every class per batch (validation batches);
    ``sequential``: every image once, in order (evaluation).
    ``workers`` processes decode file-backed sets; in-memory sets need none. ``rank`` of
    ``world_size`` processes keeps its share of every training or validation batch; with
    ``channels_last``, batches come in channels-last memory. ``with_indices`` (balanced only): batches
    are ``(x, y, indices)``, the indices of the images in the set.
    """
    if order == "shuffle":
        return TensorLoader(images, labels, batch_size, seed, augment, device, workers, rank, world_size, channels_last)
    if order == "class_balanced":
        return ClassBalancedLoader(images, labels, batch_size, seed, augment, device, workers, rank, world_size,
                                   channels_last)
    if order == "balanced":
        per_class = max(1, batch_size // (int(np.max(labels)) + 1))
        return BalancedLoader(images, labels, per_class, seed, device, workers, rank, world_size, channels_last,
                              with_indices)
    if order == "sequential":
        return SequentialLoader(images, labels, batch_size, device, workers)
    raise ValueError(f"unknown loader order '{order}' (shuffle, class_balanced, balanced, sequential)")
