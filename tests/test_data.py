"""Long-tail counts, the validation split, dataset sources (on files written here) and loaders."""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from mlo.config import load_config
from mlo.data import build_longtail, longtail_counts, longtail_split, shot_groups
from mlo.data.loaders import BalancedLoader, TensorLoader, make_loader, to_float
from mlo.data.sources import DEBIAN_FASHION_MNIST
from mlo.errors import DataError


@pytest.mark.parametrize("n_max,classes,factor,total", [
    (5000, 10, 100, 12406), (500, 100, 100, 10847), (5000, 10, 200, 11203), (500, 100, 200, 9502)])
def test_cifar_lt_counts_match_the_convention(n_max, classes, factor, total):
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(classes), n_max))  # CIFAR's labels
    split = longtail_split(labels, classes, factor, val_per_class=0, seed=0)
    assert len(split.train) == sum(longtail_counts(n_max, classes, factor)) == total
    assert split.counts[0] == n_max and split.counts[-1] == int(n_max / factor)
    assert np.bincount(labels[split.train], minlength=classes).tolist() == split.counts


def test_split_is_balanced_disjoint_and_long_tailed():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(5), 60))
    split = longtail_split(labels, 5, imbalance_factor=10, val_per_class=7, seed=3)
    assert np.bincount(labels[split.val], minlength=5).tolist() == [7] * 5
    assert not set(split.train) & set(split.val)
    assert np.bincount(labels[split.train], minlength=5).tolist() == split.counts == longtail_counts(53, 5, 10)
    again = longtail_split(labels, 5, imbalance_factor=10, val_per_class=7, seed=3)
    assert np.array_equal(split.train, again.train) and np.array_equal(split.val, again.val)
    other = longtail_split(labels, 5, imbalance_factor=10, val_per_class=7, seed=4)
    assert not np.array_equal(split.val, other.val)


def test_the_held_out_images_are_the_pool_left_by_the_cut_at_most_300_a_class():
    labels = np.repeat(np.arange(3), 400)
    split = longtail_split(labels, 3, imbalance_factor=4, val_per_class=10, seed=1, n_max=200)
    assert not set(split.holdout) & (set(split.train) | set(split.val))
    per_class = np.bincount(labels[split.holdout], minlength=3)
    assert per_class.tolist() == [min(300, 390 - n) for n in split.counts]  # 390 in each pool after validation


def test_split_errors_name_the_field():
    labels = np.repeat(np.arange(3), 10)
    with pytest.raises(DataError, match="data.val_per_class"):
        longtail_split(labels, 3, 2, val_per_class=10, seed=0)
    with pytest.raises(DataError, match="data.n_max"):
        longtail_split(labels, 3, 2, val_per_class=2, seed=0, n_max=9)
    with pytest.raises(DataError, match="data.imbalance_factor"):
        longtail_split(labels, 3, 100, val_per_class=2, seed=0)


def test_digits_longtail_has_disjoint_balanced_val_and_test():
    data = build_longtail(load_config(None, ["data.imbalance_factor=10"]).data)
    assert data.image_shape == (1, 8, 8) and data.num_classes == 10
    assert np.bincount(data.val_labels).tolist() == [10] * 10
    assert np.bincount(data.test_labels).tolist() == [50] * 10
    assert np.bincount(data.train_labels).tolist() == data.train_counts
    assert data.train_counts[0] / data.train_counts[-1] == pytest.approx(10, rel=0.1)
    # no image of val or test is a training image (sklearn's digits has no duplicates across these)
    as_set = lambda x: {bytes(r) for r in x.reshape(len(x), -1).numpy()}
    assert not as_set(data.train_images) & as_set(data.val_images)
    assert not as_set(data.train_images) & as_set(data.test_images)


def test_shot_groups_follow_the_rule():
    assert shot_groups([500, 101, 100, 20, 19, 1]) == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}


