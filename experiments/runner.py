"""One run: data, levels, engine and phases from a config; training; evaluation; the run directory.

    run_dir/config.yaml       the resolved config
    run_dir/train_log.csv     one row per epoch (validation accuracy, losses, temperature)
    run_dir/checkpoint.pt     everything needed to resume (the one before it: checkpoint.pt.prev)
    run_dir/seeds.json        the seed behind every random choice of the run
    run_dir/level_log.csv     per epoch, every level's vector statistics (``LevelProblem.record``)
    run_dir/metrics.json      written last: its presence marks a finished run
    run_dir/report.md, *.png  tables, plots and sample grids
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
import shutil
import sys
import signal
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from mlo.betty_compat import check_compiler, compile_modules
from mlo.budget import temperature
from mlo.checkpoint import atomic_write, existing_checkpoint, load_checkpoint, remove_partial_writes, save_checkpoint
from mlo.config import Config, config_diff, from_dict
from mlo.data import SHOT_RULE, build_longtail
from mlo.data.loaders import make_loader
from mlo.data.sources import data_folder
from mlo.distributed import Processes, average_, barrier, gather_objects, sum_
from mlo.errors import ConfigError, NumericalFault, TrainingStopped, UserError
from mlo.graph import build_engine
from mlo.metrics import classification_metrics, per_class_accuracy, predict
from mlo.models.nas import Architecture, draw_cell, write_genotype
from mlo.report import (TABLE3_HEADER, markdown_table, per_class_rows, plot_allocation, plot_allocation_over_time,
                        plot_per_class_accuracy, save_sample_grid)
from mlo.trainer import Phase, StopRequest, Trainer, stop_on_signals
from problems.base import all_finite, unwrap
from experiments.config_files import (ALLOCATION_LOG, CHECKPOINT, CONFIG, GENOTYPE, LEVEL_LOG, LOG, METRICS,
                                      POSTHOC_SETTINGS, RESUMABLE_CHANGES, SEEDS, TENSORBOARD)
from experiments.levels import BuildContext, build_levels
from experiments.modes import resolve_mode
from experiments.phases import build_phases

# raised whenever what a checkpoint holds changes shape, so an older one is refused by name, not by a KeyError
CHECKPOINT_FORMAT = 3  # 2: borrowed gradients of tied encoders ("lent"); 3: the counted budget, "trained_on"
# settings that act only after the GAN's pre-training (or not at all on it): runs that differ in them alone
# share a pre-trained GAN (run.gan_cache); the initial weights are compared as well (gan_cache_key)
AFTER_GAN_PRETRAINING = RESUMABLE_CHANGES + POSTHOC_SETTINGS + tuple(f"train.{k}" for k in (
    "epochs", "optimizer", "lr", "momentum", "sam_rho", "w2_init", "weight_decay", "lr_milestones", "lr_decay", "meta_lr",
    "meta_weight_decay", "meta_data", "alloc_lr", "lambda_gen", "gamma", "hypergradient", "darts_alpha", "keep_weights",
    "gen_budget", "temperature_start", "temperature_end", "allocator", "worstk_k", "worstk_fraction", "alloc_discount",
    "gen_filter", "class_prior", "loss", "focal_gamma", "cb_beta", "logit_adjust_tau", "ldam_margin", "ldam_scale",
    "drw_start", "isda_lambda", "mtl_weight", "gen_per_real", "decov_weight", "max_faults", "meta_chunk")) + (
    "gan.truncation", "gan.learn_truncation", "gan.truncation_lr")
GAN_LEVELS = ("disc", "gen")
PRETRAINING = "GAN pre-training"
GAN_TRAINING = "GAN"  # the baselines' GAN training after pre-training: W1's and W2's settings do not reach it either
EVAL_BATCH = 500
SAMPLES_PER_CLASS = 8
SMALL_LEVEL = 1000  # levels with at most this many parameters have their learned values in metrics.json


def resolve_device(name: str, processes: Processes = Processes()) -> torch.device:
    """The device of ``run.device``; under torchrun, process ``LOCAL_RANK`` takes ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device={name} but no CUDA device is available; use run.device=cpu or auto")
        if processes.distributed:
            if device.index is not None:
                raise ConfigError(f"run.device={name}: under torchrun every process takes cuda:LOCAL_RANK; "
                                  f"use run.device=cuda or auto (and CUDA_VISIBLE_DEVICES to choose the GPUs)")
            device = torch.device("cuda", processes.local_rank)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"run.device={name} but only {torch.cuda.device_count()} CUDA device(s) exist")
        # what runs on "the current device" (streams, autocast, compiled kernels) runs on this one
        torch.cuda.set_device(device if device.index is not None else torch.device("cuda", 0))
    return device


