"""Typed run configuration: dataclass sections, YAML files, ``key=value`` overrides, validation.

A config has five sections (data, model, gan, train, run). Every leaf name is unique across
sections, so an override may be written ``train.epochs=3`` or just ``epochs=3``. Values are parsed
as YAML scalars, type-checked against the field annotations and range-checked against the field
metadata; every error names the field and says how to fix it.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlo.errors import ConfigError
from mlo.plugins import load_plugins


def setting(default, help: str, **checks):
    """A config field: default, one-line help, and checks (min, max, choices). A level's own settings (a
    dataclass of these, ``register_level(..., settings=...)``) are made the same way."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **checks})
    return field(default=default, metadata={"help": help, **checks})


FILE_SOURCES = ("imagenet_lt", "imagenet", "imagenet_search", "image_folder", "caltech101", "stanford_cars")  # decoded per batch, at data.image_size


@dataclass
class DataConfig:
    dataset: str = setting("digits", "data source: digits, fmnist, cifar10, cifar100, imagenet_lt, imagenet (train/ "
                                     "and val/ as test), imagenet_search (an architecture search's 10% / 2.5% split "
                                     "of ImageNet's train/), image_folder (a folder per class under data_root), "
                                     "caltech101, stanford_cars, or synthetic (random images in CIFAR-10's shapes, "
                                     "for timing without the files; nothing to learn)")
    data_root: str | None = setting(None, "folder holding the data (default: ~/.cache/needsgen); "
                                          "for imagenet_lt, imagenet and imagenet_search the ImageNet root, with "
                                          "train/ and val/")
    split_dir: str | None = setting(None, "imagenet_lt: folder holding ImageNet_LT_train/val/test.txt (default: "
                                          "data_root)")
    download: bool = setting(False, "download the dataset if it is missing (needs a network)")
    verify_checksums: bool = setting(True, "check the md5 sums of torchvision's dataset files")
    image_size: int | None = setting(None, "side of the images the networks see; in-memory sources are resized once "
                                           "at load. null: the source's own (required for imagenet_lt, e.g. 64 or 128)",
                                     min=1)
    imbalance_factor: float = setting(10.0, "n_max / n_min of the long-tailed training set "
                                            "(not for imagenet_lt: its split files fix the long tail)", min=1.0)
    n_max: int | None = setting(None, "images of the largest class (default: the smallest class pool; "
                                      "not for imagenet_lt)", min=1)
    val_per_class: int = setting(10, "balanced validation images per class, taken before the long-tail cut "
                                     "(not for imagenet_lt: ImageNet_LT_val.txt is its validation set)", min=1)
    test_per_class: int = setting(50, "digits, image_folder, caltech101 (sets without a test split of their own): "
                                      "balanced test images per class held out", min=1)
    train_on_val: bool = setting(False, "train on the training and the validation images together (a final "
                                        "evaluation, e.g. of a searched architecture; vanilla mode only)")
    split_seed: int = setting(0, "seed of the long-tail shuffle and the validation split (unused by imagenet_lt)", min=0)
    augment: str = setting("none", "training augmentation: pad-and-crop (and flip) on the device for in-memory "
                                   "sources, RandomResizedCrop (and flip) for imagenet_lt",
                           choices=("none", "crop", "crop_flip"))
    val_batch_size: int = setting(100, "class-balanced validation batch for the meta level and p(s)", min=1)
    num_workers: int = setting(0, "processes decoding images per loader of a file-backed source (imagenet_lt); "
                                  "0: in the main process", min=0)


