"""Phases by name: how a mode's levels are trained over time (``Mode.phases`` lists them).

Every classifier phase lasts ``train.epochs`` epochs; the GAN phases of the baselines give the GAN
the updates it gets in end2end (the pre-training steps, then one discriminator step per iteration
and one generator step every ``meta_every``).
"""
from __future__ import annotations

import torch

from mlo.budget import discount_by_quality, per_class_val_loss, sample_classes, success_rate, uniform_noise
from mlo.errors import DataError
from mlo.data.loaders import make_loader, to_uint8
from mlo.gan_metrics import per_class_accuracy, train_classifier
from mlo.metrics import predict
from mlo.models.gan.sampling import generate, truncate
from mlo.trainer import Phase

GENERATION_CHUNK = 500
QUALITY_EPOCHS = 10  # train.alloc_discount's GAN-train classifier: the epochs of the README's GAN-train
FILTER_DRAWS = 10  # train.gen_filter: draws per generated image before a class W1 never recognises is left short


def build_phases(run) -> list[Phase]:
    ctx, cfg, mode = run.ctx, run.cfg, run.mode
    total, epoch = ctx.total_steps, ctx.steps_per_epoch
    pretrain = cfg.gan.gan_pretrain_steps
    # a re-trained head (cRT) steps in its own phase, after the others
    training_leaves = [p.name for p in run.engine.leaves if p.name != "crt"] if "crt" in mode.levels else None
    make = {
        "gan_pretrain": lambda: Phase("GAN pre-training", pretrain, leaves=["disc"], unroll={"disc": 1},
                                      on_end=lambda: drop_lent_gradients(run)) if pretrain else None,
        "gan": lambda: Phase("GAN", total, leaves=["disc"], on_end=lambda: drop_lent_gradients(run)),
        "joint": lambda: Phase(mode.name, total, leaves=training_leaves, epoch_length=epoch),
        "w1": lambda: Phase("W1", total, leaves=["w1"], epoch_length=epoch),
        "crt": lambda: Phase("cRT", cfg.train.crt_epochs * epoch, leaves=["crt"], epoch_length=epoch),
        "w2_pregenerated": lambda: Phase("W2", total, leaves=["w2"], epoch_length=epoch, setup=lambda: pregenerate(run)),
        "w2_spare_pool": lambda: Phase("W2", total, leaves=["w2"], epoch_length=epoch,
                                       setup=lambda: pregenerate(run, spare_pool=True)),
        "mlo_frozen_gan": lambda: Phase("W1, W2, A (GAN frozen)", total, leaves=["w1"], epoch_length=epoch),
    }
    return [phase for phase in (make[name]() for name in mode.phases) if phase is not None]


def drop_lent_gradients(run) -> None:
    """After a GAN phase (pre-training, or the baselines' GAN phase): a tied encoder's owner (W1) did not step, so
    the gradients H lent it over the phase would all land in its first step; the phase leaves the shared encoder as
    it was (and a run that reads the phase's GAN from run.gan_cache ends as one that trained it)."""
    for level in run.levels.values():
        level.lent.clear()


def renamed_stream(state: dict, old: str, new: str) -> dict:
    """A classifier's state with its A-block statistics moved from stream ``old`` to ``new``."""
    return {key.replace(f"norms.{old}.", f"norms.{new}."): value for key, value in state.items()}


@torch.no_grad()
def pregenerate(run, spare_pool: bool = False) -> None:
    """Sequential mode: p(s) frozen from W1's loss on the whole validation set, the budget M of
    images drawn once from the generator's moving average (with ``train.gen_filter=w1_agrees``, those W1 reads as
    their class; with ``spare_pool``: real images of the pool that no split uses, as a perfect generator would
    give), installed as W2's generated set (and, with
    ``train.w2_init=w1``, W2 started from W1's weights). Deterministic, so a run resumed inside W2's phase
    rebuilds the same set."""
    ctx, data, device = run.ctx, run.data, run.device
    w1, w2 = run.levels["w1"], run.levels["w2"]
    if run.cfg.train.w2_init == "w1" and w2.count == 0:  # fine-tuning starts from W1 (not again on resume)
        w2.module.load_state_dict(renamed_stream(w1.module.state_dict(), "w1", "w2"))
    run.engine.eval()
    logits, labels = predict(w1, make_loader("sequential", data.val_images, data.val_labels, GENERATION_CHUNK, device=device))
    stats = per_class_val_loss(logits.to(device), labels.to(device), data.num_classes)
    stats.train_counts = torch.as_tensor(data.train_counts, dtype=torch.float, device=device)
    p = ctx.allocator(stats)
    ema, tau = (None, None) if spare_pool else (run.levels["gen"].ema.module.eval(), run.cfg.gan.truncation)
    quality, acceptance = None, None
    if run.cfg.train.alloc_discount == "gan_train":
        right, total = generator_quality(run, ema, tau)
        p, quality = discount_by_quality(p, right, total), success_rate(right, total)
    count = ctx.allocator.images_per_epoch(data.train_counts, stats)
    noise = torch.Generator(device=device).manual_seed(ctx.seed("sequential generation"))
    classes = sample_classes(p, uniform_noise((count, data.num_classes), noise, device))
    if spare_pool:
        images = spare_pool_images(data, classes.cpu(), ctx.seed("sequential spare pool"))
    else:
        def latents(n):
            z = torch.randn(n, ema.z_dim, generator=noise, device=device)
            return z if tau is None else truncate(z, tau)

        def draw(labels):
            return to_uint8(torch.cat([ema(latents(len(c)), c) for c in labels.split(GENERATION_CHUNK)]))

        images = draw(classes)
        if run.cfg.train.gen_filter == "w1_agrees":
            images, classes, acceptance = keep_what_w1_recognises(w1, images, classes, draw, data.num_classes)
    w2.set_generated(images, classes, seed=ctx.seed("sequential generated order"))
    run.pregenerated = {"generated": torch.bincount(classes, minlength=data.num_classes).float(), "allocation": p}
    if quality is not None:
        run.pregenerated["quality"] = quality
    if acceptance is not None:
        run.pregenerated["acceptance"] = acceptance
    run.engine.train()


