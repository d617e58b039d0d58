"""ImageNet-LT on a tiny ImageNet-style folder written here: split files, their checks, the
file-backed loaders (deterministic, resumable, balanced, in order) and two MLO iterations."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets.folder import pil_loader

from mlo.config import load_config
from mlo.data import build_longtail
from mlo.data.files import file_transform
from mlo.data.loaders import make_loader, to_float
from mlo.errors import ConfigError, DataError
from mlo.trainer import Phase, Trainer
from tests.conftest import build_run
from tests.test_cadence import optimizer_steps

TRAIN_COUNTS = [105, 30, 20, 12, 4]  # Many: class 0; Medium: 1, 2; Few: 3, 4
VAL_PER_CLASS, TEST_PER_CLASS = 3, 4
WNIDS = [f"n0{c:07d}" for c in range(len(TRAIN_COUNTS))]


def _write_jpeg(path: Path, c: int, i: int, gray: bool = False) -> None:
    """A small image of varying size whose colour depends on the class."""
    h, w = 12 + i % 5, 14 + i % 3
    noise = np.random.default_rng([c, i]).integers(-30, 30, (h, w, 3))
    pixels = np.clip(np.array([40 * c, 255 - 40 * c, 120]) + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    (image.convert("L") if gray else image).save(path, "JPEG")


def _write_imagenet_lt(root: Path) -> dict[str, list[str]]:
    """ImageNet's layout (train/<wnid>/, val/<wnid>/) and the three split files in ``root``."""
    lines = {"train": [], "val": [], "test": []}
    for c, wnid in enumerate(WNIDS):
        for folder in ("train", "val"):
            (root / folder / wnid).mkdir(parents=True)
        for i in range(TRAIN_COUNTS[c] + VAL_PER_CLASS):
            rel = f"train/{wnid}/{wnid}_{i}.JPEG"
            _write_jpeg(root / rel, c, i, gray=(i == 0))
            lines["train" if i < TRAIN_COUNTS[c] else "val"].append(f"{rel} {c}")
        for i in range(TEST_PER_CLASS):
            rel = f"val/{wnid}/ILSVRC2012_val_{c:03d}{i:02d}.JPEG"
            _write_jpeg(root / rel, c, 500 + i)
            lines["test"].append(f"{rel} {c}")
    for split, entries in lines.items():
        (root / f"ImageNet_LT_{split}.txt").write_text("\n".join(entries) + "\n")
    return lines


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    _write_imagenet_lt(root)
    return root


def imagenet_config(root: Path, *overrides: str):
    return load_config(None, ["data.dataset=imagenet_lt", f"data.data_root={root}", "data.image_size=16",
                              "run.device=cpu", *overrides])


def test_split_files_give_the_long_tail_and_a_summary(imagenet_root, capsys):
    data = build_longtail(imagenet_config(imagenet_root).data)
    assert data.train_counts == TRAIN_COUNTS
    assert np.bincount(data.train_labels).tolist() == TRAIN_COUNTS
    assert np.bincount(data.val_labels).tolist() == [VAL_PER_CLASS] * 5
    assert np.bincount(data.test_labels).tolist() == [TEST_PER_CLASS] * 5
    assert data.classes == WNIDS and data.image_shape == (3, 16, 16)
    assert all(p.startswith("train/") for p in data.val_images.paths)  # validation comes from ImageNet's train/
    assert all(p.startswith("val/") for p in data.test_images.paths)
    summary = capsys.readouterr().err.strip().splitlines()
    assert summary == ["imagenet_lt: 171 train / 15 val / 20 test images, 5 classes; training classes: 1 Many, "
                       "2 Medium, 2 Few (Many: >100 training images, Medium: 20-100, Few: <20)"]


def _broken(root: Path, tmp_path: Path, split: str, edit) -> Path:
    """A split folder with the standard files of ``root``, ``split``'s lines passed through ``edit``."""
    for s in ("train", "val", "test"):
        shutil.copy(root / f"ImageNet_LT_{s}.txt", tmp_path)
    file = tmp_path / f"ImageNet_LT_{split}.txt"
    file.write_text("\n".join(edit(file.read_text().splitlines())) + "\n")
    return tmp_path