def _write_cifar(root: Path, hundred: bool, per_class: int = 6) -> None:
    """Tiny CIFAR files in the original python-pickle format."""
    classes = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    key = "fine_labels" if hundred else "labels"

    def batch(n_per_class):
        labels = np.repeat(np.arange(classes), n_per_class).tolist()
        return {"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), key: labels}

    names = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        with open(folder / name, "wb") as f:
            pickle.dump(batch(per_class if "test" not in name else 2), f)
    meta_name, meta_key = ("meta", "fine_label_names") if hundred else ("batches.meta", "label_names")
    with open(folder / meta_name, "wb") as f:
        pickle.dump({meta_key: [f"c{i}" for i in range(classes)]}, f)


@pytest.mark.parametrize("dataset,hundred", [("cifar10", False), ("cifar100", True)])
def test_cifar_source_reads_the_original_format(tmp_path, dataset, hundred):
    _write_cifar(tmp_path, hundred)
    cfg = load_config(None, [f"data.dataset={dataset}", f"data.data_root={tmp_path}", "data.verify_checksums=false",
                             "data.val_per_class=2", "data.imbalance_factor=2", "train.batch_size=4"])
    data = build_longtail(cfg.data)
    classes = 100 if hundred else 10
    assert data.image_shape == (3, 32, 32) and data.num_classes == classes
    assert len(data.test_labels) == 2 * classes
    pool = (6 * 5 if not hundred else 6) - 2
    assert data.train_counts == longtail_counts(pool, classes, 2)


def test_cifar_checksums_are_verified_by_default(tmp_path):
    _write_cifar(tmp_path, False)
    cfg = load_config(None, ["data.dataset=cifar10", f"data.data_root={tmp_path}"])
    with pytest.raises(DataError, match="not found or corrupted"):
        build_longtail(cfg.data)


def test_missing_cifar_says_where_to_put_it(tmp_path):
    cfg = load_config(None, ["data.dataset=cifar100", f"data.data_root={tmp_path}"])
    with pytest.raises(DataError, match="data.download=true"):
        build_longtail(cfg.data)


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = {1: 0x0801, 3: 0x0803}[array.ndim]
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_fmnist_source_reads_idx_files_and_pads_to_32(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("t10k", 40)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    cfg = load_config(None, ["data.dataset=fmnist", f"data.data_root={tmp_path}", "data.val_per_class=2",
                             "data.imbalance_factor=3"])
    data = build_longtail(cfg.data)
    assert data.image_shape == (1, 32, 32)
    assert data.train_images[:, :, :2].sum() == 0 and data.train_images[:, :, 30:].sum() == 0
    assert data.train_counts == longtail_counts(18, 10, 3)


@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist is not installed (CI installs it)")
def test_fmnist_falls_back_to_the_debian_package(tmp_path):
    cfg = load_config(None, ["data.dataset=fmnist", f"data.data_root={tmp_path}", "data.imbalance_factor=100"])
    data = build_longtail(cfg.data)
    assert len(data.test_labels) == 10_000
    assert data.train_counts[0] == 6000 - 10 and data.train_counts[-1] == int(5990 / 100)
    with gzip.open(DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz") as f:
        assert np.array_equal(np.frombuffer(f.read()[8:], np.uint8), data.test_labels)


def test_missing_fmnist_offline_is_a_clear_error(tmp_path, monkeypatch):
    import mlo.data.sources as sources
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    cfg = load_config(None, ["data.dataset=fmnist", f"data.data_root={tmp_path}"])
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        build_longtail(cfg.data)


def test_tensor_loader_resumes_with_the_same_batches():
    images = torch.arange(50 * 4, dtype=torch.uint8).view(50, 1, 2, 2)
    labels = np.arange(50) % 5
    full = TensorLoader(images, labels, batch_size=8, seed=1, augment="crop_flip")
    reference = [x for _ in range(2) for x, _ in full]  # two epochs
    resumed = TensorLoader(images, labels, batch_size=8, seed=1, augment="crop_flip")
    it = iter(resumed)
    first = [next(it)[0] for _ in range(3)]
    state = resumed.state_dict()
    fresh = TensorLoader(images, labels, batch_size=8, seed=1, augment="crop_flip")
    fresh.load_state_dict(state)
    rest = [x for x, _ in fresh] + [x for x, _ in fresh]
    assert len(reference) == 12 and len(first) + len(rest) == 12
    for a, b in zip(reference, first + rest):
        assert torch.equal(a, b)


def test_tensor_loader_epochs_differ_and_cover_the_data():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1)
    loader = TensorLoader(images, np.zeros(40, int), batch_size=10, seed=0)
    epoch1 = torch.cat([x.flatten() for x, _ in loader])
    epoch2 = torch.cat([x.flatten() for x, _ in loader])
    assert sorted(epoch1.tolist()) == sorted(epoch2.tolist()) and len(set(epoch1.tolist())) == 40
    assert not torch.equal(epoch1, epoch2)


def test_augmentation_keeps_shape_and_range():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    x, _ = next(iter(TensorLoader(images, np.zeros(16, int), batch_size=16, seed=0, augment="crop_flip")))
    assert x.shape == (16, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    plain, _ = next(iter(TensorLoader(images, np.zeros(16, int), batch_size=16, seed=0, augment="none")))
    assert not torch.equal(x, plain)


def test_balanced_loader_gives_every_class_equally():
    labels = np.repeat(np.arange(4), 6)
    loader = BalancedLoader(torch.zeros(24, 1, 2, 2, dtype=torch.uint8), labels, per_class=3, seed=0)
    batches = [y for _, y in loader]
    assert len(batches) == 2
    for y in batches:
        assert torch.bincount(y, minlength=4).tolist() == [3] * 4


def test_sequential_batches_cover_an_in_memory_set_in_order():
    images = torch.arange(23 * 4, dtype=torch.uint8).view(23, 1, 2, 2)
    batches = list(make_loader("sequential", images, np.arange(23) % 3, 10))
    assert [len(y) for _, y in batches] == [10, 10, 3]
    assert torch.equal(torch.cat([x for x, _ in batches]), to_float(images))
    assert torch.cat([y for _, y in batches]).tolist() == (np.arange(23) % 3).tolist()


def test_balanced_batch_size_is_split_between_the_classes():
    loader = make_loader("balanced", torch.zeros(24, 1, 2, 2, dtype=torch.uint8), np.repeat(np.arange(4), 6), 8)
    assert isinstance(loader, BalancedLoader) and loader.per_class == 2 and len(loader) == 3


def test_synthetic_source_has_cifar10_lt_shapes():
    cfg = load_config(None, ["data.dataset=synthetic", "data.imbalance_factor=100", "data.image_size=8"]).data
    data = build_longtail(cfg)
    assert data.image_shape == (3, 8, 8) and data.train_images.dtype == torch.uint8 and data.num_classes == 10
    assert data.train_counts == longtail_counts(4990, 10, 100) and len(data.test_labels) == 10000
    assert np.bincount(data.val_labels).tolist() == [10] * 10
    again = build_longtail(cfg)
    assert torch.equal(data.train_images, again.train_images)


def test_image_size_resizes_in_memory_sources_once():
    native = build_longtail(load_config(None, []).data)
    resized = build_longtail(load_config(None, ["data.image_size=16"]).data)
    assert resized.image_shape == (1, 16, 16) and resized.train_images.dtype == torch.uint8
    assert resized.train_counts == native.train_counts
    mean = lambda x: x.float().mean(dim=(1, 2, 3))  # bilinear upsampling keeps each image's brightness
    assert torch.allclose(mean(resized.test_images), mean(native.test_images), atol=4)


def test_the_data_folder_a_run_reads_is_named_and_built_in_data_has_none(tmp_path):
    from mlo.data.sources import DEFAULT_ROOT, data_folder

    assert data_folder(load_config(None, ["data.dataset=fmnist", f"data.data_root={tmp_path}"]).data) == tmp_path
    assert data_folder(load_config(None, ["data.dataset=cifar10"]).data) == DEFAULT_ROOT
    assert data_folder(load_config(None, ["data.dataset=digits", f"data.data_root={tmp_path}"]).data) is None