@dataclass
class ModelConfig:
    encoder: str = setting("small_cnn", "classifier encoder: a registered name (small_cnn, resnet32) or "
                                        "timm:<name> for any timm model (timm:resnet50, timm:vit_base_patch16_224)")
    width: int = setting(32, "base width of the encoder (the small encoders only)", min=1)
    meta: str = setting("head", "shared meta-parameters A, learned on D_val: head (the paper's: the last two layers, "
                                "Linear-activation-Linear(d, C), making the logits of W1 and W2), neck (ablation: a "
                                "Linear-BN-activation-Linear block before heads each network trains on D_tr), or none "
                                "(no meta level: each network owns an A-shaped head), or arch (A is the architecture "
                                "of a PC-DARTS supernet, model.encoder=pc_darts: alpha and beta of its cells, shared "
                                "by W1, W2 and H, each with a supernet of its own)", choices=("head", "neck", "arch", "none"))
    meta_activation: str = setting("relu", "activation inside A (and inside the heads networks own): relu (the "
                                           "paper's), selu (the mistake-driven scheme's), or a smooth one (gelu, "
                                           "silu, tanh), whose finite-difference hypergradients cross no kink",
                                   choices=("relu", "selu", "gelu", "silu", "tanh"))
    head: str = setting("linear", "the classification head: linear (with model.meta=head, A is "
                                  "Linear-activation-Linear) or spinal (the Progressive SpinalNet head; with "
                                  "model.meta=head, A is that whole head)",
                        choices=("linear", "spinal"))
    spinal_width: int = setting(32, "head=spinal: units of each spinal layer", min=1)
    spinal_depth: int = setting(4, "head=spinal: spinal layers, each reading one half of the features and the layer "
                                   "before", min=1)
    activation: str = setting("relu", "activation of the encoders that allow a choice (small_cnn, resnet32, timm "
                                      "models that take act_layer)", choices=("relu", "selu", "gelu"))
    tie_encoders: bool | None = setting(None, "W1, W2 and H share one encoder (parameter tying); "
                                              "null: on for timm backbones, off for the small encoders")
    pretrained_path: str | None = setting(None, "local weights file for the encoder (a state_dict saved with "
                                                "torch.save); nothing is downloaded")

    @property
    def encoders_tied(self) -> bool:
        """``tie_encoders`` with null resolved: large (timm) backbones are shared, small ones are not."""
        return self.encoder.startswith("timm:") if self.tie_encoders is None else self.tie_encoders


@dataclass
class ArchConfig:
    cells: int = setting(5, "cells of the PC-DARTS supernet (model.encoder=pc_darts) or of the network built from a "
                            "genotype (model.encoder=darts); reduction cells at 1/3 and 2/3 of them", min=1)
    nodes: int = setting(4, "pc_darts: intermediate nodes per cell (a genotype brings its own)", min=1)
    partial: int = setting(4, "pc_darts: K, 1/K of the channels go through each edge's operations", min=1)
    stem: str = setting("cifar", "pc_darts and darts: cifar (one 3x3 conv at full resolution) or imagenet (three "
                                 "stride-2 convs: the first cell reads 1/4 and 1/8 of the resolution)",
                        choices=("cifar", "imagenet"))
    genotype: str | None = setting(None, "model.encoder=darts: the genotype.json a search wrote "
                                         "(RUN_DIR/genotype.json), or a published cell by name (pc_darts_cifar10)")
    drop_path: float = setting(0.0, "darts: probability of dropping each operation's path in training (constant; "
                                    "DARTS' evaluation uses 0.2 on CIFAR)", min=0.0, max=0.9)
    auxiliary_weight: float = setting(0.0, "darts: weight of the loss of an auxiliary head at 2/3 of the depth (DARTS: "
                                           "0.4); 0: no auxiliary head", min=0.0)


@dataclass
class GANConfig:
    generator: str = setting("biggan", "class-conditional GAN, by registered name: biggan (hinge loss), vcgan (label "
                                       "concatenated to z and D's input, JS loss), acgan (auxiliary classifier), "
                                       "wacgan_gp (AC-GAN with Wasserstein loss and gradient penalty), "
                                       "light_per_class (one small GAN per class)")
    gan_ch: int = setting(32, "GAN channel multiplier (BigGAN's ch)", min=1)
    z_dim: int = setting(32, "latent size, split into one chunk per generator block (hierarchical z)", min=1)
    shared_dim: int = setting(32, "size of the shared class embedding of the generator", min=1)
    g_lr: float = setting(2e-4, "generator learning rate (Adam)", min=0.0)
    d_lr: float = setting(2e-4, "discriminator learning rate (Adam)", min=0.0)
    gan_betas: list[float] = setting([0.0, 0.999], "Adam betas of generator and discriminator")
    ema_decay: float = setting(0.999, "decay of the generator's exponential moving average", min=0.0, max=1.0)
    diffaugment: str = setting("translation,cutout", "DiffAugment policy for D's inputs ('none' for off)")
    real_batches: str = setting("natural", "how D's real images are drawn: natural (the long-tailed training set as "
                                           "it is) or class_balanced (each class equally often, so the rare classes' "
                                           "few images shape D, and through it G, as much as the common ones)",
                                choices=("natural", "class_balanced"))
    gan_pretrain_steps: int = setting(200, "discriminator/generator steps before the MLO starts", min=0)
    gp_weight: float = setting(10.0, "wacgan_gp: weight lambda_gp of the gradient penalty", min=0.0)
    truncation: float | None = setting(None, "latent truncation tau of the images W2 trains on, "
                                             "z_tau = sign(z) * min(|z|, tau); null: none", min=1e-3)
    learn_truncation: bool = setting(False, "learn tau (starting at gan.truncation) as an extra level, trunc, that "
                                            "minimises W2's cross-entropy on generated images")
    truncation_lr: float = setting(0.01, "learning rate of the learned truncation (Adam on softplus^-1(tau))", min=0.0)
    topk_min_fraction: float = setting(1.0, "top-k generator updates: only this fraction of the fakes D scores highest "
                                            "counts in G's loss, annealed down from 1 (1: off)", min=0.0, max=1.0)
    topk_decay: float = setting(0.99, "top-k: factor on the fraction per generator step, down to topk_min_fraction",
                                min=0.0, max=1.0)
    coreset_factor: int = setting(1, "core-set batches: D's real batch is chosen by greedy k-center from this many "
                                     "times as many candidates (1: off)", min=1)
    lecam_weight: float = setting(0.0, "LeCam regularization of D towards moving averages of its scores (0: off)",
                                  min=0.0)
    lecam_decay: float = setting(0.99, "LeCam: decay of the moving averages (anchors) of D's scores", min=0.0, max=1.0)


