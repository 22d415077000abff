"""Descriptions: of models in one line, and of what the MLflow UI shows (experiments, runs, registered models).

``describe_model`` writes what a leaderboard shows in its architecture column
("conv 64-3x3 / max-pool / dense 512 / dense 128"); ``model_from_params`` reads
the flat ``model.*`` params every run logs (:meth:`ExperimentConfig.flat_params`)
back into a :class:`ModelConfig`, so any run in a store can be described.

``experiment_note``, ``trial_run_name``, ``trial_note``, ``registered_model_description``
and ``model_version_description`` write the names and Markdown notes a person
reads in the MLflow UI (tag ``mlflow.note.content``, the registry's descriptions).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import yaml

from emnist_hpo.config import ModelConfig, from_dict
from emnist_hpo.errors import ConfigError


def _num(v: float) -> str:
    return f"{v:g}"


def describe_model(m: ModelConfig) -> str:
    """``m`` in one line, input side first."""
    if m.kind in ("random_forest", "svm", "knn"):
        opts = ", ".join(f"{k}={v}" for k, v in m.options.items() if k not in ("n_jobs", "cache_size", "verbose"))
        return f"{m.kind}({opts})"
    parts: list[str] = []
    a = m.augment
    if a.enabled:
        aug = [f"{n} {_num(v)}" for n, v in (("rotation", a.rotation), ("shift", a.shift), ("zoom", a.zoom)) if v > 0]
        parts.append("augment(" + ", ".join(aug) + ")")
    if m.kind == "lstm":
        parts.append(f"lstm {m.lstm_units} over rows")
    else:
        for b in m.conv_blocks:
            conv = f"conv {b.filters}-{b.kernel}x{b.kernel}" + ("+bn" if m.batch_norm else "")
            parts.append(conv if b.convs == 1 else f"{b.convs}x {conv}")
            parts.append(f"{m.pool}-pool")
            if m.conv_dropout > 0:
                parts.append(f"dropout {_num(m.conv_dropout)}")
    for w in m.dense:
        parts.append(f"dense {w}")
        if m.dense_dropout > 0:
            parts.append(f"dropout {_num(m.dense_dropout)}")
    line = " / ".join(parts)
    return line + (f" (padding {m.padding})" if m.kind == "cnn" else "")


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"conv_blocks.0.filters": 8}`` -> ``{"conv_blocks": [{"filters": 8}]}`` (numeric keys become lists)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value

    def lists(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: lists(v) for k, v in node.items()}
            if node and all(k.isdigit() for k in node):
                return [node[k] for k in sorted(node, key=int)]
        return node

    return lists(tree)


def model_from_params(params: Mapping[str, str]) -> ModelConfig:
    """The :class:`ModelConfig` of a run from its logged ``model.*`` params (strings)."""
    flat = {}
    for k, v in params.items():
        if not k.startswith("model."):
            continue
        try:
            flat[k[len("model."):]] = yaml.safe_load(v) if isinstance(v, str) else v
        except yaml.YAMLError:
            flat[k[len("model."):]] = v
    tree = _unflatten(flat)
    if "options" in tree and not isinstance(tree["options"], dict):
        tree["options"] = {}
    return from_dict(ModelConfig, tree, where="logged params", path="model")


def describe_params(params: Mapping[str, str]) -> str:
    """One-line architecture of a run from its logged params, or "?" when they do not describe a model."""
    try:
        return describe_model(model_from_params(params))
    except (ConfigError, TypeError, ValueError):
        return "?"


# --------------------------------------------------------------------------- what the MLflow UI shows


def human_count(n: float) -> str:
    """``n`` short and exact enough to read at a glance: 950, 1.5k, 10k, 232k, 1M, 2.5M."""
    n = float(n)
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            v = n / size
            text = f"{v:.0f}" if v >= 100 or v == int(v) else f"{v:.3g}"
            return text + suffix
    return f"{n:.0f}" if n == int(n) else f"{n:g}"


def _positive(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):  # None, pandas' NA
        return None
    return f if math.isfinite(f) and f > 0 else None


def log_ticks(values: Iterable[float]) -> tuple[list[float], list[str]]:
    """Tick positions and labels (1k, 10k, 100k, 1M) for a log axis over ``values``.

    Powers of ten; with 1-2-5 steps in between when the values span less than two decades.
    """
    vals = [f for f in map(_positive, values) if f is not None]
    if not vals:
        return [], []
    lo, hi = math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))
    hi = max(hi, lo + 1)
    steps = (1, 2, 5) if hi - lo <= 2 else (1,)
    ticks = [m * 10.0 ** e for e in range(lo, hi + 1) for m in steps if m * 10.0 ** e <= 10.0 ** hi]
    return ticks, [human_count(t) for t in ticks]


#: Marks the list of studies at the end of an experiment's note, kept up to date by the tracker.
STUDIES_HEADING = "Studies logged here:"


def experiment_note(name: str) -> str:
    """The Markdown description (``mlflow.note.content``) of an experiment this project creates."""
    from emnist_hpo.data.nist import SPLITS, load_classes

    if name == "emnist-compare":
        return ("Cross-split leaderboards written by `python -m emnist_hpo compare`: one run per invocation, "
                "with `leaderboard.csv`, `published.csv`, `engines.csv`, `leaderboard.md` and `compare.html` "
                "under its artifacts' `compare/` folder (champion and baselines per split against published "
                "figures, and the Pareto plot of accuracy against parameters).")
    split = name[len("emnist-"):] if name.startswith("emnist-") else None
    if split not in SPLITS:
        return f"Runs tracked by emnist-hpo (experiment `{name}`)."
    classes = load_classes(split)
    return "\n".join([
        f"EMNIST **{split}** ({len(classes)} classes: {_class_range(classes)}): hyperparameter searches, "
        f"their champions and fixed baselines, tracked by emnist-hpo.",
        "",
        f"- `study-<study>`: one parent run per invocation of `python -m emnist_hpo study --split {split}`, "
        "with the study's settings, data sizes and Optuna's plots (`study/optuna_plots.html`). Its trials are "
        "nested under it, each named with its outcome: `trial-12 val=0.8123`, `trial-0 seed=two_conv "
        "val=0.8011`, `trial-7 pruned@epoch2 val=0.4100`, `trial-3 failed`; each trial's note names its "
        "Optuna trial.",
        f"- `champion-trial-<n>`: the champion retrained and tested once; registered as model `emnist-{split}` "
        "(alias `champion` on the best test accuracy).",
        f"- `baseline-<experiment>`: a fixed experiment (`python -m emnist_hpo run <experiment> --split {split}`).",
        "",
        "Sort by `val_accuracy` (or `best_val_accuracy`) to rank the trials.",
        "",
        STUDIES_HEADING,
    ])


def _class_range(classes: tuple[str, ...]) -> str:
    if len(classes) <= 12:
        return " ".join(classes)
    return " ".join(classes[:6]) + " ... " + " ".join(classes[-3:])


def study_line(study: str, engine: str, where: str | None) -> str:
    """One line of an experiment note's study list."""
    return f"- `{study}` ({engine}" + (f", {where}" if where else "") + ")"


