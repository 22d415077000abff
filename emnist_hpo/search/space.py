"""Search spaces: YAML files of parameter ranges, validated on load.

A space maps each known hyperparameter to one of three forms::

    conv_blocks: {low: 1, high: 4}                          # int range (step optional)
    learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}   # float range
    kernel: {choices: [3, 5]}                               # categorical
    padding: same                                           # fixed value, not searched

:meth:`SearchSpace.sample` turns an Optuna trial into an :class:`ExperimentConfig`
(Keras Tuner's ``HyperModel.build`` role); the search algorithm and the loop live
elsewhere. Per-block parameters are named ``filters_0``, ``kernel_0``, ...; a
stack that cannot fit a 28x28 image is rejected when the file is loaded, so it is
never sampled.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from emnist_hpo.model.architecture import max_blocks
from emnist_hpo.config import (
    LIMITS,
    OPTIMIZERS,
    PADDINGS,
    POOLS,
    SCHEDULES,
    AugmentConfig,
    ConvBlock,
    ExperimentConfig,
    read_yaml,
    short,
)
from emnist_hpo.errors import ConfigError

#: The largest augmentation an ``augment`` strength of 1.0 means.
AUGMENT_AT_ONE = AugmentConfig(rotation=15.0, shift=0.15, zoom=0.15)



def augment_strength(a: AugmentConfig) -> float | None:
    """The ``augment`` strength that gives ``a`` (0.0 when off), or None when ``a`` is not on that scale."""
    if not a.enabled:
        return 0.0
    s = a.rotation / AUGMENT_AT_ONE.rotation
    scaled = (AUGMENT_AT_ONE.shift * s, AUGMENT_AT_ONE.zoom * s)
    return s if all(abs(x - y) < 1e-9 for x, y in zip(scaled, (a.shift, a.zoom))) else None


def _upto(low: int, limit: str) -> tuple[Callable[[Any], bool], str]:
    # LIMITS is read at each check, so a test can raise a limit (monkeypatch.setitem) to provoke a failing trial
    return (lambda v: low <= v <= LIMITS[limit]), f"in {low}..{LIMITS[limit]}"


# name -> (value type, validator of one value or None, the rule in words); value types: int, float, bool, str.
# Integer maxima are config.LIMITS: far above anything useful on 28x28 images, far below a typo's 10**9.
_KNOWN: dict[str, tuple[type, Callable[[Any], bool] | None, str]] = {
    "conv_blocks": (int, *_upto(1, "conv_blocks")),
    "convs_per_block": (int, *_upto(1, "convs")),
    "filters": (int, *_upto(1, "filters")),
    "kernel": (int, lambda v: 1 <= v < LIMITS["kernel"] and v % 2 == 1, f"an odd integer in 1..{LIMITS['kernel'] - 1}"),
    "padding": (str, lambda v: v in PADDINGS, "one of " + ", ".join(PADDINGS)),
    "pool": (str, lambda v: v in POOLS, "one of " + ", ".join(POOLS)),
    "batch_norm": (bool, None, "true or false"),
    "global_pool": (bool, None, "true or false"),
    "conv_dropout": (float, lambda v: 0 <= v < 1, "in [0, 1)"),
    "dense_layers": (int, *_upto(0, "dense_layers")),
    "dense_units": (int, *_upto(1, "dense_units")),
    "dense_dropout": (float, lambda v: 0 <= v < 1, "in [0, 1)"),
    "batch_size": (int, *_upto(1, "batch_size")),
    "optimizer": (str, lambda v: v in OPTIMIZERS, "one of " + ", ".join(OPTIMIZERS)),
    "learning_rate": (float, lambda v: 0 < v < math.inf, "a finite number > 0"),
    "schedule": (str, lambda v: v in SCHEDULES, "one of " + ", ".join(SCHEDULES)),
    "weight_decay": (float, lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    "label_smoothing": (float, lambda v: 0 <= v < 1, "in [0, 1)"),
    "augment": (float, lambda v: 0 <= v <= 1, "in [0, 1]"),
}
_REQUIRED = ("conv_blocks", "filters", "kernel", "dense_layers", "dense_units", "learning_rate")


@dataclass(frozen=True)
class Param:
    """One hyperparameter: a range, a set of choices, or a fixed value."""

    name: str
    kind: str  # "int" | "float" | "categorical" | "fixed"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    value: Any = None

    @property
    def values(self) -> tuple[Any, ...]:
        """Every value a discrete parameter can take (its bounds for a float range)."""
        if self.kind == "fixed":
            return (self.value,)
        if self.kind == "categorical":
            return self.choices
        return (self.low, self.high)

    @property
    def free(self) -> bool:
        """Whether the parameter can take more than one value."""
        return len(set(self.values)) > 1

    def suggest(self, trial, name: str | None = None) -> Any:
        name = name or self.name
        if self.kind == "fixed":
            return self.value
        if self.kind == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.kind == "fixed":
            return value == self.value
        if self.kind == "categorical":
            return value in self.choices
        return self.low <= value <= self.high


def _parse_param(name: str, spec: Any, where: str) -> Param:
    vtype, check, rule = _KNOWN[name]

    def check_value(v: Any, what: str) -> Any:
        ok_type = (
            isinstance(v, bool) if vtype is bool
            else isinstance(v, int) and not isinstance(v, bool) if vtype is int
            else isinstance(v, (int, float)) and not isinstance(v, bool) if vtype is float
            else isinstance(v, str)
        )
        if not ok_type:
            raise ConfigError(f"{where}: {name}{what} must be of type {vtype.__name__}, got {short(v)}")
        if vtype is float and not (isinstance(v, int) or math.isfinite(v)):
            raise ConfigError(f"{where}: {name}{what} must be a finite number ({name}={v!r})")
        if check is not None and not check(v):
            raise ConfigError(f"{where}: {name}{what} must be {rule} ({name}={short(v)})")
        try:
            return float(v) if vtype is float else v
        except OverflowError:
            raise ConfigError(
                f"{where}: {name}{what} must be a finite number, got an integer too large for a float"
            ) from None

    if not isinstance(spec, Mapping):
        return Param(name, "fixed", value=check_value(spec, ""))
    keys = set(spec)
    if "choices" in keys:
        extra = keys - {"choices"}
        if extra:
            raise ConfigError(
                f"{where}: {name}: unknown key '{sorted(extra, key=str)[0]}' beside 'choices'; allowed: choices"
            )
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: {name}.choices must be a non-empty list (choices={short(choices)})")
        vals = tuple(check_value(c, ".choices") for c in choices)
        if len(set(vals)) != len(vals):
            raise ConfigError(f"{where}: {name}.choices must not repeat a value (choices={short(choices)})")
        return Param(name, "categorical", choices=vals)
    allowed = {"low", "high", "log", "step"}
    extra = keys - allowed
    if extra:
        raise ConfigError(
            f"{where}: {name}: unknown key '{sorted(extra, key=str)[0]}'; allowed: choices, high, log, low, step"
        )
    if not {"low", "high"} <= keys:
        missing = sorted({"low", "high"} - keys)[0]
        raise ConfigError(f"{where}: {name}: a range needs '{missing}' (or give 'choices', or a fixed value)")
    if vtype not in (int, float):
        raise ConfigError(f"{where}: {name} takes choices or a fixed value, not a range (low/high)")
    low, high = check_value(spec["low"], ".low"), check_value(spec["high"], ".high")
    if low > high:
        raise ConfigError(f"{where}: {name}: low must be <= high (low={low}, high={high})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: {name}.log must be true or false, got {short(log)}")
    if log and low <= 0:
        raise ConfigError(f"{where}: {name}: low must be > 0 for a log range (low={low})")
    step = spec.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step < math.inf:
            raise ConfigError(f"{where}: {name}.step must be a finite number > 0 (step={short(step)})")
        if log:
            raise ConfigError(f"{where}: {name}: step and log cannot be combined (step={step}, log=true)")
    return Param(name, "int" if vtype is int else "float", low=low, high=high, log=log, step=step)


class SearchSpace:
    """A validated search space; :meth:`sample` maps a trial to an experiment config."""

    def __init__(self, params: Mapping[str, Param], source: str = "<dict>"):
        self.params = dict(params)
        self.source = source

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, data: Any, where: str = "<dict>") -> "SearchSpace":
        if not isinstance(data, Mapping) or not data:
            raise ConfigError(
                f"{where}: a search space must be a non-empty mapping of parameter names, got {short(data)}"
            )
        unknown = sorted(set(data) - set(_KNOWN), key=str)
        if unknown:
            raise ConfigError(f"{where}: unknown key '{unknown[0]}'; allowed: {', '.join(sorted(_KNOWN))}")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise ConfigError(f"{where}: missing key '{missing[0]}' (required: {', '.join(_REQUIRED)})")
        params = {k: _parse_param(k, v, where) for k, v in data.items()}
        space = cls(params, where)
        space._check_fits()
        return space

    @classmethod
    def load(cls, path: str | Path) -> "SearchSpace":
        return cls.from_dict(read_yaml(path), where=str(path))

    def _check_fits(self) -> None:
        deepest = max(self.params["conv_blocks"].values)
        kernel = max(self.params["kernel"].values)
        convs = max(self._get("convs_per_block", 1).values)
        for padding in self._get("padding", "same").values:
            fit = max_blocks(kernel, padding, convs)
            if deepest > fit:
                raise ConfigError(
                    f"{self.source}: conv_blocks must be <= {fit} for kernel {kernel} with padding {padding!r} "
                    f"(a 28x28 image is pooled 2x per block; conv_blocks high={deepest})"
                )

    @property
    def free(self) -> bool:
        """Whether any parameter can take more than one value (a space with none trains one configuration)."""
        return any(p.free for p in self.params.values())

    def _get(self, name: str, default: Any) -> Param:
        return self.params.get(name) or Param(name, "fixed", value=default)

    # ------------------------------------------------------------------ sampling
    def sample(self, trial, base: ExperimentConfig) -> ExperimentConfig:
        """Suggest every parameter on ``trial`` and return ``base`` with them applied."""
        cfg = copy.deepcopy(base)
        g = self._get
        m, t = cfg.model, cfg.train
        m.kind = "cnn"
        n_blocks = g("conv_blocks", 2).suggest(trial)
        convs = g("convs_per_block", 1).suggest(trial)
        m.conv_blocks = [
            ConvBlock(
                filters=self.params["filters"].suggest(trial, f"filters_{i}"),
                kernel=self.params["kernel"].suggest(trial, f"kernel_{i}"),
                convs=convs,
            )
            for i in range(n_blocks)
        ]
        m.padding = g("padding", "same").suggest(trial)
        m.pool = g("pool", "max").suggest(trial)
        m.batch_norm = g("batch_norm", False).suggest(trial)
        m.global_pool = g("global_pool", False).suggest(trial)
        m.conv_dropout = g("conv_dropout", 0.0).suggest(trial)
        n_dense = g("dense_layers", 1).suggest(trial)
        m.dense = [self.params["dense_units"].suggest(trial, f"dense_units_{i}") for i in range(n_dense)]
        m.dense_dropout = g("dense_dropout", 0.0).suggest(trial) if n_dense else 0.0
        strength = g("augment", 0.0).suggest(trial)
        m.augment = AugmentConfig(
            rotation=AUGMENT_AT_ONE.rotation * strength,
            shift=AUGMENT_AT_ONE.shift * strength,
            zoom=AUGMENT_AT_ONE.zoom * strength,
        )
        t.batch_size = g("batch_size", t.batch_size).suggest(trial)
        t.optimizer = g("optimizer", t.optimizer).suggest(trial)
        t.learning_rate = g("learning_rate", t.learning_rate).suggest(trial)
        t.schedule = g("schedule", t.schedule).suggest(trial)
        t.weight_decay = g("weight_decay", 0.0).suggest(trial) if t.optimizer != "adam" else 0.0
        t.label_smoothing = g("label_smoothing", 0.0).suggest(trial)
        return cfg.validate(where=f"trial {getattr(trial, 'number', '?')}")

    def params_for(self, cfg: ExperimentConfig) -> dict[str, Any] | None:
        """The trial params that reproduce ``cfg``'s searchable part, or None if it lies outside the space."""
        m, t = cfg.model, cfg.train
        if m.kind != "cnn" or len({b.convs for b in m.conv_blocks}) != 1:
            return None
        p: dict[str, Any] = {
            "conv_blocks": len(m.conv_blocks),
            "convs_per_block": m.conv_blocks[0].convs,
            "pool": m.pool,
            "batch_norm": m.batch_norm,
            "global_pool": m.global_pool,
            "conv_dropout": m.conv_dropout,
            "dense_layers": len(m.dense),
            "batch_size": t.batch_size,
            "optimizer": t.optimizer,
            "learning_rate": t.learning_rate,
            "schedule": t.schedule,
            "label_smoothing": t.label_smoothing,
            "augment": augment_strength(m.augment),
        }
        for i, b in enumerate(m.conv_blocks):
            p[f"filters_{i}"], p[f"kernel_{i}"] = b.filters, b.kernel
        for i, w in enumerate(m.dense):
            p[f"dense_units_{i}"] = w
        if m.dense:
            p["dense_dropout"] = m.dense_dropout
        if t.optimizer != "adam":
            p["weight_decay"] = t.weight_decay
        out = {}
        for name, value in p.items():
            spec = self.params.get(name.rsplit("_", 1)[0] if name[-1].isdigit() else name)
            if spec is None:
                continue  # not searched here: the trial simply does not carry it
            if value is None or not spec.contains(value):
                return None
            if spec.kind != "fixed":
                out[name] = value
        return out

    def accepts(self, params: Mapping[str, Any]) -> bool:
        """Whether every value of ``params`` (trial params, e.g. from another study) lies in this space."""
        for name, value in params.items():
            spec = self.params.get(name.rsplit("_", 1)[0] if name[-1].isdigit() else name)
            if spec is not None and (value is None or not spec.contains(value)):
                return False
        return True

    def describe(self) -> dict[str, Any]:
        """A JSON-able view of the space (for logging as an artifact)."""
        out: dict[str, Any] = {}
        for k, p in self.params.items():
            if p.kind == "fixed":
                out[k] = p.value
            elif p.kind == "categorical":
                out[k] = {"choices": list(p.choices)}
            else:
                out[k] = {"low": p.low, "high": p.high, "log": p.log, **({"step": p.step} if p.step else {})}
        return out

    def edges(self, params: Mapping[str, Any]) -> list[str]:
        """Names of numeric range parameters whose value in ``params`` sits at the edge of its range."""
        hits = []
        for name, value in params.items():
            base = name.rsplit("_", 1)[0] if name[-1].isdigit() else name
            spec = self.params.get(base)
            if spec is None or spec.kind not in ("int", "float") or spec.low == spec.high:
                continue
            span = spec.high - spec.low
            tol = 0.02 * span if spec.kind == "float" and not spec.log else 0.0
            if spec.log:
                import math

                tol = 0.02 * (math.log(spec.high) - math.log(spec.low))
                v, lo, hi = math.log(value), math.log(spec.low), math.log(spec.high)
            else:
                v, lo, hi = value, spec.low, spec.high
            if v <= lo + tol or v >= hi - tol:
                hits.append(name)
        return hits