@dataclass
class TrainConfig:
    mode: str = setting("end2end", "what to train: end2end (the method), sequential, separate, mtl, vanilla, "
                                   "vanilla_meta (vanilla with A learned on the validation set), adversarial "
                                   "(worst-case generation against critic and classifier)")
    epochs: int = setting(30, "passes over the long-tailed training set", min=1)
    batch_size: int = setting(64, "real images per step", min=1)
    optimizer: str = setting("adam", "classifier optimizer", choices=("adam", "sgd"))
    lr: float = setting(1e-3, "classifier learning rate", min=0.0)
    momentum: float = setting(0.9, "SGD momentum", min=0.0, max=1.0)
    sam_rho: float = setting(0.0, "sharpness-aware minimization of the classifiers: neighbourhood radius rho "
                                  "(0.05 is SAM's usual value); 0: plain steps", min=0.0)
    w2_init: str = setting("scratch", "sequential: W2 starts from scratch, or from W1's trained weights (w1: "
                                      "fine-tuning, as the mistake-driven scheme)", choices=("scratch", "w1"))
    weight_decay: float = setting(0.0, "classifier weight decay", min=0.0)
    lr_milestones: list[int] = setting([], "epochs at which the learning rates are multiplied by lr_decay")
    lr_decay: float = setting(0.1, "learning-rate factor at each milestone", min=0.0)
    meta_lr: float = setting(1e-3, "learning rate of the meta-parameters A (Adam)", min=0.0)
    meta_weight_decay: float = setting(0.0, "weight decay (L2, in Adam) of the meta-parameters A; 0 is the paper's "
                                            "(an extension against A over-fitting a small validation set)", min=0.0)
    meta_data: str = setting("val", "what A's objective averages over: val (the balanced validation set, the paper's) "
                                    "or val_and_train (each validation batch joined by a class-balanced batch of as "
                                    "many training images: an extension against A over-fitting a small validation "
                                    "set)",
                             choices=("val", "val_and_train"))
    meta_chunk: int | None = setting(None, "images of A's validation batch per forward-backward (ImageNet-LT's "
                                           "1,000-image batches at 128 px hold tens of GB of activations at once); "
                                           "the gradient is the whole batch's (exactly for networks without batch "
                                           "statistics; with batch norm in training mode each chunk is normalised by "
                                           "its own). null: the whole batch",
                                     min=1)
    alloc_lr: float = setting(0.01, "train.allocator=learned: learning rate (Adam) of the per-class logits of p(s)", min=0.0)
    meta_every: int = setting(8, "G and A are updated every this many iterations", min=1)
    lambda_gen: float = setting(1.0, "weight of the generated-image loss in W2's objective (lambda)", min=0.0)
    gamma: float = setting(1.0, "weight of W1's validation loss in A's objective (gamma)", min=0.0)
    hypergradient: str = setting("exact", "hypergradient hops, each scaled by the step size of the level it "
                                          "differentiates through: darts (the paper's finite differences), exact "
                                          "(double backward), or first_order (no hops: the upper levels' direct "
                                          "gradients only)",
                                 choices=("darts", "exact", "first_order"))
    darts_alpha: float = setting(1e-4, "finite-difference step of the darts hops, in parameter norm", min=0.0)
    keep_weights: str = setting("relaxed", "W2's weights b_m of generated images: relaxed (the paper's binary "
                                           "Gumbel-softmax) or straight_through (0 or 1 forward, the relaxed "
                                           "gradient)",
                                choices=("relaxed", "straight_through"))
    gen_budget: str = setting("counted", "how much each generated class weighs in W2's loss: counted (b_m divided by "
                                         "its expectation given p(o_m), without gradient: class c weighs M p_c, the "
                                         "count of the paper's Table 3 and of sequential) or squared (b_m as Eq. 4 "
                                         "writes it: the image is drawn with probability p and kept with probability "
                                         "about p, so class c weighs about M p_c^2, all generated images about M "
                                         "sum(p^2)), or score (beyond the paper: every drawn image weighs 1, "
                                         "M p_c a class as sequential draws them, and p gets the score "
                                         "function's gradient instead of the Gumbel keep-weights)",
                              choices=("counted", "squared", "score"))
    temperature_start: float = setting(1.0, "Gumbel-softmax temperature at the start", min=1e-6)
    temperature_end: float = setting(0.1, "Gumbel-softmax temperature at the end (exponential anneal)", min=1e-6)
    allocator: str = setting("needs", "how the generation budget is split between classes: needs (per-class "
                                      "validation loss), equal, reciprocal (1/n_c), worstk (mistake-driven), learned "
                                      "(beyond the paper: p(s) the softmax of per-class logits, an upper level of W2 "
                                      "learned on the validation set through the hypergradient of W2's validation "
                                      "loss)")
    alloc_discount: str = setting("none", "sequential, beyond the paper: gan_train scales p(s) by how well the "
                                          "generator draws each class before the set is made: per class, the "
                                          "validation accuracy of a classifier of W1's architecture trained 10 "
                                          "epochs on generated images alone (as many as the training set, classes "
                                          "equal), as (right + 1) / (n + 2), renormalised, so a class the generator "
                                          "cannot draw gets fewer of its images; none: p(s) as the allocator gives it",
                                  choices=("none", "gan_train"))
    gen_filter: str = setting("none", "sequential, beyond the paper: w1_agrees keeps a generated image only where W1 "
                                      "classifies it as the class it was drawn for, drawing a rejected one again "
                                      "(a new latent, the same class) up to 10 times and leaving out what W1 still "
                                      "rejects, so W2 learns from no image W1 reads as another class; none: every "
                                      "image drawn", choices=("none", "w1_agrees"))
    worstk_k: int = setting(3, "worstk: how many of the worst classes (by validation accuracy) get images", min=1)
    worstk_fraction: float = setting(0.5, "worstk: generated images per epoch as a fraction of the class's real ones",
                                     min=0.0)
    loss: str = setting("ce", "classification loss of W1 and W2: ce, focal, cb (class-balanced), balanced_softmax, "
                              "ldam_drw, isda; mwn (Meta-Weight-Net, mode vanilla only)")
    focal_gamma: float = setting(2.0, "focal: focusing exponent gamma of (1 - p_y)^gamma (0 is CE)", min=0.0)
    cb_beta: float = setting(0.9999, "cb and ldam_drw's re-weighting: beta of the weights (1 - beta)/(1 - beta^n_c), "
                                     "in [0, 1)", min=0.0, max=1.0)
    logit_adjust_tau: float = setting(1.0, "balanced_softmax: training logits + tau * log(n_c / N) (1 is balanced "
                                           "softmax)",
                                      min=0.0)
    ldam_margin: float = setting(0.5, "ldam_drw: margin of the rarest class (margins proportional to n_c^(-1/4))", min=0.0)
    ldam_scale: float = setting(30.0, "ldam_drw: factor s on the logits of the (plain linear) head", min=1e-6)
    drw_start: float = setting(0.8, "ldam_drw: fraction of training after which class-balanced re-weighting starts",
                               min=0.0, max=1.0)
    isda_lambda: float = setting(0.5, "isda: augmentation strength lambda_0, ramped as lambda_0 * fraction of "
                                      "training done",
                                 min=0.0)
    mwn_lr: float = setting(1e-3, "loss=mwn: learning rate of the weighting network (Adam)", min=0.0)
    mwn_hidden: int = setting(100, "loss=mwn: hidden units of the weighting network", min=1)
    posthoc: str = setting("none", "a cheap long-tail correction of the reported classifier (W2 in the generating "
                                   "modes, W1 otherwise), in any mode: logit_adjust (post-hoc logit adjustment, Menon "
                                   "et al. 2021: the test logits minus posthoc_tau * log of the class distribution "
                                   "that classifier trained on, real images plus the weights of generated ones) or "
                                   "crt (classifier re-training, Kang et al. 2020: its encoder frozen, a fresh "
                                   "A-shaped head trained crt_epochs epochs on the real training images with "
                                   "class-balanced sampling, reported as 'after'). needsgen compare starts such a "
                                   "variant from the finished run without it, rather than training it again",
                           choices=("none", "logit_adjust", "crt"))
    class_prior: str = setting("trained_on", "modes whose W2 trains on generated images: the class distribution that "
                                             "the count-aware losses "
                                             "(balanced_softmax, cb, ldam_drw) of W2 and posthoc=logit_adjust correct "
                                             "for: trained_on (real images plus the generated ones at their weight in "
                                             "W2's loss) or real (beyond the paper: the real training counts alone, "
                                             "generated images counted as augmentation of their class rather than as "
                                             "a shift of the class distribution; in sequential_real, the extra pool "
                                             "images)",
                               choices=("trained_on", "real"))
    posthoc_tau: float = setting(1.0, "posthoc=logit_adjust: tau of the prior subtracted from the logits", min=0.0)
    crt_epochs: int = setting(10, "posthoc=crt: epochs of the head's re-training", min=1)
    mtl_weight: float = setting(1.0, "mtl: weight of W2's loss on generated images in the generator's objective", min=0.0)
    gen_per_real: float = setting(1.0, "budget M per epoch, in generated images per real training image", min=0.0)
    decov_weight: float = setting(0.0, "DeCov regularizer on W2's features of generated images (0: off)", min=0.0)
    adversarial_form: str = setting("wasserstein", "adversarial mode: form of the critic game",
                                    choices=("wasserstein", "js"))
    adversarial_lambda: float = setting(1.0, "adversarial mode: weight lambda = 1/epsilon of the critic term in G's "
                                             "loss against the classifier's loss", min=0.0)
    precision: str = setting("fp32", "fp32, bf16 or fp16 (fp16 needs CUDA; with a loss scaler): autocast of the steps "
                                     "of the levels without hypergradient paths (W1, H, G, W2); the upper levels' "
                                     "steps (A) and the hypergradient hops stay in fp32", choices=("fp32", "bf16", "fp16"))
    max_faults: int = setting(10, "consecutive non-finite steps of one level (skipped) before the run aborts", min=1)