@pytest.mark.parametrize("split,edit,message", [
    ("train", lambda ls: ls[:4] + ["train/n00000000/n00000000_4.JPEG"] + ls[5:],
     "ImageNet_LT_train.txt line 5: expected 'relative/path.JPEG label', got 'train/n00000000/n00000000_4.JPEG'"),
    ("val", lambda ls: ls[:1] + [ls[1].replace(" 0", " zero")] + ls[2:],
     "ImageNet_LT_val.txt line 2: expected 'relative/path.JPEG label'"),
    ("val", lambda ls: ls[:2] + ["train/n00000000/absent.JPEG 0"] + ls[3:],
     "ImageNet_LT_val.txt line 3: 'train/n00000000/absent.JPEG' is not a file under '.*' \\(1 of 15 paths missing\\)"),
    ("test", lambda ls: ls[:6] + [ls[6].rsplit(" ", 1)[0] + " 5"] + ls[7:],
     "ImageNet_LT_test.txt line 7: label 5 is outside 0..4"),
    ("train", lambda ls: [ls[0].rsplit(" ", 1)[0] + " -1"] + ls[1:], "ImageNet_LT_train.txt line 1: label -1 is outside"),
    ("val", lambda ls: [line for line in ls if not line.endswith(" 2")], "ImageNet_LT_val.txt: class 2 has no image"),
])
def test_bad_split_files_name_the_file_and_line(imagenet_root, tmp_path, split, edit, message):
    split_dir = _broken(imagenet_root, tmp_path, split, edit)
    with pytest.raises(DataError, match=message):
        build_longtail(imagenet_config(imagenet_root, f"data.split_dir={split_dir}").data)


def test_missing_root_and_split_files_say_where_to_put_them(imagenet_root, tmp_path):
    with pytest.raises(DataError, match="ImageNet root '.*absent' does not exist; set data.data_root"):
        build_longtail(imagenet_config(tmp_path / "absent").data)
    with pytest.raises(DataError, match="ImageNet_LT_train.txt' not found: .* or set data.split_dir"):
        build_longtail(imagenet_config(imagenet_root, f"data.split_dir={tmp_path}").data)


def test_config_requires_an_image_size_and_refuses_a_long_tail_cut(imagenet_root):
    with pytest.raises(ConfigError, match="data.image_size: required for imagenet_lt"):
        load_config(None, ["data.dataset=imagenet_lt"])
    for override in ("data.imbalance_factor=100", "data.n_max=50", "data.val_per_class=5"):
        with pytest.raises(ConfigError, match=f"{override.split('=')[0]}: does not apply to imagenet_lt"):
            imagenet_config(imagenet_root, override)


