"""Image-folder datasets on tiny trees written here in the original layouts: any ImageFolder tree,
Caltech-101 and Stanford Cars (torchvision's readers), their per-class splits and a short run."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.io
from PIL import Image

from experiments.cli import main
from mlo.config import load_config
from mlo.data import build_longtail
from mlo.errors import ConfigError, DataError


def _image(path, seed: int, size=(20, 14), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


def _data(dataset: str, root, *overrides):
    return build_longtail(load_config(None, [f"data.dataset={dataset}", f"data.data_root={root}", "data.image_size=16",
                                             *overrides]).data)


@pytest.fixture()
def folder(tmp_path):
    """3 classes of 12, 13 and 15 images, PNG and JPEG, colour and greyscale, one in a subfolder."""
    for c, (name, n) in enumerate([("cat", 12), ("dog", 13), ("eel", 15)]):
        for i in range(n):
            ext, mode = (".png", "L") if i % 3 == 0 else (".jpg", "RGB")
            _image(tmp_path / "tree" / name / ("sub" if i == 0 else "") / f"{i}{ext}", 100 * c + i, mode=mode)
    (tmp_path / "tree" / "cat" / "notes.txt").write_text("not an image")
    return tmp_path / "tree"


def test_image_folder_splits_per_class_and_keeps_class_sizes(folder):
    data = _data("image_folder", folder, "data.val_per_class=2", "data.test_per_class=3")
    assert data.classes == ["cat", "dog", "eel"] and data.train_counts == [7, 8, 10]
    assert np.bincount(data.val_labels).tolist() == [2, 2, 2] and np.bincount(data.test_labels).tolist() == [3, 3, 3]
    every = set(data.train_images.paths) | set(data.val_images.paths) | set(data.test_images.paths)
    assert len(every) == 40 and "cat/sub/0.png" in every  # disjoint, nested files found, the .txt skipped
    again = _data("image_folder", folder, "data.val_per_class=2", "data.test_per_class=3")
    assert list(again.test_images.paths) == list(data.test_images.paths)  # seeded
    other = _data("image_folder", folder, "data.val_per_class=2", "data.test_per_class=3", "data.split_seed=1")
    assert list(other.test_images.paths) != list(data.test_images.paths)
    assert data.image_shape == (3, 16, 16)


def test_a_short_run_on_an_image_folder(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "mode=vanilla", "dataset=image_folder", f"data_root={folder}", "image_size=16",
                 "val_per_class=2", "test_per_class=3", "epochs=1", "batch_size=8", "width=4", "progress=false",
                 "head=spinal", "activation=selu", "meta_activation=selu", "name=folder"]) == 0
    assert (tmp_path / "runs" / "folder" / "metrics.json").is_file()


def test_caltech101_in_torchvisions_layout(tmp_path):
    categories = tmp_path / "caltech101" / "101_ObjectCategories"
    for c, name in enumerate(["BACKGROUND_Google", "Faces", "accordion", "airplanes"]):
        for i in range(1, 9):
            _image(categories / name / f"image_{i:04d}.jpg", 10 * c + i)
    data = _data("caltech101", tmp_path, "data.val_per_class=1", "data.test_per_class=2")
    assert data.classes == ["Faces", "accordion", "airplanes"]  # the background is not a class
    assert data.train_counts == [5, 5, 5] and len(data.test_labels) == 6
    assert all(p.startswith("101_ObjectCategories/") for p in data.train_images.paths)


def _cars(tmp_path, per_class: int = 4):
    base = tmp_path / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012"], dtype=object)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    for split, annotation_file in (("train", base / "devkit" / "cars_train_annos.mat"),
                               ("test", base / "cars_test_annos_withlabels.mat")):
        records = np.zeros(2 * per_class, dtype=[("fname", object), ("class", np.uint8)])
        for i in range(2 * per_class):
            records[i] = (f"{i:05d}.jpg", 1 + i % 2)  # the .mat files count classes from 1
            _image(base / f"cars_{split}" / f"{i:05d}.jpg", i + (0 if split == "train" else 50))
        scipy.io.savemat(annotation_file, {"annotations": records})
    return base


def test_stanford_cars_keeps_its_own_test_split(tmp_path):
    _cars(tmp_path)
    data = _data("stanford_cars", tmp_path, "data.val_per_class=1")
    assert data.classes == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    assert data.train_counts == [3, 3] and np.bincount(data.test_labels).tolist() == [4, 4]
    assert all(p.startswith("cars_test/") for p in data.test_images.paths)


@pytest.mark.parametrize("dataset,message", [
    ("image_folder", "does not exist; set data.data_root to a folder with one subfolder"),
    ("caltech101", "Caltech-101 not found under"),
    ("stanford_cars", "Stanford Cars (train) not found under"),
])
def test_missing_data_is_one_clear_line(tmp_path, dataset, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _data(dataset, tmp_path / "nowhere")


def test_listed_but_missing_files_are_named(tmp_path):
    base = _cars(tmp_path)
    (base / "cars_test" / "00003.jpg").unlink()
    with pytest.raises(DataError, match="'cars_test/00003.jpg' is not a file"):
        _data("stanford_cars", tmp_path, "data.val_per_class=1")


@pytest.mark.parametrize("overrides,message", [
    (["data.dataset=caltech101"], "data.image_size: required for caltech101"),
    (["data.dataset=image_folder", "data.image_size=32", "data.imbalance_factor=20"], "does not apply to image_folder"),
])
def test_settings_that_do_not_apply_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def _imagenet(tmp_path, train_per_class: int = 40, val_per_class: int = 3):
    for c, wnid in enumerate(["n01440764", "n01443537"]):
        for i in range(train_per_class):
            _image(tmp_path / "train" / wnid / f"{wnid}_{i}.JPEG", 1000 * c + i, size=(8, 8))
        for i in range(val_per_class):
            _image(tmp_path / "val" / wnid / f"ILSVRC2012_val_{c}{i}.JPEG", 500 + 10 * c + i, size=(8, 8))
    return tmp_path


def test_imagenet_search_split_is_a_seeded_tenth_and_fortieth_of_each_class(tmp_path):
    root = _imagenet(tmp_path)
    data = _data("imagenet_search", root)
    assert data.classes == ["n01440764", "n01443537"]
    assert data.train_counts == [4, 4] and np.bincount(data.val_labels).tolist() == [1, 1]  # 10% and 2.5% of 40
    assert not set(data.train_images.paths) & set(data.val_images.paths)
    assert all(p.startswith("train/") for p in data.train_images.paths) and len(data.test_labels) == 6
    assert all(p.startswith("val/") for p in data.test_images.paths)
    other = _data("imagenet_search", root, "data.split_seed=1")
    assert list(other.train_images.paths) != list(data.train_images.paths)
    with pytest.raises(ConfigError, match="data.val_per_class: does not apply to imagenet_search"):
        _data("imagenet_search", root, "data.val_per_class=5")


def test_imagenet_for_evaluation_trains_on_all_of_train_and_tests_on_val(tmp_path):
    root = _imagenet(tmp_path)
    data = _data("imagenet", root, "data.val_per_class=2", "data.train_on_val=true", "train.mode=vanilla")
    assert data.train_counts == [40, 40] and len(data.test_labels) == 6


def test_imagenet_search_needs_enough_images_a_class(tmp_path):
    with pytest.raises(DataError, match="at least 21 are needed"):
        _data("imagenet_search", _imagenet(tmp_path, train_per_class=10))