@dataclass
class RunConfig:
    name: str | None = setting(None, "run directory name under out_dir (default: <config>-<mode>-seed<seed>)")
    out_dir: str = setting("runs", "where run directories are created")
    seed: int = setting(0, "seed of initialisation and of every random draw in training", min=0)
    device: str = setting("auto", "auto (CUDA if available), cpu, cuda or cuda:N")
    threads: int | None = setting(None, "CPU threads of torch's operators (torch.set_num_threads); null: torch's "
                                        "choice, one per core. Several jobs on one machine: give each cores / jobs, "
                                        "or they slow each other down many times over. Same seed, thread count and "
                                        "device: same metrics", min=1)
    plugins: list[str] = setting([], "modules or .py files imported before the config is read: a plugin registers "
                                     "levels (register_level) and modes (register_mode) of its own; saved in "
                                     "config.yaml, .py files with their absolute path, so that eval, --resume, "
                                     "compare, sample and gan-metrics load them again")
    progress: bool = setting(True, "show progress bars")
    deterministic: bool = setting(False, "deterministic algorithms on CUDA (slower): the same seed, thread count and "
                                         "device then give the same metrics on a GPU too; on the CPU they do without "
                                         "it")
    checkpoint_every: int = setting(250, "iterations between checkpoints (one is also written at the end and on "
                                         "SIGINT/SIGTERM); 0: only those", min=0)
    tensorboard: bool = setting(False, "also write the epoch's losses, validation accuracies, Gumbel temperature and, "
                                       "per class, p(s), generated images and W1's validation accuracy as TensorBoard "
                                       "scalars in RUN_DIR/tensorboard (needs the tensorboard package)")
    gan_cache: str | None = setting(None, "folder of pre-trained GANs shared between runs: a run whose GAN "
                                          "pre-training another run already did with the same settings (the same "
                                          "data, models, GAN, seed and mode, whatever thread count or device; "
                                          "whatever only acts after pre-training may differ) starts from its result, and a run that pre-trains "
                                          "leaves its result there; the same for the GAN phase after "
                                          "pre-training of sequential and separate. needsgen compare sets it to "
                                          "<comparison>/gan_cache. null: every run pre-trains its own")
    channels_last: bool = setting(False, "keep images, activations and convolution weights in channels-last (NHWC) "
                                         "memory: faster convolutions on GPUs with tensor cores, with bf16/fp16")
    compile: str = setting("none", "torch.compile the levels' networks with this backend: inductor (generates "
                                   "kernels; Triton on CUDA, a C++ compiler on the CPU; the first iterations "
                                   "compile), aot_eager (traces forward and backward without generating code: checks "
                                   "that the levels compile), none", choices=("none", "inductor", "aot_eager"))
    sync_every: int = setting(20, "iterations between the training loop's waits for the device, where it reads "
                                  "which steps were skipped as non-finite (a run aborts at most this many iterations "
                                  "after train.max_faults faults in a row) and, under torchrun, agrees on a stop "
                                  "signal; epoch ends and checkpoints wait too", min=1)


