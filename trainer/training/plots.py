"""Training curves, ROC and confusion-matrix PNGs (matplotlib Agg, no display needed).

Every figure is titled, and marked "synthetic data" when the model was trained on the
synthetic set, so a demo plot is never mistaken for a clinical result.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from trainer.training import evaluate  # noqa: E402

SYNTHETIC_MARK = "synthetic data"


def _finish(fig, ax, path: Path, title: str, synthetic: bool) -> Path:
    ax.set_title(f"{title} [{SYNTHETIC_MARK}]" if synthetic else title)
    if synthetic:
        fig.text(0.99, 0.01, SYNTHETIC_MARK.upper(), ha="right", va="bottom", color="red",
                 fontsize=9, alpha=0.8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(history: dict[str, list[float]], path: Path, *, title: str = "training",
                synthetic: bool = False) -> Path:
    """Loss and AUC per epoch for train and validation; a dashed line where fine-tuning starts."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "auc"), strict=True):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            values = history.get(key)
            if values:
                ax.plot(np.arange(1, len(values) + 1), values, style, label=key)
        phases = history.get("phase", [])
        if 2 in phases and 1 in phases:
            ax.axvline(phases.index(2) + 0.5, color="grey", linestyle=":", label="fine-tune")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend(loc="best")
    fig.suptitle(f"{title}: training curves" + (f" [{SYNTHETIC_MARK}]" if synthetic else ""))
    axes[0].set_title("loss")
    axes[1].set_title("ROC AUC")
    if synthetic:
        fig.text(0.99, 0.01, SYNTHETIC_MARK.upper(), ha="right", va="bottom", color="red",
                 fontsize=9, alpha=0.8)
    fig.tight_layout()
    fig.savefig(Path(path), dpi=100)
    plt.close(fig)
    return Path(path)


def plot_roc(y_true, scores, path: Path, *, title: str = "ROC", synthetic: bool = False,
             threshold: float | None = None) -> Path:
    """ROC curve with its AUC in the legend and the operating point at ``threshold``."""
    fpr, tpr, _ = evaluate.roc_curve(y_true, scores)
    auc = evaluate.roc_auc(y_true, scores)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC = {auc:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    if threshold is not None:
        m = evaluate.threshold_metrics(y_true, scores, threshold)
        ax.plot(1 - m["specificity"], m["sensitivity"], "o", color="red",
                label=f"threshold {threshold:.3f}")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.legend(loc="lower right")
    return _finish(fig, ax, path, f"{title}: ROC (test)", synthetic)


def plot_confusion(matrix, class_names: list[str], path: Path, *, title: str = "confusion",
                   synthetic: bool = False) -> Path:
    """Confusion matrix with counts; rows are the truth, columns the prediction."""
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center",
                color="white" if v > m.max() / 2 else "black")
    return _finish(fig, ax, path, f"{title}: confusion (test)", synthetic)
