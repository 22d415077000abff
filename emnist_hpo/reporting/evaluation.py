"""Evaluation reports as files: confusion matrix, per-class report, confused pairs, curves.

Pure functions of labels, probabilities and histories (NumPy, scikit-learn,
matplotlib); tracking decides where the files go.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # noqa: E402


@dataclass
class Evaluation:
    accuracy: float  # top-1 accuracy
    confusion: pd.DataFrame  # rows: true character, columns: predicted character
    per_class: pd.DataFrame  # precision, recall, f1, support by character
    confused_pairs: pd.DataFrame  # the most confused (true, predicted) pairs

    @property
    def macro_f1(self) -> float:
        return float(self.per_class["f1"].mean())


def evaluate(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str], top_pairs: int = 20) -> Evaluation:
    y_true = np.asarray(y_true).astype(np.int64)
    y_pred = np.asarray(proba).argmax(axis=1)
    labels = np.arange(len(classes))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    names = list(classes)
    per_class = pd.DataFrame({"class": names, "precision": p, "recall": r, "f1": f, "support": s})
    return Evaluation(
        accuracy=float((y_pred == y_true).mean()) if len(y_true) else float("nan"),
        confusion=pd.DataFrame(cm, index=pd.Index(names, name="true"), columns=pd.Index(names, name="predicted")),
        per_class=per_class,
        confused_pairs=confused_pairs(cm, names, top_pairs),
    )


def confused_pairs(cm: np.ndarray, classes: Sequence[str], top: int = 20) -> pd.DataFrame:
    """The ``top`` off-diagonal cells: true character, predicted character, count, share of the true class."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(off, axis=None)[::-1][:top]
    rows = []
    support = cm.sum(axis=1)
    for idx in flat:
        i, j = np.unravel_index(idx, off.shape)
        if off[i, j] == 0:
            break
        rows.append(
            {
                "true": classes[i],
                "predicted": classes[j],
                "count": int(off[i, j]),
                "share_of_true": float(off[i, j] / support[i]) if support[i] else 0.0,
            }
        )
    return pd.DataFrame(rows, columns=["true", "predicted", "count", "share_of_true"])


def write_evaluation(ev: Evaluation, out_dir: Path, prefix: str, plots: bool = True) -> list[Path]:
    """Write ``<prefix>_confusion_matrix.{csv,png}``, ``<prefix>_per_class.csv`` and confused pairs (no PNG: ``plots=False``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        out_dir / f"{prefix}_confusion_matrix.csv",
        out_dir / f"{prefix}_per_class.csv",
        out_dir / f"{prefix}_confused_pairs.csv",
    ]
    ev.confusion.to_csv(paths[0])
    ev.per_class.to_csv(paths[1], index=False, float_format="%.4f")
    ev.confused_pairs.to_csv(paths[2], index=False, float_format="%.4f")
    if plots:
        paths.append(out_dir / f"{prefix}_confusion_matrix.png")
        plot_confusion(ev.confusion, paths[-1], title=f"{prefix} confusion matrix (accuracy {ev.accuracy:.2%})")
    return paths


def plot_confusion(cm: pd.DataFrame, path: Path, title: str) -> None:
    n = len(cm)
    size = max(5.0, min(22.0, 0.3 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    values = cm.to_numpy().astype(float)
    rows = values.sum(axis=1, keepdims=True)
    norm = np.divide(values, rows, out=np.zeros_like(values), where=rows > 0)
    # quads, not imshow: Agg resamples an image to the figure's pixels (a ~70 MB transient for 47 classes)
    edges = np.arange(n + 1) - 0.5
    im = ax.pcolormesh(edges, edges, norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_xticks(range(n), labels=list(cm.columns), fontsize=7 if n > 20 else 9)
    ax.set_yticks(range(n), labels=list(cm.index), fontsize=7 if n > 20 else 9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 26:
        for i in range(n):
            for j in range(n):
                if values[i, j]:
                    ax.text(j, i, int(values[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_curves(history: Mapping[str, Sequence[float]], path: Path, title: str = "training curves") -> Path:
    """Loss and accuracy per epoch (train and validation), learning rate on its own axis."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    epochs = range(1, len(history.get("loss", [])) + 1)
    for ax, key in zip(axes[:2], ("loss", "accuracy")):
        for k, style in ((key, "-"), (f"val_{key}", "--")):
            if history.get(k):
                ax.plot(list(epochs)[: len(history[k])], history[k], style, marker="o", label=k)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
        ax.grid(alpha=0.3)
    if history.get("learning_rate"):
        axes[2].plot(list(epochs)[: len(history["learning_rate"])], history["learning_rate"], marker="o")
        axes[2].set_yscale("log")
    axes[2].set_title("learning rate")
    axes[2].set_xlabel("epoch")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
