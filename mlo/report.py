"""Tables (Markdown, terminal text), plots and sample grids of a run."""
from __future__ import annotations

from pathlib import Path

import numpy as np

TABLE3_HEADER = ["class", "real images", "acc. before (W1) %", "generated", "acc. after (W2) %"]


def per_class_rows(classes, train_counts, acc_before, generated, acc_after) -> list[list[str]]:
    """The paper's Table-3 layout: one row per class, then mean and std rows."""
    rows = []
    for c, name in enumerate(classes):
        rows.append([str(name), str(train_counts[c]), f"{100 * acc_before[c]:.1f}",
                     f"{generated[c]:.0f}", f"{100 * acc_after[c]:.1f}"])
    for label, fn in (("mean", np.mean), ("std", np.std)):
        rows.append([label, f"{fn(train_counts):.1f}", f"{100 * fn(acc_before):.1f}",
                     f"{fn(generated):.1f}", f"{100 * fn(acc_after):.1f}"])
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    sep = "  ".join("-" * w for w in widths)
    body = [fmt(r) for r in rows]
    return "\n".join([fmt(header), sep, *body[:-2], sep, *body[-2:]])


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_per_class_accuracy(path: Path, classes, acc_before, acc_after, train_counts) -> None:
    plt = _pyplot()
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(classes)), 4))
    ax.bar(x - 0.2, 100 * np.asarray(acc_before), 0.4, label="before (W1)")
    ax.bar(x + 0.2, 100 * np.asarray(acc_after), 0.4, label="after (W2)")
    ax.set_xticks(x, [f"{c}\n({n})" for c, n in zip(classes, train_counts)], fontsize=7)
    ax.set_xlabel("class (training images)")
    ax.set_ylabel("test accuracy %")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_allocation(path: Path, classes, generated, val_acc) -> None:
    """Generated images per class against W1's validation accuracy (the paper's inverse relation)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(100 * np.asarray(val_acc), generated)
    for name, a, g in zip(classes, val_acc, generated):
        ax.annotate(str(name), (100 * a, g), fontsize=7)
    ax.set_xlabel("W1 validation accuracy %")
    ax.set_ylabel("generated images (last epoch)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_allocation_over_time(path: Path, rows: list[dict]) -> None:
    """Per class, over epochs: generated images (Σ b_m of the epoch) beside W1's validation accuracy
    (rows of ``allocation_log.csv``): how the budget follows the classes W1 gets wrong as it learns."""
    plt = _pyplot()
    classes = list(dict.fromkeys(r["class"] for r in rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for c in classes:
        mine = [r for r in rows if r["class"] == c]
        x = [int(r["global_step"]) for r in mine]
        line, = left.plot(x, [float(r["generated"]) for r in mine], label=f"{c} ({mine[0]['real_images']})")
        right.plot(x, [100 * float(r["w1_val_acc"]) for r in mine], color=line.get_color())
    left.set_ylabel("generated images in the epoch")
    right.set_ylabel("W1 validation accuracy %")
    for ax in (left, right):
        ax.set_xlabel("iteration")
    left.legend(fontsize=6, ncol=2, title="class (real images)", title_fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_sample_grid(path: Path, images, nrow: int) -> None:
    """Images in [-1, 1], one row per class; small images are enlarged to at least 32 pixels."""
    import torch.nn.functional as F
    from torchvision.utils import save_image
    scale = max(1, 32 // images.shape[-1])
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    save_image(images, path, nrow=nrow, normalize=True, value_range=(-1, 1), pad_value=1.0)