SECTIONS: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "arch": ArchConfig, "gan": GANConfig, "train": TrainConfig,
    "run": RunConfig,
}
LEVELS = "levels"  # the section of the levels' own settings: levels.<kind>.<name>
LEVEL_SETTINGS: dict[str, type] = {}  # level kind -> its settings dataclass (register_level_settings)


def register_level_settings(kind: str, settings: type) -> None:
    """Make ``settings`` (a dataclass of ``setting`` fields) the config section ``levels.<kind>``."""
    if not dataclasses.is_dataclass(settings):
        raise ConfigError(f"register_level: the settings of level kind '{kind}' must be a dataclass of setting() "
                          f"fields, got {settings!r}")
    LEVEL_SETTINGS[kind] = settings


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    levels: dict[str, Any] = field(default_factory=lambda: {kind: cls() for kind, cls in LEVEL_SETTINGS.items()})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = dataclasses.asdict(self)
        if not out[LEVELS]:
            del out[LEVELS]
        return out

    def set(self, key: str, raw_value: Any) -> None:
        """Set ``section.key`` (``levels.<kind>.key``, or a bare leaf name of the fixed sections) to ``raw_value``,
        with type checking."""
        owner, name, full = self._leaf(key)
        meta_field = {f.name: f for f in dataclasses.fields(owner)}[name]
        value = _coerce(full, typing.get_type_hints(type(owner))[name], raw_value)
        _check_range(full, meta_field.metadata, value)
        setattr(owner, name, value)

    def get(self, key: str) -> Any:
        owner, name, _ = self._leaf(key)
        return getattr(owner, name)

    def default(self, key: str) -> Any:
        """The built-in default of ``key``."""
        owner, name, _ = self._leaf(key)
        return getattr(type(owner)(), name)

    def _leaf(self, key: str) -> tuple[Any, str, str]:
        """The settings object holding ``key``, the field's name, and the key in full."""
        section, name = resolve_key(key)
        if section == LEVELS:
            kind, name = name.split(".", 1)
            return self.levels[kind], name, f"{LEVELS}.{kind}.{name}"
        return getattr(self, section), name, f"{section}.{name}"


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)] + [
        f"{LEVELS}.{kind}.{f.name}" for kind, cls in LEVEL_SETTINGS.items() for f in dataclasses.fields(cls)]


