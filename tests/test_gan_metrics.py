"""GAN metrics against closed forms and brute force: FID, KID, inception score, precision/recall/
density/coverage, per-class FID, the Inception-v3 feature path, GAN-train / GAN-test."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn

from mlo.data.loaders import to_float, to_uint8
from mlo.errors import UserError
from mlo.gan_metrics import (EMBED_BATCH, TFInception, fid_from_features, frechet_distance, gan_train_test,
                             inception_score, kid_from_features, per_class_fid, precision_recall_density_coverage,
                             standard_fid)
from mlo.models.gan.sampling import generate, truncate
from tests.smooth_models import TanhGenerator


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(sigma)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T


def reference_fid(mu1, sigma1, mu2, sigma2) -> float:
    """The symmetric form ``Tr((Σ1^½ Σ2 Σ1^½)^½)`` of the trace term, through eigendecompositions only."""
    root = psd_sqrt(sigma1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * np.trace(psd_sqrt(root @ sigma2 @ root)))


def random_spd(rng, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


# ----- FID ---------------------------------------------------------------------------------------
def test_fid_of_isotropic_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    d, s1, s2 = 6, 0.5, 2.0
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + d * (s1 - s2) ** 2
    assert frechet_distance(mu1, s1 ** 2 * np.eye(d), mu2, s2 ** 2 * np.eye(d)) == pytest.approx(expected, rel=1e-9)


def test_fid_of_general_covariances_matches_the_symmetric_form():
    rng = np.random.default_rng(1)
    d = 7
    mu1, mu2, sigma1, sigma2 = rng.normal(size=d), rng.normal(size=d), random_spd(rng, d), random_spd(rng, d)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(reference_fid(mu1, sigma1, mu2, sigma2), rel=1e-8)


def test_fid_of_a_defective_singular_product_adds_an_offset():
    # Σ1 = v vᵀ with v = (0, 1, −2): Σ1 Σ2 has no finite square root (sqrtm returns inf), and the
    # trace term is sqrt(vᵀ Σ2 v) = 5, so FID = Tr Σ1 + Tr Σ2 − 10 = 5 + 12 − 10 = 7.
    v = np.array([[0.0], [1.0], [-2.0]])
    sigma2 = np.array([[5.0, -5.0, 3.0], [-5.0, 5.0, -3.0], [3.0, -3.0, 2.0]])
    mu = np.zeros(3)
    assert frechet_distance(mu, v @ v.T, mu, sigma2) == pytest.approx(7.0, abs=1e-2)


def test_fid_from_large_samples_approaches_the_closed_form():
    rng = np.random.default_rng(2)
    d, n, s1, s2 = 4, 40_000, 1.0, 1.5
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    a = mu1 + s1 * rng.normal(size=(n, d))
    b = mu2 + s2 * rng.normal(size=(n, d))
    expected = np.sum((mu1 - mu2) ** 2) + d * (s1 - s2) ** 2   # 1.0 + 1.0
    assert fid_from_features(a, b) == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("n,d", [(500, 8), (6, 20)])  # the second has a singular covariance
def test_fid_of_a_set_with_itself_is_zero(n, d):
    feats = np.random.default_rng(3).normal(size=(n, d))
    assert abs(fid_from_features(feats, feats)) < 1e-5
    assert abs(fid_from_features(torch.from_numpy(feats), feats)) < 1e-5  # tensors are accepted


def test_fid_needs_two_images():
    with pytest.raises(UserError, match="at least 2"):
        fid_from_features(np.zeros((1, 3)), np.zeros((5, 3)))


# ----- KID ---------------------------------------------------------------------------------------
def brute_force_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3
    m = len(x)
    pairs = [(i, j) for i, j in itertools.product(range(m), repeat=2) if i != j]
    xx = sum(k(x[i], x[j]) for i, j in pairs) / len(pairs)
    yy = sum(k(y[i], y[j]) for i, j in pairs) / len(pairs)
    xy = sum(k(x[i], y[j]) for i, j in itertools.product(range(m), repeat=2)) / m ** 2
    return xx + yy - 2 * xy


def test_kid_on_whole_sets_is_the_unbiased_mmd2():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(12, 3)), rng.normal(0.3, 1.2, size=(12, 3))
    mean, std = kid_from_features(x, y, subsets=3, subset_size=100)
    assert mean == pytest.approx(brute_force_mmd2(x, y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)  # every subset is the whole set


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(600, 8)), rng.normal(size=(600, 8))
    same, same_std = kid_from_features(a, b, subsets=20, subset_size=300, seed=0)
    shifted, _ = kid_from_features(a, b + 0.5, subsets=20, subset_size=300, seed=0)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 10 * (abs(same) + same_std)
    assert kid_from_features(a, b, subsets=5, subset_size=100, seed=7) == kid_from_features(a, b, 5, 100, seed=7)


# ----- inception score ---------------------------------------------------------------------------
def test_inception_score_of_uniform_and_one_hot_probabilities():
    k, n = 10, 200
    assert inception_score(np.full((n, k), 1 / k), splits=4) == pytest.approx((1.0, 0.0))
    one_hot = np.eye(k)[np.arange(n) % k]   # confident, every class equally often in each split
    mean, std = inception_score(one_hot, splits=4)
    assert mean == pytest.approx(k) and std == pytest.approx(0.0, abs=1e-9)
    collapsed = np.eye(k)[np.zeros(n, dtype=int)]  # confident but one class only
    assert inception_score(collapsed, splits=4)[0] == pytest.approx(1.0)


# ----- precision, recall, density, coverage ------------------------------------------------------
def test_prdc_of_identical_sets():
    feats = np.random.default_rng(6).normal(size=(300, 5))
    m = precision_recall_density_coverage(feats, feats, k=5, chunk=64)
    assert m == pytest.approx({"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0})


def test_prdc_of_far_apart_sets():
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(200, 5)), rng.normal(size=(150, 5)) + 1000
    assert precision_recall_density_coverage(real, fake, k=5) == {"precision": 0.0, "recall": 0.0,
                                                                "density": 0.0, "coverage": 0.0}


def test_prdc_of_a_generator_that_drops_a_mode():
    # real: two far-apart clusters; generated: fresh samples of the first only → realistic (high
    # precision) but covering half of the real data (recall and coverage about 1/2)
    rng = np.random.default_rng(8)
    real = np.concatenate([rng.normal(size=(300, 2)), rng.normal(size=(300, 2)) + 100])
    fake = rng.normal(size=(300, 2))
    m = precision_recall_density_coverage(real, fake, k=5, chunk=128)
    assert m["precision"] > 0.9 and 0.8 < m["density"] < 1.3
    assert 0.4 < m["recall"] <= 0.5 and 0.4 < m["coverage"] <= 0.5


def test_prdc_needs_more_images_than_k():
    with pytest.raises(UserError, match="k=5 need more than 5 images"):
        precision_recall_density_coverage(np.zeros((5, 2)), np.zeros((10, 2)), k=5)


# ----- per class ---------------------------------------------------------------------------------
def test_per_class_fid():
    rng = np.random.default_rng(9)
    real = rng.normal(size=(60, 4))
    real_labels = np.repeat([0, 1, 2], 20)
    fake = real.copy()
    fake[20:40] += 3.0                          # class 1 generated off by 3 in every feature
    fake_labels = real_labels.copy()
    fake_labels[40:] = 3                        # class 2 never generated; class 3 never real
    fids = per_class_fid(real, real_labels, fake, fake_labels)
    assert set(fids) == {0, 1, 2, 3}
    assert abs(fids[0]) < 1e-6
    assert fids[1] == pytest.approx(4 * 3.0 ** 2, rel=1e-6)
    assert fids[2] is None and fids[3] is None
    assert per_class_fid(real, real_labels, fake, fake_labels, classes=range(5))[4] is None  # absent from both


# ----- feature extractors ------------------------------------------------------------------------
def _write_pngs(folder, images):
    from PIL import Image
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img[0].numpy(), mode="L").save(folder / f"{i:03d}.png")


def test_standard_fid_is_clean_fids_own_number_on_the_same_images(tmp_path):
    """Our in-memory path (uint8 tensors, grayscale as RGB, clean-fid's resizer) against clean-fid's
    own computation from image files, with the TF-Inception weights of the installed wheel."""
    from cleanfid.fid import compute_fid

    gen = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(8, 1, 4, 4, generator=gen), size=16, mode="bilinear")
    real = (smooth * 255).to(torch.uint8)
    fake = (smooth * 200 + 40 * torch.rand(8, 1, 16, 16, generator=gen)).to(torch.uint8)
    _write_pngs(tmp_path / "real", real)
    _write_pngs(tmp_path / "fake", fake)
    extractor = TFInception(None, "cpu")
    ours = standard_fid(extractor, real, fake)
    theirs = compute_fid(str(tmp_path / "real"), str(tmp_path / "fake"), mode="clean", custom_feat_extractor=extractor,
                         num_workers=0, batch_size=EMBED_BATCH, device=torch.device("cpu"), verbose=False)
    assert ours > 1 and abs(ours - theirs) < 1e-3


def test_tf_inception_weights_that_are_missing_or_not_inception(tmp_path):
    with pytest.raises(UserError, match="not found.*nothing is downloaded"):
        TFInception(tmp_path / "missing.pt", "cpu")
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(UserError, match="is not a TorchScript TF-Inception"):
        TFInception(other, "cpu")


# ----- sampling and GAN-train / GAN-test ---------------------------------------------------------
def test_uint8_round_trip():
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(to_uint8(to_float(values)), values)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


def test_truncation_and_seeded_generation():
    z = torch.tensor([-3.0, -0.5, 0.25, 2.5])
    assert truncate(z, 1.0).tolist() == [-1.0, -0.5, 0.25, 1.0]
    generator = TanhGenerator((1, 4, 4), num_classes=3, z_dim=4, hidden=8)
    labels = torch.tensor([0, 1, 1, 2, 0])
    images = generate(generator, labels, seed=3, device="cpu", batch_size=2)
    assert images.shape == (5, 1, 4, 4)
    assert torch.allclose(images, generate(generator, labels, seed=3, device="cpu"), atol=1e-6)  # same latents
    assert not torch.equal(images, generate(generator, labels, seed=4, device="cpu"))
    assert not torch.equal(images, generate(generator, labels, seed=3, device="cpu", truncation=0.5))


def striped_images(labels: np.ndarray, rng) -> torch.Tensor:
    """8x8 grayscale images whose bright row band is the class: trivially learnable."""
    images = rng.integers(0, 60, size=(len(labels), 1, 8, 8))
    for i, c in enumerate(labels):
        images[i, 0, 2 * c: 2 * c + 2] = 255
    return torch.from_numpy(images.astype(np.uint8))


def test_gan_train_and_gan_test():
    rng = np.random.default_rng(10)
    labels = np.repeat(np.arange(3), 16)
    real_train, real_test = (striped_images(labels, rng), labels), (striped_images(labels, rng), labels)
    make = lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    train = dict(epochs=3, batch_size=8, lr=0.05, seed=0, device="cpu")
    faithful = (striped_images(labels, rng), labels)                 # a perfect generator
    swapped = (striped_images((labels + 1) % 3, rng), labels)       # every image shows the wrong class
    good = gan_train_test(make, real_train, real_test, faithful, **train)
    bad = gan_train_test(make, real_train, real_test, swapped, **train)
    for result in (good, bad):
        assert all(0.0 <= result[k] <= 1.0 for k in ("gan_train", "gan_test"))
        assert set(result["gan_train_per_class"]) == {"0", "1", "2"}
        assert np.isclose(np.mean(list(result["gan_train_per_class"].values())), result["gan_train"])  # 16 a class
    assert good["gan_train"] > 0.9 and good["gan_test"] > 0.9
    assert bad["gan_train"] < 0.1 and bad["gan_test"] < 0.1
    assert gan_train_test(make, real_train, real_test, faithful, **train) == good  # seeded
    # held-out real images (not the test set) score the same classifier: a selection that leaves the test alone
    held = gan_train_test(make, real_train, real_test, faithful, **train,
                          holdout=(striped_images(labels[:24], rng), labels[:24]))
    assert held["holdout_images"] == 24 and held["gan_train_holdout"] > 0.9
    assert set(held["gan_train_holdout_per_class"]) == {"0", "1"}  # labels[:24]: classes 0 and 1
