"""Typed configuration: store defaults, experiment dataclasses, YAML loading.

An experiment is a tree of dataclasses (:class:`ExperimentConfig`), one comment
per field, as in nanoGPT. YAML files override only what differs from the
defaults (lightning-hydra-template style); an unknown key is an error that names
the file and the key, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError

#: Optuna's storage when ``--storage`` is not given (relative to the working directory).
DEFAULT_OPTUNA_STORAGE = "sqlite:///mlruns/optuna.db"
#: MLflow's tracking and registry store when neither ``--tracking-uri`` nor ``MLFLOW_TRACKING_URI`` is set.
DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
#: Where runs of the default local store keep their artifacts.
DEFAULT_ARTIFACT_ROOT = "mlruns/artifacts"



def resolve_storage(url: str | None = None) -> str:
    """``url``, else ``EMNIST_HPO_STORAGE``, else the embedded default ``sqlite:///mlruns/optuna.db``."""
    return absolute_sqlite(url or os.environ.get("EMNIST_HPO_STORAGE") or DEFAULT_OPTUNA_STORAGE)


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else the embedded default ``sqlite:///mlruns/mlflow.db``."""
    return absolute_sqlite(uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)


def absolute_sqlite(url: str) -> str:
    """A relative SQLite URL made absolute against the working directory, once, when it is resolved.

    MLflow and SQLAlchemy cache stores and engines by URL string: a relative URL used again
    after a change of directory would silently reach the first directory's database.
    """
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url.startswith(prefix + "/") or ":memory:" in url:
        return url
    path, sep, query = url[len(prefix):].partition("?")
    return prefix + str(Path(path).resolve()) + sep + query


MODEL_KINDS = ("cnn", "lstm", "random_forest", "svm", "knn")
POOLS = ("max", "avg")
PADDINGS = ("same", "valid")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "step", "exponential", "cosine", "warmup_cosine", "plateau")
PRECISIONS = ("auto", "float32", "mixed_bfloat16")


@dataclass
class ConvBlock:
    filters: int = 32  # output channels of each conv layer in the block
    kernel: int = 3  # square kernel size (3 or 5 in the research)
    convs: int = 1  # conv layers in the block before its pooling layer


@dataclass
class AugmentConfig:
    rotation: float = 0.0  # max random rotation, degrees (0 = off)
    shift: float = 0.0  # max random translation, fraction of the image side (0 = off)
    zoom: float = 0.0  # max random zoom in/out, fraction (0 = off)

    @property
    def enabled(self) -> bool:
        return self.rotation > 0 or self.shift > 0 or self.zoom > 0


@dataclass
class ModelConfig:
    kind: str = "cnn"  # cnn | lstm | random_forest | svm | knn
    conv_blocks: list[ConvBlock] = field(default_factory=lambda: [ConvBlock(32, 3)])  # cnn: conv blocks, input side first
    padding: str = "same"  # cnn: "same" keeps 28x28 until pooling, "valid" (Keras' default) shrinks by kernel-1
    pool: str = "max"  # cnn: 2x2 pooling after every block, max or avg
    batch_norm: bool = False  # cnn: BatchNormalization after every conv layer
    bn_momentum: float = 0.9  # cnn: moving-statistics momentum of batch-norm (Keras' default 0.99 lags short runs)
    global_pool: bool = False  # cnn: global average pooling before the dense head (instead of flattening the map)
    conv_dropout: float = 0.0  # cnn: dropout rate after every block's pooling
    dense: list[int] = field(default_factory=lambda: [128])  # widths of the hidden dense layers (cnn and lstm)
    dense_dropout: float = 0.0  # dropout rate after every hidden dense layer
    lstm_units: int = 128  # lstm: units of the LSTM that reads the image row by row
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # random augmentation, training only
    options: dict[str, Any] = field(default_factory=dict)  # classical baselines: keyword arguments of the scikit-learn estimator


@dataclass
class TrainConfig:
    epochs: int = 10  # upper bound on epochs (early stopping and pruning may end sooner)
    batch_size: int = 128  # images per gradient step
    optimizer: str = "adam"  # adam | adamw | sgd (sgd uses Nesterov momentum)
    learning_rate: float = 1e-3  # peak learning rate
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0  # decoupled weight decay (adamw, sgd); adam ignores it
    schedule: str = "constant"  # constant | step | exponential | cosine | warmup_cosine | plateau
    warmup_epochs: int = 1  # warmup_cosine: epochs of linear warmup
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    early_stopping_patience: int = 0  # stop after this many epochs without val_accuracy gain (0 = off)
    seed: int = 0  # seeds Keras, NumPy and Python for the run
    # Speed settings, each measured against a plain Keras fit for speed and accuracy (benchmarks/README.md):
    precision: str = "auto"  # float32 | mixed_bfloat16 | auto (bf16 compute, float32 weights, where the CPU has bf16 units)
    jit_compile: bool | None = None  # XLA; None = Keras' "auto" (off for TensorFlow on CPU, where XLA measured 2-3x slower)
    steps_per_execution: int = 32  # batches per compiled call (10-25% faster small models; batch callbacks see every 32nd)


@dataclass
class DataConfig:
    val_fraction: float = 0.2  # stratified validation share carved from train (0.2 = the research's 80:20)
    max_train_samples: int | None = None  # stratified subset of the training set for quick runs (None = all)
    seed: int = 0  # seeds the validation split and the subset


