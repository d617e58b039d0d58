"""A trained run's generator, offline: sample grids per class (``needsgen sample``) and GAN quality
metrics against the real training and test images (``needsgen gan-metrics``).

Both use the generator's moving average (EMA) in eval mode with latents from a seeded CPU
generator, so a seed gives the same images on any device.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from mlo.checkpoint import atomic_write
from mlo.data.loaders import derive_seed, make_loader, to_uint8
from mlo.errors import UserError
from mlo.gan_metrics import (EMBED_BATCH, STANDARD_FID_NOTE, TFInception, classifier_extractor, compare_sets,
                             gan_train_test, standard_fid)
from mlo.models.gan.sampling import generate
from mlo.report import save_sample_grid

GAN_METRICS = "gan_metrics.json"
PRDC_K = 5  # nearest neighbours of precision/recall/density/coverage (Naeem et al.'s default)
CLASSIFIER_FEATURES_NOTE = ("features of W1's encoder, trained on this run's real images: "
                            "only comparable within this project, not with published FIDs")


def ema_generator(run) -> nn.Module:
    return run.levels["gen"].ema.module.eval()


def write_sample_grids(run, per_class: int, out_dir: Path, seed: int, truncation: float | None) -> list[Path]:
    """``samples_class<c>.png`` (a square-ish grid of one class) for every class, and
    ``samples_all.png`` (one row per class); returns the paths written."""
    labels = torch.arange(run.data.num_classes).repeat_interleave(per_class)
    images = generate(ema_generator(run), labels, seed, run.device, truncation)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the output folder '{out_dir}' ({exc.strerror}); give a writable --out") from None
    paths = []
    for c in range(run.data.num_classes):
        paths.append(out_dir / f"samples_class{c}.png")
        save_sample_grid(paths[-1], images[labels == c], nrow=math.ceil(math.sqrt(per_class)))
    paths.append(out_dir / "samples_all.png")
    save_sample_grid(paths[-1], images, nrow=per_class)
    return paths


def reference_sets(run, n: int | None, seed: int) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """The real training and test images, each cut to a seeded random subset of at most ``n``."""
    d = run.data
    sets = {}
    for key, (name, images, labels) in enumerate((("train", d.train_images, d.train_labels),
                                                  ("test", d.test_images, d.test_labels))):
        idx = np.arange(len(labels))
        if n is not None and n < len(idx):
            idx = np.sort(np.random.default_rng(derive_seed(seed, key)).choice(len(idx), n, replace=False))
        sets[name] = (images[torch.from_numpy(idx)], np.asarray(labels)[idx])
    return sets


def measure(run, *, n: int | None, seed: int, truncation: float | None, gan_train_epochs: int,
            tf_inception: TFInception | None = None) -> dict:
    """Every metric of the EMA generator against each real reference set in W1's feature space, and,
    given ``tf_inception``, the standard FID (clean-fid on TF-Inception features) of the same images.

    The generated set of a reference has its size and its classes, image for image, so the class
    mix never counts as a quality difference (the training set is long-tailed, the test set is not).
    """
    run.engine.eval()
    w1 = run.levels["w1"]
    extractors = {"w1_encoder": classifier_extractor(w1.module.encoder, w1, name=CLASSIFIER_FEATURES_NOTE)}
    ema = ema_generator(run)
    result = {
        "generator": "EMA", "global_step": run.engine.global_step, "finished": run.trainer.done,
        "seed": seed, "truncation": truncation, "prdc_k": PRDC_K,
        "features": {name: {"description": e.name} for name, e in extractors.items()},
    }
    if tf_inception is not None:
        result["standard_fid"] = {"description": STANDARD_FID_NOTE, "weights": str(tf_inception.path)}
    generated = {}
    for key, (ref, (images, labels)) in enumerate(reference_sets(run, n, seed).items()):
        fake = to_uint8(generate(ema, torch.from_numpy(labels), derive_seed(seed, key), run.device, truncation))
        generated[ref] = (fake, labels)
        for name, extractor in extractors.items():
            real_emb = extractor.embed(make_loader("sequential", images, labels, EMBED_BATCH, device=run.device))
            fake_emb = extractor.embed(make_loader("sequential", fake, labels, EMBED_BATCH, device=run.device))
            result["features"][name][ref] = compare_sets(real_emb, fake_emb, classes=range(run.data.num_classes),
                                                         k=PRDC_K, seed=seed)
        if tf_inception is not None:
            result["standard_fid"][ref] = {"n": len(labels), "fid": standard_fid(tf_inception, images, fake)}
    if gan_train_epochs:
        d, t = run.data, run.cfg.train
        result["gan_train_test"] = {
            "epochs": gan_train_epochs, "generated_set": "the one made for the test reference",
            **gan_train_test(lambda: run.ctx.classifier("w1", standalone=True),
                             (d.train_images, d.train_labels), (d.test_images, d.test_labels), generated["test"],
                             epochs=gan_train_epochs, batch_size=t.batch_size, lr=t.lr, seed=seed, device=run.device,
                             holdout=None if d.holdout_images is None else (d.holdout_images, d.holdout_labels)),
        }
    return result


def write_gan_metrics(run_dir: Path, result: dict) -> Path:
    path = Path(run_dir) / GAN_METRICS
    atomic_write(path, lambda f: f.write(json.dumps(result, indent=2).encode()))
    return path


def _fmt(value: float | None) -> str:
    """Four significant digits (feature spaces differ in scale), '-' for no value."""
    return "-" if value is None else f"{value:.4g}"


def format_report(result: dict, classes: list[str]) -> str:
    """The metrics as text: one summary table per feature space, then per-class FID."""
    lines = [f"EMA generator at step {result['global_step']}{'' if result['finished'] else ' (unfinished run)'}; "
             f"truncation {result['truncation'] or 'none'}; seed {result['seed']}; k={result['prdc_k']} neighbours"]
    for name, feats in result["features"].items():
        refs = [r for r in ("train", "test") if r in feats]
        lines += ["", f"{name}: {feats['description']}",
                  f"{'reference':<10} {'real':>6} {'FID':>10} {'KID':>20} {'precision':>9} {'recall':>7} "
                  f"{'density':>7} {'coverage':>8} {'IS':>6}"]
        for r in refs:
            m = feats[r]
            kid = f"{m['kid_mean']:.3g} ± {m['kid_std']:.2g}"
            lines.append(f"{r:<10} {m['n_real']:>6} {m['fid']:>10.4g} {kid:>20} {m['precision']:>9.3f} "
                         f"{m['recall']:>7.3f} {m['density']:>7.3f} {m['coverage']:>8.3f} "
                         f"{m['inception_score_mean']:>6.2f}")
        lines += ["", f"per-class FID ({name}; FID grows as a class's image count shrinks, "
                      f"so compare classes on the balanced test reference)",
                  f"{'class':<12}" + "".join(f" {f'FID vs {r}':>14}" for r in refs)]
        for c, label in enumerate(classes):
            lines.append(f"{str(label):<12}" + "".join(f" {_fmt(feats[r]['per_class_fid'][str(c)]):>14}" for r in refs))
    if "standard_fid" in result:
        s = result["standard_fid"]
        lines += ["", f"standard FID: {s['description']}"]
        lines += [f"{r:<10} {s[r]['n']:>6} {s[r]['fid']:>10.4g}" for r in ("train", "test") if r in s]
    if "gan_train_test" in result:
        g = result["gan_train_test"]
        lines += ["", f"GAN-train (trained on generated, tested on real test images): {100 * g['gan_train']:.2f}%"]
        if "gan_train_holdout" in g:
            lines.append(f"GAN-train on {g['holdout_images']} held-out real images (the training pool beyond the "
                         f"long-tail cut; to choose by): {100 * g['gan_train_holdout']:.2f}%")
        lines += [f"GAN-test (trained on real training images, tested on generated): {100 * g['gan_test']:.2f}%",
                  "GAN-train per class (test images): " + ", ".join(
                      f"{classes[int(c)]} {100 * a:.1f}%" for c, a in g["gan_train_per_class"].items())]
    return "\n".join(lines)