def keep_what_w1_recognises(w1, images: torch.Tensor, classes: torch.Tensor, draw, num_classes: int):
    """``train.gen_filter=w1_agrees``: the generated images W1 classifies as the class each was drawn for. A
    rejected image is drawn again (``draw``: new latents, the same classes) up to ``FILTER_DRAWS`` times in all,
    then left out. Also, per class, the share of first draws W1 accepted (its GAN-test on this set). A set W1
    rejects whole is refused: W2 would have nothing to learn from it."""
    def agrees(x, y):
        return torch.from_numpy(per_class_accuracy(w1, x, y.cpu().numpy(), y.device)[1]).to(y.device)

    accepted = agrees(images, classes)
    acceptance = (torch.bincount(classes[accepted], minlength=num_classes).float()
                  / torch.bincount(classes, minlength=num_classes).float().clamp(min=1))
    for _ in range(FILTER_DRAWS - 1):
        rejected = (~accepted).nonzero().squeeze(1)
        if len(rejected) == 0:
            break
        images[rejected] = draw(classes[rejected])
        accepted[rejected] = agrees(images[rejected], classes[rejected])
    if not accepted.any():
        raise DataError(f"train.gen_filter=w1_agrees: W1 read none of the {len(classes)} generated images as its class "
                        f"in {FILTER_DRAWS} draws each, so W2 would learn from no generated image; drop the filter")
    return images[accepted], classes[accepted], acceptance


def generator_quality(run, generator, tau: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``train.alloc_discount=gan_train``: how well ``generator`` draws each class, as the right answers and the
    images per class on the validation set of a classifier of W1's architecture trained on its images alone
    (GAN-train, QUALITY_EPOCHS epochs, as many images as the training set, every class equally, latents at
    ``tau``). Its own seeds, so the generated set and W2 are drawn as without the discount."""
    data, t, device = run.data, run.cfg.train, run.device
    labels = torch.arange(len(data.train_labels)) % data.num_classes
    images = to_uint8(generate(generator, labels, run.ctx.seed("allocation quality images"), device, tau))
    with torch.enable_grad():
        classifier = train_classifier(lambda: run.ctx.classifier("w1", standalone=True), images, labels.numpy(),
                                      epochs=QUALITY_EPOCHS, batch_size=t.batch_size, lr=t.lr,
                                      seed=run.ctx.seed("allocation quality classifier"), device=device)
    _, right = per_class_accuracy(classifier, data.val_images, data.val_labels, device)
    val_labels = torch.as_tensor(data.val_labels)
    return (torch.bincount(val_labels[torch.from_numpy(right)], minlength=data.num_classes).float().to(device),
            torch.bincount(val_labels, minlength=data.num_classes).float().to(device))


def spare_pool_images(data, classes: torch.Tensor, seed: int) -> torch.Tensor:
    """For each entry of ``classes``, a different real image of that class from the pool no split uses (drawn
    in a seeded order); a class whose pool has too few is refused, naming it."""
    if data.spare_images is None:
        raise DataError("train.mode=sequential_real needs the pool images the long-tail cut leaves unused, and "
                        "this dataset has none (its splits are given); use a dataset cut by data.imbalance_factor")
    labels = torch.as_tensor(data.spare_labels)
    picks = torch.empty(len(classes), dtype=torch.long)
    order = torch.Generator().manual_seed(seed)
    for c in range(data.num_classes):
        where, pool = (classes == c).nonzero().squeeze(1), (labels == c).nonzero().squeeze(1)
        if len(where) > len(pool):
            raise DataError(f"train.mode=sequential_real: class {data.classes[c]} gets {len(where)} images and its "
                            f"unused pool has {len(pool)}; lower data.n_max or train.gen_per_real")
        picks[where] = pool[torch.randperm(len(pool), generator=order)[:len(where)]]
    return data.spare_images[picks]