def make_deterministic(enabled: bool) -> None:
    """``run.deterministic``: on CUDA, the same seed then gives the same metrics (as it does on the CPU without
    it), at some cost in speed: deterministic algorithms (a warning where an operation has none), cuDNN
    without autotuning, and the cuBLAS workspace its determinism needs (set before CUDA starts)."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def _rounded(value):
    """A tensor as a JSON number or (nested) list, to six significant digits."""
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().tolist()
    return [_rounded(v) for v in value] if isinstance(value, list) else float(f"{value:.6g}")


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Run:
    """A configured run in ``run_dir``; ``execute()`` trains (or resumes), evaluates and writes outputs."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir: Path | None = None  # set by execute(); nothing is written before
        self.processes = Processes.from_environ()
        if cfg.run.threads is not None:
            torch.set_num_threads(cfg.run.threads)
        make_deterministic(cfg.run.deterministic)
        self.device = resolve_device(cfg.run.device, self.processes)
        if cfg.train.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a CUDA device; use fp32 (or bf16) on the CPU")
        reason = check_compiler(self.device, cfg.run.compile)
        if reason:
            raise ConfigError(f"run.compile={cfg.run.compile}: {reason}; use run.compile=none")
        self.mode = resolve_mode(cfg)
        self.data = build_longtail(cfg.data, spare=self.mode.spare_pool)
        self.ctx = BuildContext(cfg, self.data, self.mode, self.device, self.processes)
        problems = build_levels(self.ctx)
        self.levels = {p.name: p for p in problems}
        self.engine = build_engine(problems, {k: list(v) for k, v in self.mode.u2l.items()},
                                   {k: list(v) for k, v in self.mode.l2u.items()}, device=self.device,
                                   strategy="distributed" if self.processes.distributed else "default")
        if cfg.run.channels_last:
            for problem in problems:
                problem.module.to(memory_format=torch.channels_last)
        if cfg.run.compile != "none":
            compile_modules(problems, cfg.run.compile)
        phases = build_phases(self)
        self.gan_cache_file: Path | None = None  # where this run's pre-trained GAN was read or written
        self.gan_pretrained = None               # "shared" (read from run.gan_cache) or "trained"
        self.gan_trained = None                  # the same for the GAN phase after pre-training
        if cfg.run.gan_cache and not self.processes.distributed:  # under torchrun each process has noise of its own
            for phase in phases:
                if phase.name == PRETRAINING:
                    phase.restore, phase.on_end = self.restore_pretrained_gan, self.after_pretraining(phase.on_end)
                elif phase.name == GAN_TRAINING:
                    phase.restore, phase.on_end = self.restore_trained_gan(phase), self.after_gan_training(phase)
        # the phase that trains the reported classifier (a re-trained head's is a correction after it)
        self.main_phase = [p.name for p in phases if p.epoch_length and p.leaves != ["crt"]][-1]
        self.derived_from: Path | None = None  # the finished run this one continues (train.posthoc, in compare)
        self.stop = StopRequest()
        self.trainer = Trainer(self.engine, phases, progress=cfg.run.progress, on_epoch_end=self.end_epoch,
                               on_checkpoint=self.save_checkpoint, checkpoint_every=cfg.run.checkpoint_every,
                               stop=self.stop, max_faults=cfg.train.max_faults, sync_every=cfg.run.sync_every,
                               main=self.processes.main)
        self.elapsed = 0.0          # wall seconds of training, summed over resumes
        self.checkpoint_step: int | None = None  # step of the last checkpoint written or loaded
        self.last_epoch: dict[str, dict[str, torch.Tensor]] = {}
        self.trained_on: dict[str, torch.Tensor] = {}  # per classifier, the class weights of all it trained on
        self.pregenerated: dict[str, torch.Tensor] | None = None  # sequential: the set generated once
        self.tensorboard = None  # a SummaryWriter in run_dir/tensorboard, with run.tensorboard, on rank 0
        if cfg.run.tensorboard:
            try:
                import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
            except ImportError:
                raise ConfigError("run.tensorboard=true needs the tensorboard package: pip install tensorboard "
                                  "(or the project's [tensorboard] extra)") from None
        self._clock = time.perf_counter()

    def describe(self) -> str:
        """Where the run computes (device, CPU threads and processes: results depend on all three) and the
        data folder it reads (and may have filled)."""
        where = f"device {self.device}, {torch.get_num_threads()} CPU thread(s)"
        where += f", {self.processes.world_size} processes" if self.processes.distributed else ""
        folder = data_folder(self.cfg.data)
        return where + (f", data in '{folder}'" if folder else "")

    # ----- training ----------------------------------------------------------------------------
    def _tick(self) -> None:
        now = time.perf_counter()
        self.elapsed += now - self._clock
        self._clock = now

    def classifiers(self) -> dict[str, object]:
        return {n: self.levels[n] for n in ("w1", "w2", "crt") if n in self.levels}

    def class_prior(self, name: str) -> torch.Tensor:
        """The class distribution classifier ``name`` trained on: every image of its steps, generated
        ones at their weight in its loss (λ b_m); the real training counts before its first epoch, or
        always with ``train.class_prior=real``."""
        seen = None if self.cfg.train.class_prior == "real" else self.trained_on.get(name)
        prior = torch.as_tensor(self.data.train_counts, dtype=torch.float) if seen is None else seen.float().cpu()
        return prior / prior.sum()

    @torch.no_grad()
    def predict(self, problem, images, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (on the CPU) and labels of ``problem`` on a whole image set; with
        ``train.posthoc=logit_adjust``, the reported classifier's logits minus ``τ · log prior``, the prior
        the class distribution it trained on (Menon et al.'s post-hoc adjustment, applied wherever that
        classifier is evaluated)."""
        batches = make_loader("sequential", images, labels, EVAL_BATCH, device=self.device, workers=self.cfg.data.num_workers)
        logits, y = predict(problem, batches)
        t = self.cfg.train
        if t.posthoc == "logit_adjust" and problem.name == self.mode.reported:
            logits = logits - t.posthoc_tau * torch.log(self.class_prior(problem.name).to(logits.dtype))
        return logits, y

    def accuracy(self, problem, images, labels) -> np.ndarray:
        logits, y = self.predict(problem, images, labels)
        return per_class_accuracy(logits, y, self.data.num_classes)

    def share_statistics(self) -> None:
        """Average the buffers (BatchNorm statistics, EMA) over processes, which each updated on
        their share of the batches. Linear updates: averaging at any point gives the same averages
        later. Done before evaluations and checkpoints."""
        modules = [p.module for p in self.levels.values()] + [p.ema for p in self.levels.values() if getattr(p, "ema", None)]
        average_([b for m in modules for b in m.buffers() if b.is_floating_point()])

    def end_epoch(self, phase: Phase, epoch: int) -> dict:
        self._tick()
        self.engine.eval()
        self.share_statistics()
        records = {name: p.pop_records() for name, p in self.levels.items()}
        # sums over processes: every ratio below is of two summed records (e.g. loss / steps)
        sum_([rec[k] for rec in records.values() for k in sorted(rec)])
        for name, rec in records.items():
            if "trained_on" in rec:
                self.trained_on[name] = self.trained_on.get(name, 0.0) + rec["trained_on"]
        # a level that did not step this epoch (W2 while a head is re-trained) keeps its last epoch's records
        self.last_epoch = {**self.last_epoch, **{name: rec for name, rec in records.items() if rec}}
        if not self.processes.main:
            return {}
        row = {"phase": phase.name, "epoch": epoch, "global_step": self.engine.global_step,
               "seconds": round(self.elapsed, 2)}
        val_acc = {name: self.accuracy(problem, self.data.val_images, self.data.val_labels)
                   for name, problem in self.classifiers().items()}
        for name, acc in val_acc.items():
            row[f"{name}_val_acc"] = round(float(acc.mean()), 4)
        for name, rec in records.items():
            if "steps" in rec:
                row[f"{name}_loss"] = round(float(rec["loss"] / rec["steps"]), 4)
                # other scalar statistics (a learned truncation's tau): their mean over the epoch's steps
                row.update({f"{name}_{k}": round(float(v / rec["steps"]), 4) for k, v in rec.items()
                            if k not in ("loss", "steps") and v.dim() == 0})
        generated = self.allocation_summary()
        per_class = []
        if generated is not None:
            row["generated"] = round(float(generated["generated"].sum()), 1)
            w2 = self.levels["w2"]
            if hasattr(w2, "temperatures"):
                row["temperature"] = round(temperature(w2.count / max(1, w2.total_steps), *w2.temperatures), 4)
            per_class = [{"phase": phase.name, "epoch": epoch, "global_step": self.engine.global_step, "class": c,
                          "real_images": n, "p": round(float(p), 5), "generated": round(float(g), 2),
                          "w1_val_acc": round(float(a), 4)}
                         for c, n, p, g, a in zip(self.data.classes, self.data.train_counts,
                                                  generated["allocation"].cpu(), generated["generated"].cpu(),
                                                  val_acc["w1"])]
        self._append_log(LOG, [row])
        if per_class:
            self._append_log(ALLOCATION_LOG, per_class)
        vectors = [{"phase": phase.name, "epoch": epoch, "global_step": self.engine.global_step, "level": name,
                    "statistic": key, "index": i, "value": round(float(v), 6)}
                   for name, rec in records.items() for key, value in rec.items() if value.dim() == 1
                   for i, v in enumerate((value / rec["steps"].clamp(min=1)).tolist())]
        if vectors:
            self._append_log(LEVEL_LOG, vectors)
        if self.tensorboard is not None:
            self.write_scalars(row, per_class)
        return {k: v for k, v in row.items() if k.endswith("val_acc")}

    def write_scalars(self, row: dict, per_class: list[dict]) -> None:
        """The epoch's row as TensorBoard scalars (losses, validation accuracies, temperature) and, per
        class, p(s), generated images and W1's validation accuracy."""
        step = row["global_step"]
        for key, value in row.items():
            if key not in ("phase", "epoch", "global_step", "seconds"):
                self.tensorboard.add_scalar(key.replace("_", "/", 1), float(value), step)
        for key in ("p", "generated", "w1_val_acc"):
            self.tensorboard.add_scalars(f"per_class/{key}", {str(r["class"]): r[key] for r in per_class}, step)
        self.tensorboard.flush()

    def _read_log(self, name: str) -> list[dict]:
        path = self.run_dir / name
        return list(csv.DictReader(path.open())) if path.exists() else []

    def _write_log(self, name: str, rows: list[dict]) -> None:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.run_dir / name, lambda f: f.write(out.getvalue().encode()))

    def _append_log(self, name: str, rows: list[dict]) -> None:
        self._write_log(name, self._read_log(name) + [{k: str(v) for k, v in row.items()} for row in rows])

    # ----- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "trainer": self.trainer.state_dict(),
            "levels": {name: p.level_state() for name, p in self.levels.items()},
            "elapsed": self.elapsed, "last_epoch": self.last_epoch, "pregenerated": self.pregenerated,
            "trained_on": self.trained_on, "derived_from": str(self.derived_from) if self.derived_from else None,
            "gan_pretrained": [self.gan_pretrained, str(self.gan_cache_file) if self.gan_cache_file else None],
            "gan_trained": self.gan_trained,
            "processes": self.processes.world_size,
            "rng": self.global_rng_state(),
        }

    @staticmethod
    def global_rng_state() -> dict:
        # the run draws from its own seeded generators; the global states are kept for user levels
        return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
                "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1])}

    def process_state(self) -> dict:
        """What differs between processes: the levels' noise, last batches and records, the global RNGs."""
        return {"levels": {name: p.process_state() for name, p in self.levels.items()}, "rng": self.global_rng_state()}

    def save_checkpoint(self) -> None:
        """Every process calls it; rank 0 writes one checkpoint holding every process's own state."""
        self._tick()
        finite = [all_finite(list(problem.module.parameters())) for problem in self.levels.values()]
        if not bool(torch.stack(finite).all()):  # one wait for the device, not one per parameter
            name = next(name for name, ok in zip(self.levels, finite) if not ok)
            raise NumericalFault(f"level '{name}' has non-finite weights at step {self.engine.global_step}; "
                                 f"the checkpoint was not overwritten")
        self.share_statistics()
        per_process = gather_objects(self.process_state()) if self.processes.distributed else None
        if self.processes.main:
            state = self.state_dict()
            if per_process is not None:
                state["per_process"] = per_process
            save_checkpoint(self.run_dir / CHECKPOINT, state)
        self.checkpoint_step = self.engine.global_step

    def load_checkpoint(self, source: Path | None = None, evaluation_only: bool = False) -> None:
        """Every process loads this run's checkpoint and takes its own part of it.

        ``source``: the run directory of a finished run this one continues, one that differs only in
        settings acting after training (``POSTHOC_SETTINGS``): its levels and position are taken, and
        what it lacks (a re-trained head) starts fresh. ``evaluation_only``: the weights are read to
        evaluate, not to train on (checkpoints of earlier versions are accepted then)."""
        folder = source or self.run_dir
        if self.processes.main and source is None:
            remove_partial_writes(folder / CHECKPOINT)
        path = existing_checkpoint(folder / CHECKPOINT)
        if path is None:
            raise UserError(f"no checkpoint in '{folder}'")
        state = load_checkpoint(path, map_location=self.device)
        written = state.get("format", 1)
        # format 1 lacks only the gradients borrowers lend a tied encoder; format 2 weighed generated images by
        # the squared budget without saying so, and lacks the classes seen: both still evaluate
        if written > CHECKPOINT_FORMAT or (written < 3 and not evaluation_only) or (
                written == 1 and self.cfg.model.encoders_tied):
            raise UserError(f"checkpoint '{path}' was written by another version of needsgen (format {written}, "
                            f"this one reads {CHECKPOINT_FORMAT}{'' if evaluation_only else ' to train on'}); "
                            "finish it with that version, or delete the run directory to start over")
        ignore = RESUMABLE_CHANGES + (POSTHOC_SETTINGS if source is not None else ())
        diff = config_diff(from_dict(state["config"], source=str(path)), self.cfg, ignore=ignore)
        if diff:
            raise UserError(f"checkpoint '{path}' was written with a different config: {'; '.join(diff)}")
        written_by = state.get("processes", 1)
        if written_by != self.processes.world_size:
            raise UserError(f"checkpoint '{path}' was written by {written_by} process(es); resume it with as many "
                            f"(torchrun --nproc_per_node={written_by}), not {self.processes.world_size}")
        if source is not None:
            trained = len(self.trainer.phases) - (1 if "crt" in self.levels and "crt" not in state["levels"] else 0)
            if (state["trainer"]["phase_index"], state["trainer"]["iteration"]) != (trained, 0):
                raise UserError(f"'{folder}' has not finished training; finish it first (needsgen run --resume {folder})")
        own = state["per_process"][self.processes.rank] if "per_process" in state else state  # rank 0 wrote "levels"
        for name, p in self.levels.items():
            if name in state["levels"]:
                p.load_level_state({**state["levels"][name], **own["levels"][name]})
            elif source is None:
                raise UserError(f"checkpoint '{path}' has no level '{name}' (written by another version of needsgen)")
        self.trainer.load_state_dict(state["trainer"])
        self.elapsed = state["elapsed"]
        self.last_epoch = state["last_epoch"]
        self.pregenerated = state["pregenerated"]
        self.trained_on = state.get("trained_on", {})
        if state.get("derived_from"):
            self.derived_from = Path(state["derived_from"])
        # the cache file is known from the start of pre-training, before the GAN is "trained" or "shared"
        self.gan_pretrained, cache_file = state.get("gan_pretrained", (None, None))
        self.gan_cache_file = Path(cache_file) if cache_file else None
        self.gan_trained = state.get("gan_trained")
        self.checkpoint_step = self.engine.global_step
        rng = own["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        np.random.set_state(("MT19937", np.array(rng["numpy"], dtype=np.uint32), rng["numpy_pos"]))
        random.setstate((3, tuple(rng["python"]), None))
        if self.processes.main and source is None:  # epochs logged after the checkpoint will be trained and logged again
            for name in (LOG, ALLOCATION_LOG, LEVEL_LOG):
                if (self.run_dir / name).exists():
                    self._write_log(name, [r for r in self._read_log(name)
                                           if int(r["global_step"]) <= self.engine.global_step])

    def write_seeds(self) -> None:
        seeds = {
            "run.seed": self.cfg.run.seed, "data.split_seed": self.cfg.data.split_seed,
            "threads": torch.get_num_threads(),  # results depend on it too (the order of float sums)
            "model_init": self.cfg.run.seed,
            "levels": {name: {"noise": p.seed,
                              "loaders": [loader.seed for loader in (p.train_data_loader or [])]}
                       for name, p in self.levels.items()},
            "samples": self.ctx.seed("samples"),
            "streams": dict(sorted(self.ctx.streams.items())),  # every named stream, its seed
        }
        if self.processes.distributed:
            seeds["processes"] = self.processes.world_size
            seeds["noise of process r > 0"] = "derive_seed(noise, r): each process draws its own"
        atomic_write(self.run_dir / SEEDS, lambda f: f.write(json.dumps(seeds, indent=2).encode()))

    # ----- a pre-trained GAN shared between runs (run.gan_cache) -----------------------------------
    def gan_cache_key(self) -> str:
        """What determines the GAN's pre-training: every setting but those acting after it, the seeds of the
        random streams it draws from, and the initial weights of the levels it trains or reads (taken as the
        phase starts)."""
        digest = hashlib.sha256()
        settings = {k: v for k, v in self.cfg.to_dict().items()}
        for key in AFTER_GAN_PRETRAINING:
            section, name = key.split(".")
            settings[section].pop(name, None)
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
        for name in GAN_LEVELS:  # the random streams pre-training draws from
            level = self.levels[name]
            digest.update(json.dumps([level.seed, [loader.seed for loader in level.train_data_loader or []]]).encode())
        for name in (*GAN_LEVELS, "meta"):
            if name in self.levels:
                for key, tensor in sorted(self.levels[name].module.state_dict().items()):
                    digest.update(key.encode())
                    digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:20]

    def restore_pretrained_gan(self) -> bool:
        """At the start of pre-training: take a GAN another run pre-trained with the same settings (True),
        or note where this run will leave its own (False)."""
        self.gan_cache_file = self.pretrained_gan_file()
        if not self.gan_cache_file.is_file():
            return False
        self.load_shared_gan(self.gan_cache_file, PRETRAINING)
        self.gan_pretrained = "shared"
        return True

    def after_pretraining(self, then):
        """The end of pre-training: the phase's own ``then``, and the GAN left for other runs."""
        def done():
            if then is not None:
                then()
            self.gan_pretrained = "trained"
            if self.gan_cache_file is None:  # resumed from a checkpoint that lost it (written before bc413d5)
                print(f"{self.cfg.run.name}: the pre-trained GAN's key was lost on an earlier resume; not shared",
                      file=sys.stderr)
                return
            self.save_shared_gan(self.gan_cache_file, PRETRAINING, self.cfg.gan.gan_pretrain_steps)
        return done

    def pretrained_gan_file(self) -> Path:
        """Where a GAN pre-trained with this run's settings is shared (its key taken now, as pre-training starts)."""
        return Path(self.cfg.run.gan_cache).expanduser() / f"pretrained-{self.gan_cache_key()}.pt"

    def trained_gan_file(self) -> Path | None:
        """Where the GAN phase's GAN is shared: the pre-training's key (what determined the GAN so far; the phase
        starts where pre-training ends) and the phase's length, the one setting acting after pre-training that
        reaches the GAN. None without a key (a run resumed from a checkpoint that has none)."""
        phase = next((p for p in self.trainer.phases if p.name == GAN_TRAINING), None)
        if self.gan_cache_file is None or phase is None:
            return None
        key = self.gan_cache_file.stem.removeprefix("pretrained-")
        return self.gan_cache_file.with_name(f"trained-{key}-{phase.iterations}.pt")

    def restore_trained_gan(self, phase: Phase):
        """At the start of the GAN phase (the baselines'): take the GAN another run trained as this one would
        (True), or note that this run will leave its own (False)."""
        def restore() -> bool:
            if not any(p.name == PRETRAINING for p in self.trainer.phases):  # the key of the GAN's initial weights,
                self.gan_cache_file = self.pretrained_gan_file()                 # as pre-training would take it
            shared = self.trained_gan_file()
            if shared is None or not shared.is_file():
                return False
            self.load_shared_gan(shared, phase.name)
            self.gan_trained = "shared"
            return True
        return restore

    def after_gan_training(self, phase: Phase):
        """The end of the GAN phase: the phase's own ``on_end``, and the GAN left for other runs."""
        then = phase.on_end

        def done():
            if then is not None:
                then()
            self.gan_trained = "trained"
            shared = self.trained_gan_file()
            if shared is None:
                print(f"{self.cfg.run.name}: the checkpoint this run resumed from holds no key of its GAN; its GAN "
                      f"phase is not shared", file=sys.stderr)
                return
            self.save_shared_gan(shared, phase.name, phase.iterations)
        return done

    def load_shared_gan(self, path: Path, phase_name: str) -> None:
        """The GAN (and what its steps moved elsewhere) as another run left it at the end of ``phase_name``; the
        engine's step and the phase's seconds advance as if this run had trained it."""
        state = load_checkpoint(path, map_location=self.device)
        for name, level in self.levels.items():
            if name in GAN_LEVELS:
                level.load_level_state(state["levels"][name])
            elif name in state["ready"]:  # G's and H's steps marked themselves ready in the levels above them
                level.ready = list(state["ready"][name])
        if "meta" in self.levels:  # H's steps move its own statistics in a neck-form A
            self.levels["meta"].module.load_state_dict(state["meta"])
        self.engine.global_step += state["steps"]
        self.trainer.phase_seconds[phase_name] = state["seconds"]

    def save_shared_gan(self, path: Path, phase_name: str, steps: int) -> None:
        """Leave the GAN at the end of ``phase_name`` (``steps`` iterations) where other runs find it."""
        state = {"format": CHECKPOINT_FORMAT, "steps": steps,
                 "seconds": self.trainer.phase_seconds.get(phase_name, 0.0),
                 "levels": {name: self.levels[name].level_state() for name in GAN_LEVELS},
                 "ready": {name: list(level.ready) for name, level in self.levels.items()},
                 "meta": self.levels["meta"].module.state_dict() if "meta" in self.levels else None}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(state, f))

    # ----- evaluation and outputs --------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        self.engine.eval()
        test = {}
        for name, problem in self.classifiers().items():
            logits, y = self.predict(problem, self.data.test_images, self.data.test_labels)
            test[name] = classification_metrics(logits, y, self.data.train_counts)
        final = self.mode.reported
        iterations = self.ctx.total_steps
        seconds = self.trainer.phase_seconds.get(self.main_phase, 0.0)
        metrics = {
            "mode": self.mode.name, "dataset": self.cfg.data.dataset, "seed": self.cfg.run.seed,
            "device": str(self.device), "processes": self.processes.world_size, "final_classifier": final,
            "classes": list(self.data.classes), "train_counts": list(self.data.train_counts),
            "shot_rule": SHOT_RULE,
            **{k: v for k, v in test[final].items()},
            "before": test.get("w1") if final != "w1" else None,
            "after": test[final],
            # every classifier of the run (W2 beside a head re-trained on its encoder, say)
            "classifiers": {name: {k: m[k] for k in ("top1", "many", "medium", "few")} for name, m in test.items()},
            "wall_time_s": round(self.elapsed, 2),
            "phase_seconds": {k: round(v, 2) for k, v in self.trainer.phase_seconds.items()},
            "train_images_per_s": round(iterations * self.cfg.train.batch_size / max(seconds, 1e-9), 1),
            "seconds_per_iteration": round(seconds / max(1, iterations), 5),
            "posthoc": self.cfg.train.posthoc,
            # the class distribution the reported classifier trained on (train.posthoc=logit_adjust's prior)
            "class_prior": [round(float(v), 5) for v in self.class_prior(final)],
            "gan_pretrained": (f"{self.gan_pretrained}: {self.gan_cache_file}" if self.gan_pretrained else None),
            "gan_trained": (f"{self.gan_trained}: {gan_file}"
                            if self.gan_trained and (gan_file := self.trained_gan_file()) else self.gan_trained),
            "derived_from": str(self.derived_from) if self.derived_from else None,
            # each level's statistics of its last epoch (mean over its steps), and what small levels learned
            "level_statistics": {name: {k: _rounded(v / rec["steps"].clamp(min=1)) for k, v in rec.items()
                                        if k != "steps"} for name, rec in self.last_epoch.items()},
            "learned": {name: {k: _rounded(v) for k, v in level.module.state_dict().items()}
                        for name, level in self.levels.items()
                        if sum(p.numel() for p in level.module.parameters()) <= SMALL_LEVEL},
        }
        summary = self.allocation_summary()
        if summary is not None:
            w1_val = self.accuracy(self.levels["w1"], self.data.val_images, self.data.val_labels)
            metrics["generated_per_class"] = [round(float(v), 1) for v in summary["generated"].cpu()]
            metrics["allocation"] = [round(float(v), 4) for v in summary["allocation"].cpu()]
            if "quality" in summary:  # train.alloc_discount: what scaled the allocator's p(s)
                metrics["allocation_quality"] = [round(float(v), 4) for v in summary["quality"].cpu()]
            if "acceptance" in summary:  # train.gen_filter: the share of first draws W1 read as their class
                metrics["generated_acceptance"] = [round(float(v), 4) for v in summary["acceptance"].cpu()]
            metrics["w1_val_acc_per_class"] = [round(float(v), 4) for v in w1_val]
        return metrics

    def allocation_summary(self) -> dict[str, torch.Tensor] | None:
        """Generated images per class (Σ b_m over W2's last epoch, or the set made once in
        sequential mode) and the mean allocation p(s); None where nothing was generated yet."""
        if not self.mode.generates:
            return None
        if self.pregenerated is not None:
            return self.pregenerated
        rec = self.last_epoch.get("w2", {})
        if "generated" not in rec:
            return None
        return {"generated": rec["generated"], "allocation": rec["allocation"] / rec["steps"]}

    def table(self, metrics: dict) -> tuple[list[str], list[list[str]]]:
        after = np.asarray(metrics["after"]["per_class_acc"])
        before = np.asarray(metrics["before"]["per_class_acc"]) if metrics["before"] else after
        generated = np.asarray(metrics.get("generated_per_class", np.zeros(len(after))))
        return TABLE3_HEADER, per_class_rows(metrics["classes"], metrics["train_counts"], before, generated, after)

    def write_outputs(self, metrics: dict) -> None:
        d = self.run_dir
        header, rows = self.table(metrics)
        plot_per_class_accuracy(d / "per_class_accuracy.png", metrics["classes"],
                                (metrics["before"] or metrics["after"])["per_class_acc"],
                                metrics["after"]["per_class_acc"], metrics["train_counts"])
        if "generated_per_class" in metrics:
            plot_allocation(d / "allocation.png", metrics["classes"], metrics["generated_per_class"],
                            metrics["w1_val_acc_per_class"])
            if "gen" in self.levels:
                save_sample_grid(d / "samples.png", self.samples(), nrow=SAMPLES_PER_CLASS)
        if (d / ALLOCATION_LOG).exists():
            plot_allocation_over_time(d / "allocation_over_time.png", self._read_log(ALLOCATION_LOG))
        searched = self.write_genotype()
        summary = ["| | top-1 % | Many % | Medium % | Few % | ECE | per-class std |", "|---|---|---|---|---|---|---|"]
        for label, m in (("before (W1)", metrics["before"]), ("after (W2)" if metrics["before"] else "W", metrics["after"])):
            if m:
                cells = [f"{100 * m[k]:.2f}" if m[k] is not None else "-" for k in ("top1", "many", "medium", "few")]
                summary.append(f"| {label} | " + " | ".join(cells) + f" | {m['ece']:.4f} | {100 * m['per_class_std']:.2f} |")
        report = [
            f"# {d.name}", "",
            f"Mode `{metrics['mode']}` on `{metrics['dataset']}` (seed {metrics['seed']}, {metrics['device']}); "
            f"test accuracy of the last epoch. {SHOT_RULE}.", "",
            *summary, "",
            "## Per class (the paper's Table-3 layout)", "",
            ("Generated = images of the class in the set generated once, before W2 trained."
             if self.pregenerated is not None else
             "Generated = Σ b_m of generated images of the class in the last epoch."), "",
            markdown_table(header, rows), "",
            f"Wall time {metrics['wall_time_s']:.1f} s; {metrics['train_images_per_s']:.1f} real training images/s; "
            f"{metrics['seconds_per_iteration']:.4f} s per iteration.", "",
        ]
        if searched:
            report += [f"Searched architecture (`{GENOTYPE}`): normal cell "
                       f"{', '.join(f'{op}<-{i}' for op, i in searched['normal'])}; reduction cell "
                       f"{', '.join(f'{op}<-{i}' for op, i in searched['reduce'])}.", "",
                       "![normal cell](cell_normal.png) ![reduction cell](cell_reduce.png)", ""]
        if "generated_per_class" in metrics:
            report += ["![per-class accuracy](per_class_accuracy.png) ![allocation](allocation.png)", "",
                       "![samples of the EMA generator, one row per class](samples.png)", ""]
        else:
            report += ["![per-class accuracy](per_class_accuracy.png)", ""]
        (d / "report.md").write_text("\n".join(report))
        atomic_write(d / METRICS, lambda f: f.write(json.dumps(
            {k: _json_safe(v) for k, v in metrics.items()}, indent=2).encode()))

    def write_genotype(self) -> dict | None:
        """With an architecture as A: its genotype (``genotype.json``) and its two cells drawn. Without a
        meta level (mtl, vanilla) each network owns its architecture: the reported classifier's is written."""
        if "meta" in self.levels:
            arch = unwrap(self.levels["meta"].module)
        else:
            reported = self.levels["w2" if "w2" in self.levels else "w1"]
            arch = getattr(unwrap(reported.module), "meta", None)
        if not isinstance(arch, Architecture):
            return None
        genotype = arch.genotype()
        write_genotype(self.run_dir / GENOTYPE, genotype)
        for cell in ("normal", "reduce"):
            draw_cell(self.run_dir / f"cell_{cell}.png", genotype[cell], genotype["steps"], f"{cell} cell")
        return genotype

    @torch.no_grad()
    def samples(self) -> torch.Tensor:
        ema = self.levels["gen"].ema.module.eval()
        gen = torch.Generator(device=self.device).manual_seed(self.ctx.seed("samples"))
        classes = torch.arange(self.data.num_classes, device=self.device).repeat_interleave(SAMPLES_PER_CLASS)
        z = torch.randn(len(classes), ema.z_dim, generator=gen, device=self.device)
        return ema(z, classes).cpu()

    def execute(self, run_dir: Path, resume: bool = False, start_from: Path | None = None) -> dict | None:
        """Train (from the checkpoint if ``resume``), evaluate, write the outputs; the metrics.

        ``start_from``: a finished run that differs from this one only in ``POSTHOC_SETTINGS``; this run
        continues from its checkpoint (what is left to train is the correction, if anything), with its logs.
        SIGINT/SIGTERM finish the current iteration, write a checkpoint and raise ``TrainingStopped``.
        Under several processes all of them train; rank 0 alone writes to ``run_dir``, evaluates and
        returns the metrics (the others return None).
        """
        self.run_dir = Path(run_dir)
        if resume:
            self.load_checkpoint()
        elif start_from is not None:
            self.load_checkpoint(source=Path(start_from))
            self.derived_from = Path(start_from)
            if self.processes.main:
                for name in (LOG, ALLOCATION_LOG, LEVEL_LOG):
                    if (self.derived_from / name).exists():
                        shutil.copyfile(self.derived_from / name, self.run_dir / name)
            self.save_checkpoint()  # the run directory is complete from here on (eval, --resume)
        elif self.processes.main:
            for name in (LOG, ALLOCATION_LOG, LEVEL_LOG):  # from a run killed before its first checkpoint
                (self.run_dir / name).unlink(missing_ok=True)
        if self.processes.main:
            self.write_seeds()
            if self.cfg.run.tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(str(self.run_dir / TENSORBOARD), purge_step=self.engine.global_step + 1)
        self._clock = time.perf_counter()
        with stop_on_signals(self.stop, second_interrupts=not self.processes.distributed):
            finished = self.trainer.run()
            if not finished:
                self.save_checkpoint()
                name = signal.Signals(self.stop.signal).name
                raise TrainingStopped(
                    f"stopped by {name} at step {self.engine.global_step} of {self.trainer.total_iterations}; "
                    f"checkpoint written; continue with: needsgen run --resume {self.run_dir}",
                    exit_code=128 + self.stop.signal)
        if not self.processes.main:
            return None
        metrics = self.evaluate()
        self.write_outputs(metrics)
        return metrics


    def close(self) -> None:
        """Under torchrun, wait for every process (rank 0 evaluates and writes last), then leave the
        process group."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.processes.distributed:
            barrier()
        self.engine.cleanup()


def prepare_run_dir(cfg: Config, config_name: str) -> Path:
    """A fresh run directory; an explicit ``run.name`` that exists is refused, never overwritten."""
    out = Path(cfg.run.out_dir).expanduser()
    if cfg.run.name:
        run_dir = out / cfg.run.name
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UserError(f"run directory '{run_dir}' already exists; resume it with --resume {run_dir} "
                            f"or choose another run.name")
    else:
        base = f"{config_name}-{cfg.train.mode}-seed{cfg.run.seed}"
        run_dir, n = out / base, 1
        while run_dir.exists() and any(run_dir.iterdir()):
            n += 1
            run_dir = out / f"{base}-{n}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write the run directory '{run_dir}' ({exc.strerror}); "
                        f"set run.out_dir to a writable folder") from None
    (run_dir / CONFIG).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run_dir
