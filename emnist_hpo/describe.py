"""One-line descriptions of models, and model configs rebuilt from logged MLflow params.

``describe_model`` writes what a leaderboard shows in its architecture column
("conv 64-3x3 / max-pool / dense 512 / dense 128"); ``model_from_params`` reads
the flat ``model.*`` params every run logs (:meth:`ExperimentConfig.flat_params`)
back into a :class:`ModelConfig`, so any run in a store can be described.
"""

from __future__ import annotations

from typing import Any, Mapping

import yaml

from .config import ModelConfig, from_dict
from .errors import ConfigError


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
