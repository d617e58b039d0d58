"""Bad input of every kind: exit code 2, one line naming the field and the fix, no traceback, and
no run directory left behind that could pass for a finished run."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.cli import main
from mlo.data.sources import SOURCES, ImageData, register_source


def run_cli(args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err.strip()


def assert_refused(code, err, message):
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("needsgen: error: "), err
    assert "Traceback" not in err
    assert message in err, err


@pytest.fixture()
def files(tmp_path):
    """Paths the cases refer to: an empty folder, a plain file, bad YAML files, damaged datasets."""
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "FILE").write_text("")
    (tmp_path / "BADYAML.yaml").write_text("train:\n  epochs: [1,\n")
    (tmp_path / "BADSECTION.yaml").write_text("trian:\n  epochs: 3\n")
    cifar = tmp_path / "CIFAR" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(cifar / name, "wb") as f:  # rows of 1000 values instead of 3x32x32
            pickle.dump({"data": np.zeros((10, 1000), np.uint8), "labels": list(range(10))}, f)
    with open(cifar / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    raw = tmp_path / "FMNIST" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n, side in (("train", 100, 28), ("t10k", 20, 20)):  # test images of another size
        header = (0x0803).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (n, side, side))
        (raw / f"{split}-images-idx3-ubyte").write_bytes(header + bytes(n * side * side))
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(
            (0x0801).to_bytes(4, "big") + n.to_bytes(4, "big") + bytes(np.arange(n, dtype=np.uint8) % 10))
    return tmp_path


@pytest.fixture()
def user_sources():
    """Sources a user might register, with images the pipeline cannot use."""
    def make(shape):
        def source(root, cfg):
            labels = np.arange(200) % 4
            images = torch.zeros((200, *shape), dtype=torch.uint8)
            return ImageData(images, labels, images[:40], labels[:40], list("abcd"))
        return source

    register_source("two_channel")(make((2, 8, 8)))
    register_source("odd_size")(make((1, 28, 28)))
    yield
    del SOURCES["two_channel"], SOURCES["odd_size"]


CASES = [
    # config keys, types and ranges
    (["run", "epoch=3"], "unknown config key 'epoch' (did you mean 'epochs'?)"),
    (["run", "trian.epochs=3"], "unknown config key 'trian.epochs'"),
    (["run", "epochs=three"], "train.epochs: expected an integer, got 'three'"),
    (["run", "batch_size=2.5"], "train.batch_size: expected an integer"),
    (["run", "download=maybe"], "data.download: expected true or false"),
    (["run", "imbalance_factor=0.5"], "data.imbalance_factor: must be >= 1.0"),
    (["run", "val_per_class=0"], "data.val_per_class: must be >= 1"),
    (["run", "ema_decay=1.5"], "gan.ema_decay: must be <= 1.0"),
    (["run", "meta_every=0"], "train.meta_every: must be >= 1"),
    (["run", "gen_per_real=-1"], "train.gen_per_real: must be >= 0.0"),
    (["run", "optimizer=lion"], "train.optimizer: must be one of adam, sgd"),
    (["run", "meta_activation=swish"], "model.meta_activation: must be one of relu, selu, gelu, silu, tanh"),
    (["run", "gan_betas=[0.5]"], "gan.gan_betas: expected two numbers"),
    (["run", "lr_milestones=[40]"], "train.lr_milestones: expected increasing epochs in 1..30"),
    (["run", "name=a/b"], "run.name: must be a plain folder name"),
    (["run", "device=tpu"], "run.device: expected auto, cpu, cuda or cuda:N"),
    # names from registries
    (["run", "dataset=svhn"], "data.dataset: unknown value 'svhn'"),
    (["run", "encoder=resnet33"], "did you mean 'resnet32'?"),
    (["run", "generator=stylegan"], "gan.generator: unknown value 'stylegan'"),
    (["run", "allocator=greedy"], "train.allocator: unknown value 'greedy'"),
    (["run", "mode=fancy"], "train.mode: unknown mode 'fancy'"),
    (["run", "diffaugment=translation,rotate"], "gan.diffaugment: unknown value 'rotate'"),
    # combinations that make no sense
    (["run", "mode=vanilla", "allocator=reciprocal"], "train.allocator=reciprocal has no effect in train.mode=vanilla"),
    (["run", "meta=none", "gamma=0.5"], "train.gamma weighs W1's loss in A's objective"),
    (["run", "mode=vanilla", "tie_encoders=true"], "model.tie_encoders shares W1's encoder"),
    (["run", "temperature_start=0.1", "temperature_end=1"], "train.temperature_end=1 is above train.temperature_start"),
    (["run", "precision=fp16", "device=cpu"], "train.precision=fp16 needs a CUDA device"),
    (["run", "precision=fp16", "tie_encoders=true"], "train.precision=fp16: a tied encoder's step adds gradients"),
    (["run", "compile=aot_eager", "hypergradient=exact"], "run.compile=aot_eager: train.hypergradient=exact "
                                                          "differentiates the levels' steps twice"),
    # config files
    (["run", "BADYAML.yaml"], "is not valid YAML at line 3"),
    (["run", "BADSECTION.yaml"], "unknown config section 'trian' (did you mean 'train'?)"),
    (["run", "absent.yaml"], "is neither a file nor a shipped config"),
    # data: missing, corrupt, wrong shapes, splits that cannot be made
    (["run", "dataset=cifar10", "data_root=EMPTY"], "CIFAR-10 not found or corrupted"),
    (["run", "dataset=cifar10", "data_root=CIFAR", "verify_checksums=false"], "CIFAR-10 files under"),
    (["run", "dataset=fmnist", "data_root=FMNIST"], "fmnist test images are (1, 24, 24), train images (1, 32, 32)"),
    (["run", "dataset=two_channel"], "two_channel train images have 2 channels; expected 1 or 3"),
    (["run", "dataset=odd_size"], "gan.generator: no BigGAN architecture for 28x28 images"),
    (["run", "imbalance_factor=1000"], "has no training image after the long-tail cut"),
    (["run", "val_per_class=500"], "data.val_per_class=500 leaves no training image"),
    (["run", "n_max=10000"], "data.n_max=10000 exceeds the smallest class pool"),
    (["run", "test_per_class=400"], "data.test_per_class=400 leaves no image"),
    # outputs and run directories
    (["run", "out_dir=FILE/sub"], "cannot write the run directory"),
    (["run", "--resume", "EMPTY"], "is not a run directory"),
    (["eval", "EMPTY"], "is not a run directory with a checkpoint"),
]


@pytest.mark.parametrize("args,message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input(args, message, files, user_sources, tmp_path, monkeypatch, capsys):
    args = [a.replace("EMPTY", str(files / "EMPTY")).replace("FILE", str(files / "FILE"))
             .replace("=CIFAR", f"={files / 'CIFAR'}").replace("=FMNIST", f"={files / 'FMNIST'}")
            for a in args]
    code, err = run_cli(args, tmp_path, monkeypatch, capsys)
    assert_refused(code, err, message)
    assert not (tmp_path / "runs").exists()


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_on_a_cpu_machine(tmp_path, monkeypatch, capsys):
    code, err = run_cli(["run", "device=cuda:0"], tmp_path, monkeypatch, capsys)
    assert_refused(code, err, "run.device=cuda:0 but no CUDA device is available")


@pytest.mark.parametrize("processes,size,message", [
    (2, "batch_size=63", "train.batch_size: batches of 63 images cannot be split evenly between 2 processes"),
    (3, "batch_size=66", "data.val_batch_size: batches of 100 images cannot be split evenly between 3 processes")])
def test_batches_that_torchrun_processes_cannot_share_evenly(processes, size, message, tmp_path, monkeypatch, capsys):
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(processes)}.items():
        monkeypatch.setenv(key, value)  # what torchrun sets; refused before any process group is joined
    code, err = run_cli(["run", size], tmp_path, monkeypatch, capsys)
    assert_refused(code, err, message)


def test_an_existing_named_run_is_never_overwritten(tmp_path, monkeypatch, capsys):
    existing = tmp_path / "runs" / "mine"
    existing.mkdir(parents=True)
    (existing / "metrics.json").write_text("{}")
    code, err = run_cli(["run", "name=mine"], tmp_path, monkeypatch, capsys)
    assert_refused(code, err, "already exists; resume it with --resume")
    assert [p.name for p in existing.iterdir()] == ["metrics.json"] and (existing / "metrics.json").read_text() == "{}"


def test_a_protocol_report_of_a_folder_that_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere"
    result = subprocess.run([sys.executable, "-m", "experiments.bench.fmnist_lt", "--report-only", "--parts", "if100",
                             f"run.out_dir={missing}"], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    err = result.stderr.strip()
    assert result.returncode == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("fmnist_lt: error: run.out_dir="), err
    assert "no such folder" in err and not missing.exists()