def _batches(loader, n: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    it = iter(loader)
    return [next(it) for _ in range(n)] if n is not None else list(it)


def test_training_batches_are_deterministic_and_resume_mid_epoch(imagenet_root):
    data = build_longtail(imagenet_config(imagenet_root).data)
    shuffled = lambda workers=0: make_loader("shuffle", data.train_images, data.train_labels, 32, seed=3,
                                             augment="crop_flip", workers=workers)
    reference = shuffled()
    epochs = _batches(reference) + _batches(reference)  # 171 // 32 = 5 batches per epoch
    assert len(epochs) == 10
    x, y = epochs[0]
    assert x.shape == (32, 3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert not torch.equal(epochs[0][1], epochs[5][1])  # a new order each epoch

    first = shuffled()
    head = _batches(first, 3)
    resumed = shuffled(workers=2)  # worker processes decode the same batches as the main process
    resumed.load_state_dict(first.state_dict())
    tail = _batches(resumed) + _batches(resumed)
    assert len(head) + len(tail) == 10
    for (xa, ya), (xb, yb) in zip(epochs, head + tail):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_decoding_workers_stay_up_from_one_loader_epoch_to_the_next(imagenet_root):
    """A validation loader of ImageNet-LT runs through its epochs every few meta steps: its worker processes
    are started once, not forked again for each epoch; the batches are those of a loader without workers."""
    data = build_longtail(imagenet_config(imagenet_root).data)
    loader = make_loader("balanced", data.val_images, data.val_labels, 20, seed=1, workers=2)
    plain = make_loader("balanced", data.val_images, data.val_labels, 20, seed=1)
    pids = []
    for _ in range(3):
        for (x, y), (x0, y0) in zip(_batches(loader), _batches(plain)):
            assert torch.equal(x, x0) and torch.equal(y, y0)
        pids.append(sorted(w.pid for w in loader._decoder._iterator._workers))
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2]


def test_training_augmentation_is_random_per_image(imagenet_root):
    data = build_longtail(imagenet_config(imagenet_root).data)
    labels = np.zeros(2, dtype=np.int64)
    same = data.train_images[np.array([7, 7])]  # one file twice in a batch: two different crops
    x, _ = _batches(make_loader("shuffle", same, labels, 2, seed=0, augment="crop_flip"), 1)[0]
    assert not torch.equal(x[0], x[1])
    plain, _ = _batches(make_loader("shuffle", same, labels, 2, seed=0, augment="none"), 1)[0]
    assert torch.equal(plain[0], plain[1])


def test_validation_batches_are_class_balanced(imagenet_root):
    data = build_longtail(imagenet_config(imagenet_root).data)
    loader = make_loader("balanced", data.val_images, data.val_labels, 5, seed=0)  # one image per class
    batches = _batches(loader)
    assert len(batches) == VAL_PER_CLASS
    for _, y in batches:
        assert torch.bincount(y, minlength=5).tolist() == [1] * 5
    seen = torch.cat([x for x, _ in batches]).flatten(1)
    assert len({tuple(row.tolist()) for row in seen}) == 15  # every validation image once per epoch


def test_evaluation_batches_are_in_order_resized_and_centre_cropped(imagenet_root):
    data = build_longtail(imagenet_config(imagenet_root).data)
    batches = _batches(make_loader("sequential", data.test_images, data.test_labels, 6))
    assert [len(y) for _, y in batches] == [6, 6, 6, 2]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.as_tensor(data.test_labels))
    first = pil_loader(str(imagenet_root / data.test_images.paths[0]))
    assert torch.equal(batches[0][0][0], to_float(file_transform(16, "none")(first)))


def test_grayscale_files_are_decoded_as_rgb(imagenet_root):
    data = build_longtail(imagenet_config(imagenet_root).data)
    gray = np.flatnonzero(data.train_images.paths == f"train/{WNIDS[0]}/{WNIDS[0]}_0.JPEG")
    x, _ = _batches(make_loader("sequential", data.train_images[gray], data.train_labels[gray], 1))[0]
    assert x.shape == (1, 3, 16, 16) and torch.equal(x[0, 0], x[0, 1])


def test_two_mlo_iterations_on_imagenet_lt(imagenet_root):
    run = build_run("data.dataset=imagenet_lt", f"data.data_root={imagenet_root}", "data.image_size=16",
                    "data.imbalance_factor=10", "data.val_per_class=10",  # the defaults: the files fix the split
                    "data.val_batch_size=5", "data.augment=crop_flip", "train.batch_size=8", "train.meta_every=2")
    assert run.data.image_shape == (3, 16, 16) and run.ctx.steps_per_epoch == 171 // 8
    Trainer(run.engine, [Phase("imagenet_lt", 2)], progress=False).run()
    steps = {name: optimizer_steps(p) for name, p in run.levels.items()}
    assert steps == {"w1": 2, "disc": 2, "w2": 2, "gen": 1, "meta": 1}
    assert run.levels["w1"].train_data_loader[0].state_dict() == {"epoch": 0, "position": 2}
    accuracy = run.accuracy(run.levels["w2"], run.data.test_images, run.data.test_labels)
    assert accuracy.shape == (5,) and ((accuracy >= 0) & (accuracy <= 1)).all()