def note_with_study(note: str, line: str) -> str | None:
    """``note`` with ``line`` added to its study list; None when it has one already or no list to add to."""
    if STUDIES_HEADING not in note or line in note.splitlines():
        return None
    return note.rstrip("\n") + "\n" + line


def trial_run_name(number: int, state: str, *, seed: str | None = None, val: float | None = None,
                   epoch: int | None = None, reason: str | None = None, params: int | None = None,
                   rung: int | None = None) -> str:
    """A trial run's name once its outcome is known, e.g. ``trial-12 val=0.8123``, ``trial-3 failed``.

    ``trial-0 seed=two_conv val=0.8011`` (a seed experiment), ``trial-7 pruned@rung1 val=0.4100``
    (the rung and validation accuracy that pruned it; ``pruned@epoch2`` where there is no rung),
    ``trial-5 pruned params=929k>max-params``, ``trial-6 pruned >max-flops``, ``trial-8 pruned time-budget``,
    ``trial-4 pruned nan-loss``, ``trial-3 interrupted``.
    """
    parts = [f"trial-{number}"]
    if seed:
        parts.append(f"seed={seed}")
    reason = reason or ""
    if state == "COMPLETE":
        parts.append(f"val={val:.4f}" if val is not None else "complete")
    elif state == "PRUNED":
        if "--max-params" in reason:
            parts.append(f"pruned params={human_count(params)}>max-params" if params else "pruned >max-params")
        elif "--max-flops" in reason:
            parts.append("pruned >max-flops")
        elif reason.startswith("time budget"):
            parts.append("pruned time-budget")
        elif "NaN" in reason or "nan" in reason:
            parts.append("pruned nan-loss")
        else:
            parts.append(f"pruned@rung{rung}" if rung is not None else f"pruned@epoch{epoch}" if epoch else "pruned")
            if val is not None:
                parts.append(f"val={val:.4f}")
    elif reason.startswith("interrupted"):
        parts.append("interrupted")
    else:
        parts.append("failed")
    return " ".join(parts)