def resolve_key(key: str) -> tuple[str, str]:
    """``'train.epochs'`` or ``'epochs'`` → ``('train', 'epochs')``; ``'levels.cw.lr'`` → ``('levels', 'cw.lr')``;
    unknown keys get a suggestion."""
    keys = all_keys()
    if key in keys:
        section, name = key.split(".", 1)
        return section, name
    if "." not in key:  # a bare leaf name of the fixed sections (levels' settings are always written in full)
        matches = [k for k in keys if k.split(".", 1)[1] == key and not k.startswith(f"{LEVELS}.")]
        if len(matches) == 1:
            section, name = matches[0].split(".", 1)
            return section, name
    close = difflib.get_close_matches(key, keys + [k.split(".", 1)[1] for k in keys], n=1)
    if key.startswith(f"{LEVELS}.") and not close:
        kind = key.split(".")[1]
        hint = (f" (level kind '{kind}' declares no settings; a level's settings come with the plugin that "
                f"registers it, run.plugins)")
    else:
        hint = f" (did you mean '{close[0]}'?)" if close else " (see 'needsgen run --help' for the keys)"
    raise ConfigError(f"unknown config key '{key}'{hint}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(key: str, tp, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, inner[0], value)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):  # one item: a list of one
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")  # a bug in this module, not in the input


def _check_range(key: str, meta: dict, value: Any) -> None:
    if value is None:
        return
    values = value if isinstance(value, list) else [value]
    for v in values:
        if "min" in meta and v < meta["min"]:
            raise ConfigError(f"{key}: must be >= {meta['min']}, got {v}")
        if "max" in meta and v > meta["max"]:
            raise ConfigError(f"{key}: must be <= {meta['max']}, got {v}")
        if "choices" in meta and v not in meta["choices"]:
            raise ConfigError(f"{key}: must be one of {', '.join(meta['choices'])}; got {v!r}")


def parse_override(text: str) -> tuple[str, Any]:
    """``'epochs=3'`` → ``('epochs', 3)``; the value is read as a YAML scalar or flow list."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. epochs=3)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _plugins_of(data: dict[str, Any], overrides: list[tuple[str, Any]] = ()) -> list[str]:
    """``run.plugins`` as a YAML mapping and overrides give it (the last override wins)."""
    plugins = data["run"].get("plugins") if isinstance(data.get("run"), dict) else None
    for key, value in overrides:
        if key in ("run.plugins", "plugins"):
            plugins = value
    if plugins is None:
        return []
    return _coerce("run.plugins", list[str], plugins)


def from_dict(data: dict[str, Any], source: str = "config", overrides: list[tuple[str, Any]] = ()) -> Config:
    """A config from a mapping of sections (``overrides``: ``(key, value)`` pairs applied after it); the
    plugins of ``run.plugins`` are imported first, so that the modes and level settings they register are
    known, and saved with .py files as absolute paths."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (data, model, gan, train, run)")
    plugins = load_plugins(_plugins_of(data, overrides))
    cfg = Config()
    for section, values in data.items():
        if section not in SECTIONS and section != LEVELS:
            close = difflib.get_close_matches(str(section), [*SECTIONS, LEVELS], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (sections: {', '.join([*SECTIONS, LEVELS])})"
            raise ConfigError(f"{source}: unknown config section '{section}'{hint}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping of key: value")
        for name, value in values.items():
            if section == LEVELS:
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: levels.{name} must be a mapping of key: value")
                for leaf, leaf_value in value.items():
                    cfg.set(f"{LEVELS}.{name}.{leaf}", leaf_value)
            else:
                cfg.set(f"{section}.{name}", value)
    for key, value in overrides:
        cfg.set(key, value)
    cfg.run.plugins = plugins
    return cfg


def read_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """A YAML config (or the defaults) with ``key=value`` overrides, each value checked for its type and range,
    without the cross-field and registry checks of ``validate`` (which import torch)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist (configs ship in experiments/configs/)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file '{path}' is not valid YAML{where}") from None
    return from_dict(data, source=str(path or "config"), overrides=[parse_override(text) for text in overrides])


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults), apply ``key=value`` overrides, validate."""
    cfg = read_config(path, overrides)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks and registry names; raises ConfigError naming the field."""
    from mlo.budget import ALLOCATORS
    from mlo.data.sources import SOURCES
    from mlo.losses import LOSSES
    from mlo.models import list_models, unknown_model

    def choice(key: str, value: str, names) -> None:
        if value not in names:
            close = difflib.get_close_matches(value, list(names), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"{key}: unknown value '{value}' ({hint}choices: {', '.join(sorted(names))})")

    choice("data.dataset", cfg.data.dataset, SOURCES)
    d, defaults = cfg.data, DataConfig()
    if d.dataset in FILE_SOURCES:
        if d.image_size is None:
            raise ConfigError(f"data.image_size: required for {d.dataset} (e.g. 64, 128 or 224), the side its "
                              f"images are brought to")
        fixed = ("imbalance_factor", "n_max") + (("val_per_class",) if d.dataset in ("imagenet_lt", "imagenet_search")
                                                 else ())
        for name in fixed:
            if getattr(d, name) != getattr(defaults, name):
                why = {"imagenet_lt": "its split files fix the long tail and the validation set",
                       "imagenet_search": "its split is 10% of each class for training and 2.5% for validation"
                       }.get(d.dataset, "its classes keep their own sizes: no long-tail cut")
                raise ConfigError(f"data.{name}: does not apply to {d.dataset} ({why}); remove it")
    reason = unknown_model("encoder", cfg.model.encoder)
    if reason:
        raise ConfigError(f"model.encoder: {reason}")
    m = cfg.model
    if (m.meta == "arch") != (m.encoder == "pc_darts") and not (m.meta == "none" and m.encoder == "pc_darts"):
        raise ConfigError("model.meta=arch: A is the architecture of a PC-DARTS supernet; set model.encoder=pc_darts"
                          if m.meta == "arch" else f"model.encoder=pc_darts: the supernet reads an architecture A; "
                          f"set model.meta=arch (or none), not {m.meta}")
    if m.encoder == "pc_darts" and m.width % cfg.arch.partial:
        raise ConfigError(f"model.width={m.width}: pc_darts passes 1/{cfg.arch.partial} of the channels through each "
                          f"edge; use a multiple of arch.partial")
    if (m.encoder == "darts") != (cfg.arch.genotype is not None):
        raise ConfigError("model.encoder=darts: the network is built from a searched genotype; give "
                          "arch.genotype=RUN_DIR/genotype.json" if m.encoder == "darts" else
                          f"arch.genotype: only model.encoder=darts is built from a genotype (not {m.encoder})")
    if cfg.data.train_on_val and cfg.train.mode != "vanilla":
        raise ConfigError(f"data.train_on_val: train.mode={cfg.train.mode} learns on the validation set; train on "
                          f"it only in vanilla mode")
    if m.meta == "arch" and cfg.train.posthoc == "crt":
        raise ConfigError("train.posthoc=crt: cRT retrains a head on W1's encoder alone, and with model.meta=arch "
                          "that encoder's architecture belongs to the meta level; use train.posthoc=logit_adjust")
    choice("gan.generator", cfg.gan.generator, list_models("gan"))
    choice("train.allocator", cfg.train.allocator, ALLOCATORS)
    choice("train.loss", cfg.train.loss, LOSSES)
    if cfg.train.cb_beta >= 1.0:
        raise ConfigError(f"train.cb_beta: must be < 1 (at 1 the weights are 0/0), got {cfg.train.cb_beta}")
    if len(cfg.gan.gan_betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.gan.gan_betas):
        raise ConfigError(f"gan.gan_betas: expected two numbers in [0, 1), got {cfg.gan.gan_betas}")
    if sorted(cfg.train.lr_milestones) != cfg.train.lr_milestones or any(
            m < 1 or m > cfg.train.epochs for m in cfg.train.lr_milestones):
        raise ConfigError(f"train.lr_milestones: expected increasing epochs in 1..{cfg.train.epochs}, "
                          f"got {cfg.train.lr_milestones}")
    policies = [p for p in cfg.gan.diffaugment.split(",") if p and p != "none"]
    from mlo.models.gan.diffaugment import POLICIES
    for p in policies:
        choice("gan.diffaugment", p, POLICIES)
    device = cfg.run.device
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"run.device: expected auto, cpu, cuda or cuda:N, got '{device}'")
    if cfg.train.sam_rho > 0 and cfg.train.precision == "fp16":
        raise ConfigError("train.sam_rho: SAM's steps bypass fp16's gradient scaler; use train.precision=bf16 or fp32")
    if cfg.train.precision == "fp16" and cfg.model.encoders_tied:
        raise ConfigError("train.precision=fp16: a tied encoder's step adds gradients that three levels' loss scalers "
                          "scaled differently; use train.precision=bf16, or model.tie_encoders=false")
    if cfg.train.temperature_end > cfg.train.temperature_start:
        raise ConfigError(f"train.temperature_end={cfg.train.temperature_end:g} is above train.temperature_start="
                          f"{cfg.train.temperature_start:g}: the Gumbel temperature anneals downwards")
    if cfg.gan.learn_truncation and cfg.gan.truncation is None:
        raise ConfigError("gan.learn_truncation: needs gan.truncation, the tau to start from (e.g. gan.truncation=2)")
    if cfg.run.name is not None and (not cfg.run.name or "/" in cfg.run.name or cfg.run.name in (".", "..")):
        raise ConfigError(f"run.name: must be a plain folder name, got '{cfg.run.name}'")


def registry_choices() -> dict[str, list[str]]:
    """The names each registry-backed key accepts (imports the registries, and with them torch)."""
    from mlo.budget import ALLOCATORS
    from mlo.data.sources import SOURCES
    from mlo.losses import LOSSES
    from mlo.models import list_models
    from mlo.models.gan.diffaugment import POLICIES

    return {"data.dataset": sorted(SOURCES), "model.encoder": list_models("encoder"), "gan.generator": list_models("gan"),
            "train.allocator": sorted(ALLOCATORS), "train.loss": sorted(LOSSES),
            "gan.diffaugment": ["none", *POLICIES, "a comma-separated list of them"]}


def help_text(cfg: Config | None = None) -> str:
    """Every key with its value in ``cfg`` (the built-in defaults without one), its help and its choices,
    for ``needsgen run [CONFIG] --help``; the settings of the levels that plugins registered last."""
    cfg = cfg or Config()
    registries = registry_choices()
    groups = [(section, getattr(cfg, section), section) for section in SECTIONS]
    groups += [(f"{LEVELS}.{kind}", settings, f"{LEVELS}.{kind}") for kind, settings in cfg.levels.items()]
    lines = []
    for title, owner, prefix in groups:
        lines.append(f"{title}:")
        for f in dataclasses.fields(owner):
            value = getattr(owner, f.name)
            key = f"{prefix}.{f.name}"
            choices = registries.get(key) or f.metadata.get("choices")
            text = f.metadata.get("help", "") + (f" [choices: {', '.join(choices)}]" if choices else "")
            lines.append(f"  {key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                         f"  {text}")
    return "\n".join(lines)


def config_diff(a: Config, b: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """Keys whose values differ between two configs, as ``key: a -> b``."""
    da, db = a.to_dict(), b.to_dict()
    flat = lambda d: {f"{s}.{k}": v for s, values in d.items() if s != LEVELS for k, v in values.items()} | {  # noqa: E731
        f"{LEVELS}.{kind}.{k}": v for kind, values in d.get(LEVELS, {}).items() for k, v in values.items()}
    fa, fb = flat(da), flat(db)
    return [f"{key}: {fa.get(key)!r} -> {fb.get(key)!r}" for key in dict.fromkeys([*fa, *fb])
            if key not in ignore and fa.get(key) != fb.get(key)]
