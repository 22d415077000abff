"""What a champion gets wrong and what it sees: files logged to the champion's run under ``analysis/``.

- ``misclassified.png``: the test images it is most confidently wrong about, with true and predicted characters;
- ``confused_pairs.csv`` and ``confused_pairs.png``: the most confused (true, predicted) pairs, with examples;
- ``activations/<layer>.png``: every conv layer's feature maps (after its ReLU) for one test image
  (a ``keras.Model`` over the intermediate outputs, so any Keras backend works).

Pure functions of a model, images, labels and probabilities (Keras, NumPy, matplotlib);
:func:`log_champion_analysis` hands the folder to the tracker.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Sequence

from emnist_hpo import runtime

runtime.configure()  # before Keras loads: its backend, TensorFlow's kernels and quiet start-up

import keras
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from emnist_hpo.reporting.evaluation import Evaluation  # noqa: E402

log = logging.getLogger(__name__)

#: Images in the misclassified gallery (the most confident mistakes).
GALLERY = 36
#: Confused pairs shown with examples, and examples per pair.
PAIRS, PAIR_EXAMPLES = 8, 6
#: Feature maps drawn per conv layer (the first ones).
MAX_MAPS = 32


def misclassified_gallery(x: np.ndarray, y: np.ndarray, proba: np.ndarray, classes: Sequence[str],
                          path: Path, limit: int = GALLERY) -> int:
    """A grid of the most confident mistakes ("true -> predicted (p)"); returns how many were drawn."""
    pred = proba.argmax(axis=1)
    wrong = np.flatnonzero(pred != y)
    if not len(wrong):
        return 0
    wrong = wrong[np.argsort(-proba[wrong, pred[wrong]], kind="stable")][:limit]
    cols = min(6, len(wrong))
    rows = math.ceil(len(wrong) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), wrong):
        ax.imshow(x[i], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{classes[y[i]]} -> {classes[pred[i]]} ({proba[i, pred[i]]:.2f})", fontsize=7)
    fig.suptitle(f"most confident mistakes ({int((pred != y).sum())} of {len(y)} test images wrong)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return len(wrong)


def confused_pairs_figure(x: np.ndarray, y: np.ndarray, pred: np.ndarray, ev: Evaluation, path: Path,
                          pairs: int = PAIRS, examples: int = PAIR_EXAMPLES) -> int:
    """One row per confused pair: ``true -> predicted (count)`` and example test images; returns the rows."""
    table = ev.confused_pairs.head(pairs)
    if table.empty:
        return 0
    index = {c: i for i, c in enumerate(ev.confusion.index)}
    fig, axes = plt.subplots(len(table), examples, figsize=(1.2 * examples + 1.2, 1.3 * len(table)), squeeze=False)
    for r, row in enumerate(table.itertuples(index=False)):
        hits = np.flatnonzero((y == index[row.true]) & (pred == index[row.predicted]))[:examples]
        for c in range(examples):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(hits):
                ax.imshow(x[hits[c]], cmap="gray", vmin=0, vmax=255)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(f"{row.true} -> {row.predicted}\n({row.count})", fontsize=8, rotation=0,
                              ha="right", va="center")
    fig.suptitle("most confused pairs (true -> predicted, count): test examples", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return len(table)


def conv_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every conv layer, each replaced by the activation that follows it (``conv_1_0`` -> ``relu_1_0``) if any."""
    names = {layer.name for layer in model.layers}
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            relu = "relu_" + layer.name[len("conv_"):] if layer.name.startswith("conv_") else None
            out.append(model.get_layer(relu) if relu in names else layer)
    return out


def activation_maps(model: keras.Model, image: np.ndarray, label: str, out_dir: Path) -> list[Path]:
    """One PNG per conv layer: its feature maps (after the layer) for ``image`` (uint8 28x28)."""
    layers = conv_layers(model)
    if not layers:
        return []
    probe = keras.Model(model.inputs, [layer.output for layer in layers])
    outputs = probe.predict(image[None], verbose=0)
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for layer, fmap in zip(layers, outputs):
        fmap = np.asarray(fmap)[0].astype(np.float32)  # mixed precision hands back bfloat16
        n = min(fmap.shape[-1], MAX_MAPS)
        cols = min(8, n + 1)
        rows = math.ceil((n + 1) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.4 * rows), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        axes[0, 0].imshow(image, cmap="gray", vmin=0, vmax=255)
        axes[0, 0].set_title(f"input: {label}", fontsize=7)
        for k in range(n):
            ax = axes.ravel()[k + 1]
            ax.imshow(fmap[..., k], cmap="viridis")
            ax.set_title(f"#{k}", fontsize=6)
        fig.suptitle(f"{layer.name}: {fmap.shape[-1]} maps of {fmap.shape[0]}x{fmap.shape[1]}"
                     + (f" (first {n} shown)" if n < fmap.shape[-1] else ""), fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{layer.name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def write_analysis(model: keras.Model, x: np.ndarray, y: np.ndarray, proba: np.ndarray,
                   classes: Sequence[str], ev: Evaluation, out_dir: Path, sample: int | None = None) -> list[Path]:
    """Write every analysis file for test images ``x``/``y`` and the model's ``proba`` into ``out_dir``.

    The activation maps are drawn for test image ``sample`` (default: the first one classified right).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    y = np.asarray(y).astype(np.int64)
    pred = proba.argmax(axis=1)
    written = []
    if misclassified_gallery(x, y, proba, classes, out_dir / "misclassified.png"):
        written.append(out_dir / "misclassified.png")
    ev.confused_pairs.to_csv(out_dir / "confused_pairs.csv", index=False, float_format="%.4f")
    written.append(out_dir / "confused_pairs.csv")
    if confused_pairs_figure(x, y, pred, ev, out_dir / "confused_pairs.png"):
        written.append(out_dir / "confused_pairs.png")
    if len(x):
        right = np.flatnonzero(pred == y)
        i = min(max(sample, 0), len(x) - 1) if sample is not None else int(right[0]) if len(right) else 0
        written += activation_maps(model, x[i], classes[y[i]], out_dir / "activations")
    return written


def log_champion_analysis(tracker, run_id: str, model: keras.Model, x: np.ndarray, y: np.ndarray,
                          proba: np.ndarray, classes: Sequence[str], ev: Evaluation,
                          log_fn=None) -> list[str]:
    """Write the analysis files and log them to ``run_id`` under ``analysis/``.

    Best effort: the champion is registered even if a figure fails; the failure is logged.
    Returns the artifact paths logged.
    """
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            paths = write_analysis(model, x, y, proba, classes, ev, out)
            tracker.log_artifacts(run_id, out, "analysis")
            return [f"analysis/{p.relative_to(out).as_posix()}" for p in paths]
    except Exception as exc:  # noqa: BLE001 - the analysis never costs the champion its registration
        message = f"champion analysis skipped: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        (log_fn or log.warning)(message)
        return []