def trial_note(number: int, study: str, engine: str, *, storage: str | None = None, seed: str | None = None,
               state: str | None = None, reason: str | None = None) -> str:
    """The Markdown note of a trial run: which trial of which study it is, and how to find it there."""
    if engine == "keras-tuner":
        lines = [f"Keras Tuner trial **{number}** of study `{study}`" + (f" (project `{storage}`)." if storage else ".")]
    else:
        lines = [f"Optuna trial **{number}** of study `{study}`" + (f" in `{storage}`." if storage else "."),
                 "",
                 "In Python: `optuna.load_study(study_name=" + repr(study) + ", storage=STORAGE).trials["
                 f"{number}]`; in the Optuna dashboard: study `{study}`, trial {number}."]
    if seed:
        lines += ["", f"Seed experiment `{seed}` (`experiments/{seed}.yaml`), run exactly as written."]
    if state:
        lines += ["", f"Outcome: {state}" + (f" ({reason})" if reason else "") + "."]
    return "\n".join(lines)


def registered_model_description(split: str) -> str:
    """The Markdown description of registered model ``emnist-<split>``."""
    from emnist_hpo.data.nist import load_classes

    classes = load_classes(split)
    return "\n".join([
        f"Champion CNNs for EMNIST **{split}** ({len(classes)} classes), one version per study that crowned a "
        "champion (emnist-hpo). Alias `champion`: the version with the best test accuracy so far.",
        "",
        "Input: uint8 images of shape (N, 28, 28) (or (N, 784)), upright, white ink on black as in EMNIST, "
        "values 0..255. Output: a DataFrame of class probabilities, one column per class in the mapping's "
        "order, named by character (`proba.idxmax(axis=1)` gives the characters).",
        "",
        "Load it:",
        "",
        "```python",
        "import mlflow",
        "mlflow.set_tracking_uri(TRACKING_URI)  # the store the study used",
        f"model = mlflow.pyfunc.load_model(\"models:/emnist-{split}@champion\")",
        "proba = model.predict(x)  # x: uint8 (N, 28, 28)",
        "```",
        "",
        f"Or from the command line: `python -m emnist_hpo predict --split {split} IMAGE...` (photos or scans of "
        "single characters). The model is logged from code (`pyfunc_model.py`, no pickled objects) and its Keras "
        "file loads in safe mode.",
    ])


def model_version_description(tags: Mapping[str, Any], test_accuracy: float,
                              architecture: str | None = None) -> str:
    """The description of one registered version: the study and trial it came from, its scores and size."""
    parts = [f"Champion of study `{tags.get('study', '?')}` (trial {tags.get('trial', '?')}"
             + (f", {tags['engine']}" if tags.get("engine") else "") + ")."]
    scores = [f"test accuracy {test_accuracy:.4f}"]
    if tags.get("val_accuracy") not in (None, ""):
        scores.append(f"validation accuracy {float(tags['val_accuracy']):.4f}")
    if tags.get("params") not in (None, ""):
        scores.append(f"{int(float(tags['params'])):,} parameters")
    parts.append(", ".join(scores).capitalize() + ".")
    if architecture:
        parts.append(f"Architecture: {architecture}.")
    final_fit = str(tags.get("final_fit", "True")) == "True"
    parts.append("Retrained on train+validation for the trial's best epoch count." if final_fit
                 else "The trial's own model (no final fit).")
    return " ".join(parts)