@dataclass
class ExperimentConfig:
    name: str = "experiment"  # the run's name in MLflow
    description: str = ""  # one line shown in compare tables
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self, where: str = "config") -> "ExperimentConfig":
        """Check every field's range; raise :class:`ConfigError` naming the field and value."""
        m, t, d = self.model, self.train, self.data
        _choice(where, "model.kind", m.kind, MODEL_KINDS)
        _choice(where, "model.padding", m.padding, PADDINGS)
        _choice(where, "model.pool", m.pool, POOLS)
        if m.kind == "cnn" and not m.conv_blocks:
            raise ConfigError(f"{where}: model.conv_blocks must hold at least one block for kind 'cnn'")
        for i, b in enumerate(m.conv_blocks):
            _at_least(where, f"model.conv_blocks[{i}].filters", b.filters, 1)
            _at_least(where, f"model.conv_blocks[{i}].kernel", b.kernel, 1)
            _at_least(where, f"model.conv_blocks[{i}].convs", b.convs, 1)
        for i, w in enumerate(m.dense):
            _at_least(where, f"model.dense[{i}]", w, 1)
        _at_least(where, "model.lstm_units", m.lstm_units, 1)
        for name in ("conv_dropout", "dense_dropout", "bn_momentum"):
            _fraction(where, f"model.{name}", getattr(m, name), upper_open=True)
        _at_least(where, "model.augment.rotation", m.augment.rotation, 0)
        for name in ("shift", "zoom"):
            _fraction(where, f"model.augment.{name}", getattr(m.augment, name), upper_open=True)
        _at_least(where, "train.epochs", t.epochs, 1)
        _at_least(where, "train.batch_size", t.batch_size, 1)
        _choice(where, "train.optimizer", t.optimizer, OPTIMIZERS)
        _choice(where, "train.schedule", t.schedule, SCHEDULES)
        if not t.learning_rate > 0:
            raise ConfigError(f"{where}: train.learning_rate must be > 0 (learning_rate={t.learning_rate})")
        _at_least(where, "train.weight_decay", t.weight_decay, 0)
        _at_least(where, "train.warmup_epochs", t.warmup_epochs, 0)
        _at_least(where, "train.early_stopping_patience", t.early_stopping_patience, 0)
        _fraction(where, "train.label_smoothing", t.label_smoothing, upper_open=True)
        _fraction(where, "train.momentum", t.momentum, upper_open=True)
        _choice(where, "train.precision", t.precision, PRECISIONS)
        _at_least(where, "train.steps_per_execution", t.steps_per_execution, 1)
        if not 0 < d.val_fraction < 1:
            raise ConfigError(f"{where}: data.val_fraction must be in (0, 1) (val_fraction={d.val_fraction})")
        if d.max_train_samples is not None:
            _at_least(where, "data.max_train_samples", d.max_train_samples, 1)
        if m.kind == "cnn":
            from .architecture import check_fits  # local: architecture sits beside config

            check_fits(m, where=where)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat_params(self) -> dict[str, Any]:
        """The config as flat ``section.key`` params, the way MLflow shows them."""
        return flatten(self.to_dict())


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and isinstance(v[0], Mapping):
            for i, item in enumerate(v):
                out.update(flatten(item, f"{key}.{i}."))
        else:
            out[key] = v
    return out


def _choice(where: str, name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: {name} must be one of {', '.join(allowed)} ({name.split('.')[-1]}={value!r})")


def _at_least(where: str, name: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{where}: {name} must be >= {low} ({name.split('.')[-1]}={value})")


def _fraction(where: str, name: str, value: float, upper_open: bool = False) -> None:
    ok = 0 <= value < 1 if upper_open else 0 <= value <= 1
    if not ok:
        rng = "[0, 1)" if upper_open else "[0, 1]"
        raise ConfigError(f"{where}: {name} must be in {rng} ({name.split('.')[-1]}={value})")


# --------------------------------------------------------------------------- building from dicts


def from_dict(cls: type, data: Any, where: str = "config", path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data`` (a mapping), rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: {path or 'the top level'} must be a mapping, got {type(data).__name__} ({data!r})")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(f"{where}: unknown key '{key}'; allowed: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _convert(hints[k], v, where, f"{path}.{k}" if path else k)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, where: str, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, path)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where, path)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {path} must be a list, got {type(value).__name__} ({value!r})")
        return [_convert(item, v, where, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: {path} must be a mapping, got {type(value).__name__} ({value!r})")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {path} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {path} must be a string, got {value!r}")
        return value
    return value


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` onto ``base`` (mappings merge, everything else replaces)."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a missing file or a syntax error is a :class:`ConfigError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"file not found: {str(path)!r}")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        msg = " ".join(str(exc).split())
        raise ConfigError(f"{p}: not valid YAML: {msg}") from None


def load_experiment(path: str | Path, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Load an experiment YAML on top of the defaults, apply ``overrides``, validate."""
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: an experiment must be a mapping of sections, got {type(data).__name__}")
    data = dict(data)
    data.setdefault("name", Path(path).stem)
    if overrides:
        data = merge(data, overrides)
    cfg = from_dict(ExperimentConfig, data, where=str(path))
    return cfg.validate(where=str(path))


#: A small preset for quick runs (``--quick``): one epoch on 2,000 training images.
QUICK_OVERRIDES: dict[str, Any] = {"train": {"epochs": 1}, "data": {"max_train_samples": 2000}}
