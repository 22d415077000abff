"""Typed configuration: store defaults, experiment dataclasses, YAML loading.

An experiment is a tree of dataclasses (:class:`ExperimentConfig`), one comment
per field, as in nanoGPT. YAML files override only what differs from the
defaults (lightning-hydra-template style); an unknown key is an error that names
the file and the key, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import os
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from emnist_hpo.errors import ConfigError

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


#: The largest ``--seed`` / ``seed:``. Seeds derived from it (seed + trial number, seed + 1000 per process that
#: opens a study, the re-evaluation's seed + 100,003 per fold) must stay below 2**32, which NumPy's and
#: scikit-learn's seeds require: 2**31 - 1 leaves 2**31 for the offsets (two million resumes of one study).
MAX_SEED = 2**31 - 1

#: Upper bounds of the architecture and training numbers (experiment and search-space YAML), far above anything
#: useful on 28x28 images and far below what would exhaust memory or run for weeks: a typo such as
#: ``filters: 1000000000`` is an error naming the field, not a trial that fails or a process that is killed.
LIMITS: dict[str, int] = {
    "filters": 1024,  # conv channels per layer (the research's widest: 128)
    "kernel": 28,  # a kernel wider than the image sees only padding
    "convs": 8,  # conv layers per block
    "conv_blocks": 8,  # blocks (each halves the map: 5 already take 28x28 to 0)
    "dense_units": 8192,  # width of a hidden dense layer
    "dense_layers": 8,  # hidden dense layers
    "lstm_units": 4096,
    "batch_size": 16384,
    "epochs": 1000,
    "warmup_epochs": 1000,
    "early_stopping_patience": 1000,
    "steps_per_execution": 1024,
    "rotation": 180,  # degrees
}


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
    # Polyak averaging of the weights over about this many epochs (an exponential moving average kept by the
    # optimizer): validation scores the averaged weights and training ends on them. 0 = off; ignored with early
    # stopping, which restores one epoch's raw weights
    average_epochs: float = 0.0
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
        _at_most(where, "model.conv_blocks", len(m.conv_blocks), LIMITS["conv_blocks"], what="blocks")
        for i, b in enumerate(m.conv_blocks):
            _between(where, f"model.conv_blocks[{i}].filters", b.filters, 1, LIMITS["filters"])
            _between(where, f"model.conv_blocks[{i}].kernel", b.kernel, 1, LIMITS["kernel"])
            _between(where, f"model.conv_blocks[{i}].convs", b.convs, 1, LIMITS["convs"])
        _at_most(where, "model.dense", len(m.dense), LIMITS["dense_layers"], what="layers")
        for i, w in enumerate(m.dense):
            _between(where, f"model.dense[{i}]", w, 1, LIMITS["dense_units"])
        _between(where, "model.lstm_units", m.lstm_units, 1, LIMITS["lstm_units"])
        for name in ("conv_dropout", "dense_dropout", "bn_momentum"):
            _fraction(where, f"model.{name}", getattr(m, name), upper_open=True)
        _between(where, "model.augment.rotation", m.augment.rotation, 0, LIMITS["rotation"])
        for name in ("shift", "zoom"):
            _fraction(where, f"model.augment.{name}", getattr(m.augment, name), upper_open=True)
        _between(where, "train.epochs", t.epochs, 1, LIMITS["epochs"])
        _between(where, "train.batch_size", t.batch_size, 1, LIMITS["batch_size"])
        _choice(where, "train.optimizer", t.optimizer, OPTIMIZERS)
        _choice(where, "train.schedule", t.schedule, SCHEDULES)
        if not (t.learning_rate > 0 and math.isfinite(t.learning_rate)):
            raise ConfigError(
                f"{where}: train.learning_rate must be a finite number > 0 (learning_rate={t.learning_rate})"
            )
        _at_least(where, "train.weight_decay", t.weight_decay, 0)
        _between(where, "train.warmup_epochs", t.warmup_epochs, 0, LIMITS["warmup_epochs"])
        _between(where, "train.early_stopping_patience", t.early_stopping_patience, 0,
                 LIMITS["early_stopping_patience"])
        _fraction(where, "train.label_smoothing", t.label_smoothing, upper_open=True)
        _between(where, "train.average_epochs", t.average_epochs, 0, LIMITS["epochs"])
        _fraction(where, "train.momentum", t.momentum, upper_open=True)
        _choice(where, "train.precision", t.precision, PRECISIONS)
        _between(where, "train.steps_per_execution", t.steps_per_execution, 1, LIMITS["steps_per_execution"])
        _between(where, "train.seed", t.seed, 0, MAX_SEED)
        if not 0 < d.val_fraction < 1:
            raise ConfigError(f"{where}: data.val_fraction must be in (0, 1) (val_fraction={d.val_fraction})")
        if d.max_train_samples is not None:
            _at_least(where, "data.max_train_samples", d.max_train_samples, 1)
        _between(where, "data.seed", d.seed, 0, MAX_SEED)
        if m.kind == "cnn":
            from emnist_hpo.model.architecture import check_fits  # local: architecture sits beside config

            check_fits(m, where=where)
        if m.kind in CLASSICAL_KINDS:
            classical_estimator(m.kind, m.options, t.seed, where)  # bad options fail on load, not at fit time
        elif m.options:
            raise ConfigError(
                f"{where}: model.options applies to the classical kinds {', '.join(CLASSICAL_KINDS)} only "
                f"(kind={m.kind!r}, options={short(m.options)})"
            )
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


def short(value: Any, size: int = 80) -> str:
    """``repr(value)`` abridged to about ``size`` characters: messages stay one readable line."""
    r = reprlib.Repr()  # keyword arguments need Python 3.12
    r.maxstring = r.maxother = size
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = 8
    r.maxlevel = 3
    text = r.repr(value)
    return text if len(text) <= size + 10 else text[:size] + "..."


def _choice(where: str, name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: {name} must be one of {', '.join(allowed)} ({name.split('.')[-1]}={short(value)})")


def _finite(value: float) -> bool:
    return isinstance(value, int) or math.isfinite(value)  # ints are finite (and may be too large for a float)


def _at_least(where: str, name: str, value: float, low: float) -> None:
    # "not >=": NaN fails too; inf is no number any range here means
    if not (value >= low and _finite(value)):
        rule = f">= {low}" if value != value or value < low else f"a finite number >= {low}"
        raise ConfigError(f"{where}: {name} must be {rule} ({name.split('.')[-1]}={value})")


def _at_most(where: str, name: str, value: float, high: float, what: str = "") -> None:
    if not value <= high:
        unit = f" {what}" if what else ""
        raise ConfigError(f"{where}: {name} must be <= {high}{unit} ({name.split('.')[-1]}={value}{unit})")


def _between(where: str, name: str, value: float, low: float, high: float) -> None:
    _at_least(where, name, value, low)
    _at_most(where, name, value, high)


def _fraction(where: str, name: str, value: float, upper_open: bool = False) -> None:
    ok = 0 <= value < 1 if upper_open else 0 <= value <= 1  # False for NaN
    if not ok:
        rng = "[0, 1)" if upper_open else "[0, 1]"
        raise ConfigError(f"{where}: {name} must be in {rng} ({name.split('.')[-1]}={value})")


# --------------------------------------------------------------------------- classical estimators

#: ``model.kind`` values that are scikit-learn estimators rather than Keras models.
CLASSICAL_KINDS = ("random_forest", "svm", "knn")


def estimator_class(kind: str) -> type:
    """The scikit-learn class of a classical ``model.kind`` (imported here, on demand)."""
    if kind == "random_forest":
        from sklearn.ensemble import RandomForestClassifier

        return RandomForestClassifier
    if kind == "svm":
        from sklearn.svm import SVC

        return SVC
    if kind == "knn":
        from sklearn.neighbors import KNeighborsClassifier

        return KNeighborsClassifier
    raise ConfigError(f"model.kind must be one of {', '.join(CLASSICAL_KINDS)} for a classical model (kind={kind!r})")


def classical_estimator(kind: str, options: Mapping[str, Any], seed: int, where: str = "config") -> Any:
    """The unfitted estimator of a classical kind, its ``options`` checked as scikit-learn checks them at fit time.

    An option the estimator does not take is a :class:`ConfigError` naming it and the
    allowed ones; a bad value is one naming the option with scikit-learn's own rule
    (its parameter constraints, checked here rather than minutes into a fit).
    ``random_state`` defaults to ``seed`` where the estimator has one.
    """
    import inspect

    cls = estimator_class(kind)
    allowed = sorted(p for p in inspect.signature(cls).parameters if p != "self")
    opts = dict(options)
    unknown = sorted(set(opts) - set(allowed), key=str)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key 'model.options.{unknown[0]}' for {cls.__name__}; allowed: {', '.join(allowed)}"
        )
    if "random_state" in allowed:
        opts.setdefault("random_state", seed)
    try:
        est = cls(**opts)
        validate = getattr(est, "_validate_params", None)  # scikit-learn >= 1.2: the checks fit() runs first
        if validate is not None:
            validate()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: model.options rejected by {cls.__name__}: {' '.join(str(exc).split())}") from None
    return est


# --------------------------------------------------------------------------- building from dicts


def from_dict(cls: type, data: Any, where: str = "config", path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data`` (a mapping), rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where}: {path or 'the top level'} must be a mapping, got {type(data).__name__} ({short(data)})"
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
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
            raise ConfigError(f"{where}: {path} must be a list, got {type(value).__name__} ({short(value)})")
        return [_convert(item, v, where, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: {path} must be a mapping, got {type(value).__name__} ({short(value)})")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {path} must be true or false, got {short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {path} must be an integer, got {short(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {path} must be a number, got {short(value)}")
        if not _finite(value):
            raise ConfigError(f"{where}: {path} must be a finite number, got {value!r}")
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(
                f"{where}: {path} must be a finite number, got an integer too large for a float"
            ) from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {path} must be a string, got {short(value)}")
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


#: Experiment and search-space files are a few hundred bytes; anything over this is not one.
MAX_YAML_BYTES = 1 << 20
#: Nesting deeper than this is no experiment or search space (theirs is 4 at most) and would exhaust the stack.
MAX_YAML_DEPTH = 32


class _Refused(Exception):
    """A YAML construct :class:`_StrictLoader` does not accept, with where it starts."""

    def __init__(self, message: str, mark: Any):
        super().__init__(message)
        self.mark = mark


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases and with bounded nesting.

    An alias (``*name``) lets a few lines stand for billions of nodes ("billion laughs"): every
    walk over the loaded data (merging, validation, error messages, deep copies) then hangs.
    Deep nesting (``[[[[...]]]]``) makes the recursive composer raise RecursionError. Neither
    has a use in these files, so both are refused while the file is composed, before any
    Python object is built.
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(
                f"alias *{event.anchor} (YAML anchors and aliases are not allowed here; write the values out)",
                event.start_mark,
            )
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _Refused(f"nested deeper than {MAX_YAML_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a missing, oversized, non-UTF-8 or malformed file is a :class:`ConfigError` naming it.

    Loaded with :class:`_StrictLoader`: safe tags only, no aliases, at most
    :data:`MAX_YAML_DEPTH` levels of nesting, at most :data:`MAX_YAML_BYTES` bytes.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"file not found: {str(path)!r}")
    size = p.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{p}: {size:,} bytes is too large for an experiment or search-space file "
                          f"(at most {MAX_YAML_BYTES:,} bytes)")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{p}: not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} (line {line}): {exc.reason}; "
            "save the file as UTF-8"
        ) from None
    loader = _StrictLoader(text)
    loader.name = p.name  # PyYAML's marks say "<unicode string>" otherwise
    try:
        return loader.get_single_data()
    except _Refused as exc:
        raise ConfigError(f"{p}: line {exc.mark.line + 1}, column {exc.mark.column + 1}: {exc}") from None
    except yaml.YAMLError as exc:
        msg = " ".join(str(exc).split())
        raise ConfigError(f"{p}: not valid YAML: {msg[:300]}") from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer of more than 4,300 digits
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(exc).split())[:300]}") from None
    finally:
        loader.dispose()


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
